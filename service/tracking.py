"""MLflow bookkeeping: one parent run per experiment, one nested child run per trial.

The API creates the MLflow experiment and the parent run before the Ray job is submitted, so
trials never race to create them. Each trial's child run gets flattened params, per-epoch
metrics, its spec, its initial and final masks (compressed ``.npz``) and its own figures.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dst.spec import RunSpec, flatten
from service.analysis import StudyAnalysis
from service.backlog import Backlog
from service.db import database_outage
from service.refusal import refused_for_good
from service.results import format_table
from service.study import StudySpec, TrialPlan

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

# MLflow is imported where it is used: its import takes seconds, and a job driver should
# start its trials first and connect to MLflow meanwhile, on its outbox thread

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "dst-lab"
TAG_EXPERIMENT = "dst.experiment_id"
TAG_TRIAL = "dst.trial_index"
TAG_RESUMED = "dst.resumed_from_epoch"  # set on a child run when its trial resumed
TAG_NODE = "dst.node"  # on a child run: the hosts its trial last started on
TAG_GPUS = "dst.gpus"  # ... and the GPUs Ray gave it there ("" when none)
TAG_PARENT_READY = "dst.parent_ready"  # the parent run has its params, study and trial list
PARENT_TAG = "mlflow.parentRunId"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on the metrics of one log_batch request
RUN_STATUS = {  # the MLflow status that ends the run of an experiment or trial in this state
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _params(data: dict[str, Any]) -> list[Param]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in flatten(data).items()]


# MLflow 3's UI opens an experiment by its kind (this tag): a model-training experiment opens
# on the runs table, where an untagged one may open on the GenAI overview
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: MODEL_TRAINING}


class MlflowTracker:
    """Creates and finishes parent runs; builds UI links (used by the API)."""

    def __init__(self, tracking_uri: str, ui_url: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.ui_url = ui_url or without_credentials(tracking_uri)  # what a browser reaches
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        """The MLflow client, made on first use (importing MLflow takes seconds, and the API
        answers while it starts)."""
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def _experiment_id(self, name: str) -> str:
        """The MLflow experiment ``name``, created as a model-training experiment."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(self.client.create_experiment(name, tags=EXPERIMENT_TAGS))
            except MlflowException:  # created concurrently by another API replica
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # made by an older version
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return str(found.experiment_id)

    def create_parent(
        self, experiment_id: str, study: StudySpec, plans: list[TrialPlan]
    ) -> tuple[str, str]:
        """Create (or reuse) the MLflow experiment and this study's parent run."""
        mlflow_experiment = self._experiment_id(MLFLOW_EXPERIMENT)
        existing = self.client.search_runs(
            [mlflow_experiment], f"tags.`{TAG_EXPERIMENT}` = '{experiment_id}'", max_results=1
        )
        if existing:  # a retried submission reuses its parent run
            run_id = existing[0].info.run_id
            if existing[0].data.tags.get(TAG_PARENT_READY) == "true":
                return mlflow_experiment, run_id
        else:
            run = self.client.create_run(
                mlflow_experiment,
                run_name=study.name,
                tags={TAG_EXPERIMENT: experiment_id, **study.tags},
            )
            run_id = run.info.run_id
        # (again, when a try failed after creating the run: the same values, so no conflict)
        self.client.log_batch(run_id, params=_params(study.base_run())[:100])
        self.client.log_dict(run_id, study.model_dump(mode="json"), "study.json")
        self.client.log_dict(run_id, {str(p.index): p.label for p in plans}, "trials.json")
        self.client.set_tag(run_id, TAG_PARENT_READY, "true")
        return mlflow_experiment, run_id

    def finish_parent(
        self,
        parent_run_id: str,
        status: str,
        analysis: StudyAnalysis,
        trial_runs: Mapping[str, str] | None = None,
    ) -> None:
        """Attach the results table (JSON and text), the analysis (rankings JSON and CSV,
        figures, summary metrics), end the child runs still running (``trial_runs``: child
        run id -> its trial's final state) and close the parent run."""
        from dst.ranking import strict_json  # (imported once the analysis has run)

        assert analysis.results is not None
        data = strict_json(asdict(analysis.results))  # a diverged seed's NaN row: null, "-"
        self.client.log_dict(parent_run_id, data, "results.json")
        self.client.log_text(
            parent_run_id, format_table(data["group_by"], data["rows"]), "results.txt"
        )
        try:
            self._log_analysis(parent_run_id, analysis)
        except Exception:  # the analysis is also served over REST; the run still closes
            log.exception("could not log the analysis of parent run %s", parent_run_id)
        self.end_running_children(parent_run_id, status, trial_runs or {})
        self.client.set_terminated(parent_run_id, RUN_STATUS.get(status, "FINISHED"))

    def end_running_children(
        self, parent_run_id: str, status: str, trial_runs: Mapping[str, str], page: int = 1000
    ) -> None:
        """End the child runs a job driver left running (it was killed before it could end
        them): each with its trial's final state from ``trial_runs``, else the experiment's
        ``status``, so no run of an ended experiment shows as running forever. All are found
        first, ``page`` at a time: ending them while paging would shift the later pages."""
        experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"
        running: list[str] = []
        token = None
        while True:
            found = self.client.search_runs(
                [experiment_id], query, max_results=page, page_token=token
            )
            running += [run.info.run_id for run in found]
            token = found.token
            if not token:
                break
        for run_id in running:
            state = trial_runs.get(run_id, status)
            self.client.set_terminated(run_id, RUN_STATUS.get(state, "FAILED"))

    def _log_analysis(self, run_id: str, analysis: StudyAnalysis) -> None:
        from mlflow.entities import Metric, RunTag

        from service.analysis import rankings_csv, summary
        from service.figures import write_figures

        self.client.log_dict(run_id, analysis.to_dict(), "analysis.json")
        if analysis.rankings:
            self.client.log_text(run_id, rankings_csv(analysis), "rankings.csv")
        metrics, tags = summary(analysis)
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            write_figures(analysis, Path(tmp))
            self.client.log_artifacts(run_id, tmp, "figures")

    def links(
        self, mlflow_experiment_id: str | None, parent_run_id: str | None
    ) -> dict[str, str | None]:
        """Addresses of the experiment and parent run in the MLflow UI."""
        base = self.ui_url.rstrip("/")
        web = base.startswith("http")
        exp = (  # the training runs table
            f"{base}/#/experiments/{mlflow_experiment_id}/runs"
            if web and mlflow_experiment_id
            else None
        )
        run = f"{exp}/{parent_run_id}" if exp and parent_run_id else None
        uri = without_credentials(self.tracking_uri)
        return {"tracking_uri": uri, "experiment_url": exp, "parent_run_url": run}

    def ping(self) -> bool:
        """True when the tracking server answers."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception:
            return False
        return True


def without_credentials(uri: str) -> str:
    """``uri`` without a user name and password (``http://user:pass@host`` -> ``http://host``),
    for showing it to API clients."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class TrialRun:
    """The child run of one trial (created once, reused when the trial resumes)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str) -> TrialRun:
        """The trial's existing run ``run_id``, marked running again (the trial resumed)."""
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    @classmethod
    def create(
        cls,
        client: MlflowClient,
        parent_run_id: str,
        experiment_id: str,
        plan_index: int,
        label: str,
    ) -> TrialRun:
        """A new child run under the parent, tagged with the experiment and trial index, in
        one creating request, so a failure leaves either no run or a whole one. (A run whose
        creation answer was lost is ended when the experiment's parent run closes.)"""
        parent = client.get_run(parent_run_id)
        run = client.create_run(
            parent.info.experiment_id,
            run_name=label,
            tags={
                PARENT_TAG: parent_run_id,
                TAG_EXPERIMENT: experiment_id,
                TAG_TRIAL: str(plan_index),
            },
        )
        return cls(client, run.info.run_id)

    def describe(self, spec: RunSpec) -> None:
        """The trial's params and ``spec.json``; repeatable (MLflow accepts a param logged
        again with the same value, and the artifact is overwritten with the same content)."""
        spec_data = spec.model_dump(mode="json")
        self.client.log_batch(self.run_id, params=_params(spec_data))
        self.client.log_dict(self.run_id, spec_data, "spec.json")

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_epochs(self, epochs: Sequence[Mapping[str, float]]) -> None:
        """Per-epoch metrics, stepped by epoch, in as few requests as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, int(metrics["epoch"]))
            for metrics in epochs
            for k, v in metrics.items()
            if k != "epoch"
        ]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])

    def log_masks_file(self, path: Path, name: str) -> None:
        """A saved mask set (packed bits, :func:`dst.masks.save_masks`) as ``masks/<name>.npz``."""
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / f"{name}.npz"
            shutil.copyfile(path, target)
            self.client.log_artifact(self.run_id, str(target), "masks")

    def log_figure(self, figure: Figure, name: str) -> None:
        """A figure as ``figures/<name>.png``."""
        self.client.log_figure(self.run_id, figure, f"figures/{name}.png")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FINISHED"))


def _log_figure(name: str, build: Callable[[], Figure], run: TrialRun) -> None:
    run.log_figure(build(), name)


def _refused(error: Exception) -> bool:
    """MLflow refused the write itself (the request is wrong, or its run or experiment is
    gone, e.g. deleted in the UI): sending it again would fail the same way."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and refused_for_good(error)


def _outage(error: Exception) -> bool:
    """An error that retrying may cure (an outage): MLflow's own unless it refused the write
    (a server error, a rate limit), a connection's (requests' errors are OSErrors too), or the
    database's while a run id is stored."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return not _refused(error)
    return database_outage(error)


class Outbox:
    """MLflow writes done in order on a background thread, each retried until MLflow answers.

    Whoever records (the job driver) never waits on MLflow: while the tracking server is down
    the writes queue up, and they arrive in order once it is back. A write MLflow refuses
    (its run was deleted, say) or that fails with a bug is logged and skipped, so it never
    holds up the writes behind it. :meth:`close` waits a bounded time for the queue to drain;
    once that time is up, the writes still queued are skipped.
    """

    def __init__(self, retry_s: float = 2.0) -> None:
        self.retry_s = retry_s
        self._backlog = Backlog("mlflow-outbox")
        self._gave_up = False  # closing's time ran out: what is still queued is skipped

    def put(
        self, what: str, write: Callable[[], None], done: Callable[[], None] | None = None
    ) -> None:
        """Queue ``write`` (described as ``what`` in logs); ``done`` is called once the write
        is over, made or skipped (to remove what it needed)."""
        self._backlog.put(functools.partial(self._send, what, write, done))

    def close(self, timeout: float) -> bool:
        """Stop after the queued writes, waiting at most ``timeout`` s; True if all were done."""
        return self._backlog.close(timeout, grace=self.retry_s) and not self._gave_up

    def _send(self, what: str, write: Callable[[], None], done: Callable[[], None] | None) -> None:
        try:
            if not self._gave_up and not self._attempt(what, write):
                log.error("MLflow: giving up on %s and what follows it", what)
                self._gave_up = True
        finally:
            if done is not None:
                done()

    def _attempt(self, what: str, write: Callable[[], None]) -> bool:
        """Make ``write``, retrying it through outages; False when closing's time ran out."""
        failures = 0
        while True:
            try:
                write()
                break
            except Exception as error:
                if _refused(error):
                    log.error("MLflow refused %s; skipping it: %s", what, error)
                    return True
                if not _outage(error):  # a bug, not an outage: retrying cannot help
                    log.exception("MLflow: %s failed; skipping it", what)
                    return True
                failures += 1
                if failures == 1:
                    log.warning("MLflow: %s failed, retrying until it works: %s", what, error)
                if self._backlog.overdue():
                    return False
                self._backlog.pause(self.retry_s)
        if failures:
            log.info("MLflow: %s went through after %d failures", what, failures)
        return True


@dataclass(frozen=True)
class Opening:
    """What opening a trial's child run needs, from the trial's stored row."""

    label: str
    spec: RunSpec
    run_id: str | None  # the run an earlier start of the trial made
    resumed: int | None  # the epoch the trial resumes after, when it has some behind it


class ChildRuns:
    """The MLflow child runs of one experiment's trials, written through an :class:`Outbox`.

    Used by the job driver's recorder. ``on_run`` is called (on the outbox thread) with a
    trial's run id once its run exists, so the caller can store it.
    """

    def __init__(
        self,
        tracking_uri: str,
        parent_run_id: str,
        experiment_id: str,
        on_run: Callable[[int, str], None],
        outbox: Outbox | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._client: MlflowClient | None = None  # made on the outbox thread
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id
        self.on_run = on_run
        self.outbox = outbox or Outbox()
        self._runs: dict[int, TrialRun] = {}
        self._unfinished: set[int] = set()  # runs made here, not yet described and stored
        self._epochs: dict[int, list[dict[str, float]]] = {}  # by trial: a send's epochs
        self._copies: set[Path] = set()  # mask copies waiting for their upload
        self._lock = threading.Lock()

    def start(self, index: int, opening: Callable[[], Opening | None]) -> None:
        """Create (or reopen) trial ``index``'s run; tag it when it resumed at an epoch.

        ``opening`` is called on the outbox thread: it waits for what the trial's stored row
        says (its label, spec, run and resume), which the recorder reads on its own thread.
        Without it (the row could not be read) the trial gets no run.
        """

        def write() -> None:
            # Each step is kept as soon as it is done, so a retry after a failure (the outbox
            # retries the whole write) goes on from there instead of creating a second run.
            # A retry that starts before the first start's run id reached the database gets
            # run_id None: the run this driver already made for the trial is the one to go on.
            found = opening()
            if found is None:
                log.error("trial %d gets no MLflow run: its stored row could not be read", index)
                return
            known = self._runs.get(index)
            reuse = found.run_id or (known.run_id if known is not None else None)
            client = self.client()
            if reuse is None:
                run = TrialRun.create(
                    client, self.parent_run_id, self.experiment_id, index, found.label
                )
                self._unfinished.add(index)
            else:
                run = TrialRun.reopen(client, reuse)
            self._runs[index] = run
            if index in self._unfinished:  # made by this driver: params, spec, id to store
                run.describe(found.spec)
                self.on_run(index, run.run_id)
                self._unfinished.discard(index)
            if found.resumed is not None:
                run.tag(TAG_RESUMED, str(found.resumed))

        self._seal(index)  # the trial's next epochs go out after its run is (re)opened
        self.outbox.put(f"opening the run of trial {index}", write)

    def client(self) -> MlflowClient:
        """The MLflow client (imported and made on first use, on the outbox thread)."""
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def mark_resumed(self, index: int, epoch: int) -> None:
        """Tag the run: its trial resumed from a checkpoint after ``epoch``."""
        self._put(index, f"resume tag {epoch}", lambda run: run.tag(TAG_RESUMED, str(epoch)))

    def mark_placement(self, index: int, node: str, gpus: str) -> None:
        """Tag the run with where its trial (re)started: hosts and GPU ids (see
        :func:`service.trial.placement`)."""

        def write(run: TrialRun) -> None:
            run.tag(TAG_NODE, node)
            run.tag(TAG_GPUS, gpus)

        self._put(index, f"placement {node} {gpus}", write)

    def log_epoch(self, index: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics. Epochs that arrive while the outbox is behind go out together,
        in one request, with the first of them (still before anything queued after them).
        A send stops taking epochs once it runs or the trial starts again, so a send that is
        skipped (the trial had no run yet, MLflow refused it) loses only its own epochs."""
        with self._lock:
            waiting = self._epochs.get(index)
            if waiting is not None:
                waiting.append(dict(metrics))
                return  # the send queued for the first one takes this one too
            batch = self._epochs[index] = [dict(metrics)]

        def write() -> None:  # a retry resends the same batch
            self._seal(index, batch)
            self._run(index).log_epochs(batch)

        self.outbox.put(f"epoch {int(metrics['epoch'])} of trial {index}", write)

    def _seal(self, index: int, batch: list[dict[str, float]] | None = None) -> None:
        """Let no later epoch of trial ``index`` join the waiting send (``batch``, if given:
        only while it is the one waiting)."""
        with self._lock:
            if batch is None or self._epochs.get(index) is batch:
                self._epochs.pop(index, None)

    def log_masks(self, index: int, source: Path, name: str) -> None:
        """Upload a mask file; it is copied now, since checkpoints on storage get rotated.
        Best effort: a copy that fails (the checkpoint is gone, the disk is full) is a
        warning. The copy is removed once its upload is made or skipped, or at :meth:`close`
        when the outbox gave up on it."""
        keep: Path | None = None
        try:
            keep = Path(tempfile.mkdtemp(prefix="dst-masks-"))
            with self._lock:
                self._copies.add(keep)
            copy = keep / source.name
            shutil.copyfile(source, copy)
        except OSError as error:
            log.warning("could not copy the %s masks of trial %d: %s", name, index, error)
            if keep is not None:
                self._remove(keep)
            return
        self._put(
            index,
            f"{name} masks",
            lambda run: run.log_masks_file(copy, name),
            done=functools.partial(self._remove, keep),
        )

    def _remove(self, copy: Path) -> None:
        """Remove a mask copy (its upload is over, or given up)."""
        shutil.rmtree(copy, ignore_errors=True)
        with self._lock:
            self._copies.discard(copy)

    def log_figures(self, index: int, builders: Mapping[str, Callable[[], Figure]]) -> None:
        """Draw (on the outbox thread, not the caller's) and upload the trial's figures."""
        for name, build in builders.items():
            self._put(index, f"figure {name}", functools.partial(_log_figure, name, build))

    def finish(self, index: int, status: str) -> None:
        self._put(index, f"ending ({status})", lambda run: run.finish(status))

    def _run(self, index: int) -> TrialRun:
        """Trial ``index``'s run (a write for a trial whose run could not be made is skipped)."""
        run = self._runs.get(index)
        if run is None:
            raise RuntimeError(f"trial {index} has no MLflow run")
        return run

    def _put(
        self,
        index: int,
        what: str,
        write: Callable[[TrialRun], None],
        done: Callable[[], None] | None = None,
    ) -> None:
        self.outbox.put(f"{what} of trial {index}", lambda: write(self._run(index)), done)

    def close(self, timeout: float = 60.0) -> bool:
        """Wait (bounded) until every queued write is done; remove the mask copies of the
        uploads that were given up."""
        finished = self.outbox.close(timeout)
        with self._lock:
            left = list(self._copies)
        for copy in left:
            self._remove(copy)
        return finished
