"""Whether the Ray cluster can hold a study's trials (in the experiment's job driver).

Checked once before Tune starts (:func:`wait_for_fit`: the driver refuses a study that no
node can ever run, after waiting for nodes still joining), and watched while Tune runs
(:class:`CapacityWatch`): a node that leaves mid-study can leave trials pending that no
remaining node can hold. Ray would keep them pending without a word; the watch says so on
the experiment (its ``notice``) until a node that can hold them joins or the study ends.
Like the check before Tune starts, the watch is off on a cluster that adds nodes on demand
(``DST_RAY_AUTOSCALING``), where waiting for a node is the normal course.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from sqlalchemy.orm import Session

from service import crud
from service.study import Resources

log = logging.getLogger(__name__)

Nodes = Callable[[], list[dict[str, Any]]]  # ray.nodes, or a fake of it


def cluster_misfit(res: Resources, nodes: list[dict[str, Any]]) -> str | None:
    """Why the Ray cluster (``ray.nodes()``) can never run one trial, or None if it can.

    Each process of a trial must fit on one alive node's total resources; otherwise Ray
    would keep the trial pending forever (a cluster that adds nodes on demand is the
    operator's case, see ``DST_RAY_AUTOSCALING``).
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    for bundle in res.bundles():
        needed = {k: v for k, v in bundle.items() if v > 0}
        if any(all(node.get(k, 0.0) >= v for k, v in needed.items()) for node in alive):
            continue
        offers = ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in alive)
        asked = ", ".join(f"{k}: {v:g}" for k, v in needed.items())
        return (
            f"resources (cpus_per_trial={res.cpus_per_trial:g}, gpus_per_trial="
            f"{res.gpus_per_trial:g}, workers_per_trial={res.workers_per_trial}) need a "
            f"process with {{{asked}}} on one node, but the Ray cluster's nodes offer "
            f"{offers or 'nothing'}"
        )
    return None


def wait_for_fit(
    res: Resources,
    list_nodes: Nodes,
    wait_s: float,
    *,
    nodes: list[dict[str, Any]] | None = None,
    poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str | None, list[dict[str, Any]]]:
    """Poll the cluster's nodes until one trial fits (:func:`cluster_misfit`) or ``wait_s``
    has passed: the misfit (None once it fits) and the nodes last seen. ``nodes``: the nodes
    the caller has just read, if it has (else they are read first).

    A cluster just started may not have its workers yet (``docker compose up`` starts the
    head first): refusing at once would fail a study that could run a few seconds later.
    """
    nodes = list_nodes() if nodes is None else nodes
    misfit = cluster_misfit(res, nodes)
    if misfit is None or wait_s <= 0:
        return misfit, nodes
    log.info("waiting up to %g s for Ray nodes that can hold a trial: %s", wait_s, misfit)
    deadline = clock() + wait_s
    while clock() < deadline:
        sleep(min(poll_s, max(deadline - clock(), 0.0)))
        nodes = list_nodes()
        misfit = cluster_misfit(res, nodes)
        if misfit is None:
            alive = sum(1 for node in nodes if node.get("Alive"))
            log.info("the Ray cluster can hold a trial now: %d nodes alive", alive)
            break
    return misfit, nodes


WATCH_POLL_S = 10.0  # how often the watch reads the cluster's nodes while trials are unfinished
UNFINISHED = (TuneTrial.PENDING, TuneTrial.RUNNING)


class CapacityWatch(tune.Callback):
    """A Tune callback that keeps the experiment's notice saying which unfinished trials no
    alive node can hold, and since when; the notice is cleared once a node can hold them or
    none is left, and when the Tune experiment ends.

    Unfinished counts running trials too: a multi-worker trial's own process (a sliver of a
    CPU) is placed and running while its workers wait inside Train for a node that can hold
    them. ``publish`` stores a notice (None: clear it). The nodes are read at most every
    ``poll_s`` seconds, and only while some trial is unfinished.
    """

    def __init__(
        self,
        experiment_id: str,
        res: Resources,
        list_nodes: Nodes,
        publish: Callable[[str | None], None],
        *,
        poll_s: float = WATCH_POLL_S,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.experiment_id, self.res, self.list_nodes = experiment_id, res, list_nodes
        self.publish, self.poll_s, self.clock, self.now = publish, poll_s, clock, now
        self._next_poll = float("-inf")
        self._since: datetime | None = None  # when the trials were first seen without a node
        self._notice: str | None = None  # what was last published

    def __reduce__(self) -> tuple[Any, tuple[str, Resources]]:
        """Tune saves its callbacks with the experiment's state: save the experiment id and
        resources only (no database URL), and come back as this driver's own watch."""
        return capacity_watch_for, (self.experiment_id, self.res)

    def on_step_end(self, iteration: int, trials: list[TuneTrial], **info: Any) -> None:
        now = self.clock()
        if now < self._next_poll:
            return
        self._next_poll = now + self.poll_s
        unfinished = sum(1 for t in trials if t.status in UNFINISHED)
        misfit = None
        if unfinished:
            try:
                misfit = cluster_misfit(self.res, self.list_nodes())
            except Exception as error:  # the GCS busy or restarting: next time
                log.warning("could not read the Ray cluster's nodes: %r", error)
                return
        if misfit is None:
            if self._since is not None:
                log.info("the Ray cluster can hold the trials again")
            self._since = None
            self._set(None)
            return
        if self._since is None:
            self._since = self.now()
        waits = (
            "trial waits for a node that can hold it"
            if unfinished == 1
            else "trials wait for a node that can hold them"
        )
        since = self._since.strftime("%Y-%m-%d %H:%M:%S UTC")
        self._set(f"{unfinished} {waits}, since {since}: {misfit}")

    def on_experiment_end(self, trials: list[TuneTrial], **info: Any) -> None:
        self._set(None)

    def _set(self, notice: str | None) -> None:
        if notice == self._notice:
            return
        if notice is not None:
            log.warning(notice)
        try:
            self.publish(notice)
        except Exception as error:  # the database away: published at the next poll
            log.warning("could not store the experiment's notice: %r", error)
            return
        self._notice = notice


def capacity_watch_for(experiment_id: str, res: Resources) -> CapacityWatch:
    """The watch of this driver's experiment: it reads ``ray.nodes()`` and stores the notice
    in the service database (from this driver's settings)."""
    import ray

    from service.core.config import Settings
    from service.db import shared_engine

    engine = shared_engine(Settings().database_url)

    def publish(notice: str | None) -> None:
        with Session(engine) as session:
            crud.set_experiment_notice(session, experiment_id, notice)
            session.commit()

    return CapacityWatch(experiment_id, res, ray.nodes, publish)
