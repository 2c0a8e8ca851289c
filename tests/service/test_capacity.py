"""The cluster's capacity for a study's trials: the misfit, the driver's wait for nodes
before Tune starts, and the watch that keeps the experiment's notice while Tune runs."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ray.tune.experiment import Trial as TuneTrial
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from service import crud
from service.capacity import CapacityWatch, capacity_watch_for, cluster_misfit, wait_for_fit
from service.db import make_engine, shared_engine, upgrade_database
from service.recorder import recorder_for
from service.states import ExperimentStatus
from service.study import Resources, StudySpec, expand


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 1e9} | ({"GPU": gpus} if gpus else {})
    return {"Alive": alive, "Resources": resources}


@pytest.mark.parametrize(
    ("resources", "nodes", "fits"),
    [
        ({"cpus_per_trial": 0.5}, [node(2)], True),
        ({"cpus_per_trial": 4}, [node(2), node(2)], False),  # CPUs of one node, not the sum
        ({"gpus_per_trial": 0.5}, [node(2)], False),
        ({"gpus_per_trial": 0.5}, [node(2), node(8, 1)], True),
        ({"gpus_per_trial": 0.5}, [node(8, 1, alive=False)], False),
        (
            {"cpus_per_trial": 8, "gpus_per_trial": 4, "workers_per_trial": 4},
            [node(4, 2)] * 2,
            True,
        ),
        ({"cpus_per_trial": 8, "gpus_per_trial": 4, "workers_per_trial": 4}, [node(1, 4)], False),
    ],
)
def test_a_trial_no_node_can_hold_is_named_before_it_waits_forever(
    resources: dict, nodes: list[dict], fits: bool
) -> None:
    res = Resources.model_validate(resources)
    problem = cluster_misfit(res, nodes)
    assert (problem is None) == fits, problem
    if not fits:
        assert "gpus_per_trial" in problem and "offer" in problem  # type: ignore[operator]


class JoiningCluster:
    """``ray.nodes()`` of a cluster whose workers join over time, on a fake clock."""

    def __init__(self, joins: dict[float, dict]) -> None:
        self.now = 0.0
        self.joins = joins  # when (s) each worker node joins
        self.polls: list[float] = []

    def nodes(self) -> list[dict]:
        self.polls.append(self.now)
        head = {"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0}}
        return [head, *(n for t, n in self.joins.items() if t <= self.now)]

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def test_the_driver_waits_for_workers_that_join_after_it_starts() -> None:
    """A cluster just brought up: the head first, the worker 5 s later. The driver polls
    every 2 s, sees the worker at 6 s, and goes on without waiting out its 60 s."""
    cluster = JoiningCluster({5.0: node(2)})
    misfit, nodes = wait_for_fit(
        Resources(cpus_per_trial=1), cluster.nodes, 60, clock=lambda: cluster.now,
        sleep=cluster.sleep,
    )  # fmt: skip
    assert misfit is None and len(nodes) == 2
    assert cluster.polls == [0.0, 2.0, 4.0, 6.0]


def test_the_driver_gives_up_on_a_cluster_that_never_fits_when_its_wait_ends() -> None:
    """No GPU ever joins: the last poll is at the deadline (not past it), and the misfit
    names what the nodes offer."""
    cluster = JoiningCluster({1.0: node(2)})
    misfit, _ = wait_for_fit(
        Resources(gpus_per_trial=0.5), cluster.nodes, 5, clock=lambda: cluster.now,
        sleep=cluster.sleep,
    )  # fmt: skip
    assert misfit is not None and "{CPU: 0, GPU: 0}, {CPU: 2, GPU: 0}" in misfit
    assert cluster.polls == [0.0, 2.0, 4.0, 5.0]


def test_a_driver_told_not_to_wait_polls_once() -> None:
    cluster = JoiningCluster({1.0: node(2)})
    misfit, _ = wait_for_fit(
        Resources(cpus_per_trial=1), cluster.nodes, 0, clock=lambda: cluster.now,
        sleep=cluster.sleep,
    )  # fmt: skip
    assert misfit is not None and cluster.polls == [0.0]


# --- the watch while Tune runs ---------------------------------------------------------------

GPU_TRIALS = Resources(cpus_per_trial=0.25, gpus_per_trial=0.5)
START = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


class Stub:
    """A Tune trial as the watch sees it: its status."""

    def __init__(self, status: str) -> None:
        self.status = status


class LosingCluster:
    """A cluster whose only GPU node leaves and comes back, on a fake clock; the notices
    the watch publishes."""

    def __init__(self) -> None:
        self.now = 0.0
        self.gpu_node = True
        self.polls: list[float] = []
        self.published: list[str | None] = []

    def nodes(self) -> list[dict]:
        self.polls.append(self.now)
        head = {"Alive": True, "Resources": {"CPU": 0.0}}
        return [head, node(2, 1, alive=self.gpu_node)]

    def watch(self, **more: Any) -> CapacityWatch:
        return CapacityWatch(
            "e1", GPU_TRIALS, self.nodes, self.published.append, poll_s=10,
            clock=lambda: self.now, now=lambda: START + timedelta(seconds=self.now), **more,
        )  # fmt: skip

    def step(self, watch: CapacityWatch, at: float, *states: str) -> None:
        self.now = at
        watch.on_step_end(iteration=0, trials=[Stub(s) for s in states])


def test_the_watch_says_which_pending_trials_no_node_can_hold_and_since_when() -> None:
    """The GPU node leaves at 5 s and its two trials wait; the watch, which read the nodes
    at 0 s, reads them again at 10 s and publishes the notice once, however long it lasts;
    it clears the notice when the node is back."""
    cluster = LosingCluster()
    watch = cluster.watch()
    running, pending = TuneTrial.RUNNING, TuneTrial.PENDING
    cluster.step(watch, 0, running, running, pending)  # the third: the GPU is taken
    cluster.gpu_node = False
    cluster.step(watch, 5, pending, pending, pending)
    assert cluster.published == [] and cluster.polls == [0]
    for at in (10, 12, 20, 30):
        cluster.step(watch, at, pending, pending, pending)
    notice = (
        "3 trials wait for a node that can hold them, since 2026-11-27 12:00:10 UTC: resources "
        "(cpus_per_trial=0.25, gpus_per_trial=0.5, workers_per_trial=1) need a process with "
        "{CPU: 0.25, GPU: 0.5} on one node, but the Ray cluster's nodes offer {CPU: 0, GPU: 0}"
    )
    assert cluster.published == [notice] and cluster.polls == [0, 10, 20, 30]
    cluster.gpu_node = True
    cluster.step(watch, 40, pending, pending, pending)
    cluster.step(watch, 50, running, running, pending)
    assert cluster.published == [notice, None]


def test_one_pending_trial_is_named_in_the_singular() -> None:
    cluster = LosingCluster()
    cluster.gpu_node = False
    cluster.step(cluster.watch(), 0, TuneTrial.PENDING, TuneTrial.TERMINATED)
    (notice,) = cluster.published
    assert notice is not None and notice.startswith("1 trial waits for a node that can hold it,")


def test_trials_pending_on_a_busy_cluster_that_can_hold_them_have_no_notice() -> None:
    """Pending because the GPU is in use (Ray places them once it is free): no notice."""
    cluster = LosingCluster()
    watch = cluster.watch()
    for at in (0, 10, 20):
        cluster.step(watch, at, TuneTrial.RUNNING, TuneTrial.RUNNING, TuneTrial.PENDING)
    assert cluster.published == [] and cluster.polls == [0, 10, 20]


def test_no_unfinished_trial_no_reading_of_the_nodes() -> None:
    cluster = LosingCluster()
    cluster.gpu_node = False
    watch = cluster.watch()
    for at in (0, 10, 20):
        cluster.step(watch, at, TuneTrial.TERMINATED, TuneTrial.ERROR)
    assert cluster.polls == [] and cluster.published == []


def test_a_running_multi_worker_trial_whose_workers_have_no_node_is_named() -> None:
    """A multi-worker trial's own process (a sliver of a CPU) is placed and running while its
    workers wait inside Train for GPUs no node has."""
    cluster = LosingCluster()
    cpu_only = [node(0), node(4)]  # the trial's own process fits; its workers do not
    watch = CapacityWatch(
        "e1", Resources(cpus_per_trial=2, gpus_per_trial=2, workers_per_trial=2),
        lambda: cpu_only, cluster.published.append, poll_s=10, clock=lambda: cluster.now,
    )  # fmt: skip
    cluster.step(watch, 0, TuneTrial.RUNNING)
    (notice,) = cluster.published
    assert notice is not None and notice.startswith("1 trial waits for a node"), notice
    assert "{CPU: 1, GPU: 1}" in notice, notice


def test_a_notice_the_database_refused_is_stored_at_the_next_poll() -> None:
    cluster = LosingCluster()
    refusals = [ConnectionError("the database is away")]

    def publish(notice: str | None) -> None:
        if refusals:
            raise refusals.pop()
        cluster.published.append(notice)

    watch = CapacityWatch(
        "e1", GPU_TRIALS, cluster.nodes, publish, poll_s=10, clock=lambda: cluster.now
    )
    cluster.gpu_node = False
    cluster.step(watch, 0, TuneTrial.PENDING)
    assert cluster.published == []
    cluster.step(watch, 10, TuneTrial.PENDING)
    assert len(cluster.published) == 1 and "1 trial waits" in cluster.published[0]  # type: ignore[operator]


def test_nodes_that_cannot_be_read_change_nothing() -> None:
    cluster = LosingCluster()
    cluster.gpu_node = False
    watch = cluster.watch()
    cluster.step(watch, 0, TuneTrial.PENDING)
    published = list(cluster.published)

    def unreadable() -> list[dict]:
        raise TimeoutError("the GCS did not answer")

    watch.list_nodes = unreadable
    cluster.step(watch, 10, TuneTrial.PENDING)
    assert cluster.published == published  # neither cleared nor repeated


def test_the_notice_is_cleared_when_the_tune_experiment_ends() -> None:
    cluster = LosingCluster()
    cluster.gpu_node = False
    watch = cluster.watch()
    cluster.step(watch, 0, TuneTrial.PENDING)
    watch.on_experiment_end(trials=[Stub(TuneTrial.PENDING)])
    assert len(cluster.published) == 2 and cluster.published[1] is None


def running_experiment(engine: Engine, experiment_id: str) -> None:
    """A fresh service database behind ``engine`` with one running experiment."""
    upgrade_database(engine)
    study = StudySpec.model_validate({"name": "s", "model": "small-mlp", "dataset": "digits"})
    with Session(engine) as session:
        crud.create_experiment(
            session, experiment_id=experiment_id, name="s", spec_json="{}", plans=expand(study)
        )
        crud.set_experiment_status(session, experiment_id, ExperimentStatus.SUBMITTED)
        crud.set_experiment_status(session, experiment_id, ExperimentStatus.RUNNING)
        session.commit()


def test_a_watch_saved_with_tunes_state_comes_back_writing_this_drivers_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune pickles its callbacks (with Ray's cloudpickle) into the experiment's state on
    storage: the database URL and its password do not go there, and the watch restored in a
    driver stores its notice in that driver's database (until the experiment ends, which
    clears it)."""
    from ray import cloudpickle

    monkeypatch.setenv("DST_DATABASE_URL", "postgresql+psycopg://dst:s3cret-pw@db:5432/dst")
    saved = cloudpickle.dumps(capacity_watch_for("e1", GPU_TRIALS))
    assert b"s3cret-pw" not in saved and b"db:5432" not in saved
    url = f"sqlite:///{tmp_path / 'watch.db'}"
    engine = make_engine(url)
    running_experiment(engine, "e1")
    monkeypatch.setenv("DST_DATABASE_URL", url)
    restored = pickle.loads(saved)
    assert isinstance(restored, CapacityWatch)
    assert (restored.experiment_id, restored.res) == ("e1", GPU_TRIALS)
    restored.publish("2 trials wait")
    with Session(engine) as session:
        assert crud.get_experiment(session, "e1").notice == "2 trials wait"  # type: ignore[union-attr]
        crud.set_experiment_status(session, "e1", ExperimentStatus.SUCCEEDED)
        session.commit()
    restored.publish("too late")  # an ended experiment keeps no notice
    with Session(engine) as session:
        assert crud.get_experiment(session, "e1").notice is None  # type: ignore[union-attr]


def test_a_drivers_recorder_and_watch_share_its_connection_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job driver holds one pool of database connections: its own steps, its recorder and
    its capacity watch all use this process's engine for the URL."""
    url = f"sqlite:///{tmp_path / 'driver.db'}"
    monkeypatch.setenv("DST_DATABASE_URL", url)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    engine = shared_engine(url)
    running_experiment(engine, "e1")
    checkouts: list[object] = []
    event.listen(engine, "checkout", lambda *args: checkouts.append(args))
    recorder_for.cache_clear()
    try:
        assert recorder_for("e1").engine is engine
        used_by_recorder = len(checkouts)
        assert used_by_recorder >= 1  # it read the experiment's MLflow parent run
        capacity_watch_for("e1", GPU_TRIALS).publish("2 trials wait")
        assert len(checkouts) > used_by_recorder
    finally:
        recorder_for.cache_clear()
        engine.dispose()
    with Session(make_engine(url)) as session:
        assert crud.get_experiment(session, "e1").notice == "2 trials wait"  # type: ignore[union-attr]
