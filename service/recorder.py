"""Recording trials as they run (in the Ray job driver): a Ray Tune callback.

Trials only train and report (:mod:`service.trial`). This callback, in the experiment's job
driver, turns Tune's events into the trial's row in the service database (state, epoch,
latest metrics, error, resume; the per-epoch history) and its MLflow child run (params, spec,
per-epoch metrics, the initial and final masks read from the reported checkpoint on the
shared storage, and at the end the trial's own figures). So the
database URL and the MLflow server are needed by the driver alone, never by a Ray worker,
and only one process writes each trial's state. Recording never ends a study and never
holds it up: Tune waits for its callbacks (and every trial's next report waits with it), so
the callbacks only queue their writes, the database's on one background thread and
MLflow's on another, each in order. What cannot be written (the database stays down, the
disk is full) is retried a bounded time, logged and skipped, while the trials train on.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dst.spec import RunSpec, resolve_training
from service import crud
from service.analysis import (
    FINAL,
    FIRST_REMOVAL,
    INITIAL,
    experiment_masks_dir,
    trial_masks_dir,
)
from service.backlog import Backlog
from service.core.config import Settings
from service.db import database_outage, shared_engine
from service.states import TrialState
from service.tracking import ChildRuns, Opening, without_credentials
from service.trial import GPUS, INITIAL_MASKS, MASKS, METRICS, NODE, REMOVAL_LAYERS, RESUMED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def trial_index(trial: TuneTrial) -> int:
    """The stored trial a Tune trial runs (its config is built by the driver)."""
    return int(trial.config["trial"]["index"])


def checkpoint_dir(trial: TuneTrial, result: dict[str, Any]) -> Path | None:
    """The directory of the checkpoint reported with ``result``.

    A multi-worker trial's report carries the path of Train's checkpoint; a single-worker
    trial's names its checkpoint directory inside the trial's directory.
    """
    if result.get("checkpoint_path"):
        return Path(result["checkpoint_path"])
    if result.get("checkpoint_dir_name") and trial.path:
        return Path(trial.path) / result["checkpoint_dir_name"]
    return None


def error_text(trial: TuneTrial, limit: int = 4000) -> str:
    """The end of the trial's error trace (Tune writes it next to the trial)."""
    path = trial.error_file
    if not path or not os.path.exists(path):
        return "the trial failed (Tune recorded no error text)"
    try:
        return Path(path).read_text(errors="replace")[-limit:]
    except OSError as error:  # the trial's end is recorded all the same
        return f"the trial failed (its error text could not be read: {error})"


# How long a database write is retried while the database is unreachable (restarting, locked,
# the disk full): a pause before each retry, on the recorder's own thread, where the writes
# queued behind it wait; the writes that last are given the longest.
FINAL_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # a trial's start, last epoch and end
PROGRESS_PAUSES_S = (1.0, 4.0)  # an epoch, a placement, a retry's error: a later one follows


def never_raises(callback: Callable[P, None]) -> Callable[P, None]:
    """A Tune callback that logs what fails instead of raising it: Tune would end the whole
    study on an error in a callback, and recording must never stop the training."""

    @functools.wraps(callback)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("recording failed in %s; the study goes on", callback.__name__)

    return guarded


class TrialRecorder(tune.Callback):
    """Writes what the trials of experiment ``experiment_id`` report to the database and
    (through ``runs``, which never blocks) to MLflow.

    No callback raises or waits on the database: its writes are queued, in order, on the
    recorder's thread (:meth:`wait` and :meth:`close` wait for them). A database write that
    fails with an outage (see :func:`~service.db.database_outage`) is retried after each of
    ``final_pauses_s`` when it lasts (a trial's start, its last epoch's metrics, its end)
    and after each of ``progress_pauses_s`` when a later report supersedes it (an epoch, a
    placement, a retry's error), then logged and skipped; any other failure is logged and
    skipped at once. The MLflow writes and the kept masks do not depend on the database
    write before them, except a trial's run, which its stored row names.
    """

    def __init__(
        self,
        engine: Engine,
        experiment_id: str,
        runs: ChildRuns | None,
        mask_root: Path | None = None,
    ) -> None:
        self.engine, self.experiment_id, self.runs = engine, experiment_id, runs
        self.mask_root = mask_root  # where finished trials' masks are kept for the analysis
        self.final_pauses_s: Sequence[float] = FINAL_PAUSES_S
        self.progress_pauses_s: Sequence[float] = PROGRESS_PAUSES_S
        self._epochs: dict[int, int] = {}  # last epoch each trial reported to this driver
        self._initial_logged: set[int] = set()  # trials whose initial masks this driver logged
        self._writes = Backlog("trial-recorder")  # the database writes, in order

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait at most ``timeout`` s until the database writes queued so far are made or
        skipped; True if they were."""
        return self._writes.wait(timeout)

    def close(self, timeout: float = 60.0, grace: float = 5.0) -> bool:
        """Wait at most ``timeout`` s for the queued database writes to be made or skipped;
        after that time each is tried once more, for ``grace`` s. True if all ended."""
        return self._writes.close(timeout, grace)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Tune saves its callbacks with the experiment's state on storage: save only the
        experiment id (no database URL), and come back as this driver's own recorder."""
        return recorder_for, (self.experiment_id,)

    def store_run_id(self, index: int, run_id: str) -> None:
        """Remember trial ``index``'s MLflow run, so a resumed trial continues it. Called on
        MLflow's outbox thread, which retries it through a database outage: errors raise."""
        self._write(index, mlflow_run_id=run_id)

    def _write(self, index: int, **fields: Any) -> None:
        """Update trial ``index``'s row (an epoch's ``metrics`` go to its history too)."""
        with Session(self.engine) as session:
            crud.update_trial(session, self.experiment_id, index, **fields)
            if fields.get("metrics") is not None:
                crud.record_epoch(session, self.experiment_id, index, fields["metrics"])
            session.commit()

    def _record(self, index: int, pauses: Sequence[float], **fields: Any) -> None:
        """Queue :meth:`_write`, retried through a database outage after each of ``pauses``."""
        what = f"{', '.join(fields)} of trial {index}"
        self._later(what, pauses, functools.partial(self._write, index, **fields))

    def _later(
        self,
        what: str,
        pauses: Sequence[float],
        call: Callable[[], T],
        answer: Future[Any] | None = None,
    ) -> None:
        """Queue ``call`` (retried as :meth:`_retry` does); its result goes to ``answer``."""

        def run() -> None:
            result = None
            try:
                result = self._retry(what, pauses, call)
            finally:
                if answer is not None:
                    answer.set_result(result)

        self._writes.put(run)

    def _retry(self, what: str, pauses: Sequence[float], call: Callable[[], T]) -> T | None:
        """``call``'s answer; after a database outage, ``call`` again after each of
        ``pauses``. None (and logged) when it failed for good."""
        for tries, pause in enumerate([*pauses, None], start=1):
            try:
                return call()
            except Exception as error:
                if not database_outage(error):
                    log.exception("recording %s failed; skipping it", what)
                    return None
                if pause is None or self._writes.overdue():
                    log.error(
                        "recording %s: the database is unreachable (%s); skipping it after "
                        "%d tries",
                        what,
                        error,
                        tries,
                    )
                    return None
                log.warning("recording %s failed, retrying in %.0f s: %s", what, pause, error)
                self._writes.pause(pause)
        return None  # not reached: the last pause is None

    def _open(self, index: int) -> Opening | None:
        """Mark trial ``index`` running; its label, spec, MLflow run and the epoch it resumes
        after (None if it has none behind it); None if the trial is not stored."""
        with Session(self.engine) as session:
            row = crud.get_trial(session, self.experiment_id, index)
            if row is None:
                log.error("trial %d of %s is not stored", index, self.experiment_id)
                return None
            resumed = row.epoch if row.epoch > 0 else None
            label, spec = row.label, RunSpec.model_validate_json(row.spec_json)
            run_id = row.mlflow_run_id
            # where it runs is unknown until its first report says (a retry may move it)
            fields: dict[str, Any] = {
                "state": TrialState.RUNNING,
                "error": None,
                "node": None,
                "gpus": None,
            }
            if row.started_at is None:
                fields["started_at"] = datetime.now(UTC)
            if resumed is not None:
                fields["resumed_from_epoch"] = resumed
            crud.update_trial(session, self.experiment_id, index, **fields)
            session.commit()
        if resumed is not None:
            log.info("trial %d resumes after epoch %d", index, resumed)
        return Opening(label, spec, run_id, resumed)

    @never_raises
    def on_trial_start(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        """Running; a trial that already has epochs behind it resumes (its first epoch
        report says from which epoch; a Tune retry already shows it here). Its MLflow run
        needs its row: the run is opened once the row is read, and without the database the
        trial gets none."""
        index = trial_index(trial)
        opening: Future[Opening | None] = Future()
        self._later(
            f"the start of trial {index}",
            self.final_pauses_s,
            functools.partial(self._open, index),
            opening,
        )
        if self.runs is not None:
            self.runs.start(index, opening.result)

    @never_raises
    def on_trial_result(
        self, iteration: int, trials: list, trial: TuneTrial, result: dict, **info: Any
    ) -> None:
        """Where the trial runs (its first report after each start); an epoch: its metrics,
        the initial masks after the first, the final after the last."""
        if NODE in result:
            self._placed(trial_index(trial), str(result[NODE]), str(result.get(GPUS) or ""))
        metrics = result.get(METRICS)
        if not metrics:
            return
        index, epoch = trial_index(trial), int(metrics["epoch"])
        last = self._epochs.get(index, 0)
        self._epochs[index] = max(last, epoch)  # a restore may replay several epochs
        epochs = resolve_training(RunSpec.model_validate(trial.config["trial"]["spec"])).epochs
        fields: dict[str, Any] = {"epoch": epoch, "metrics": metrics}
        resumed = result.get(RESUMED)  # the trial restored a checkpoint (e.g. DDP workers lost)
        if resumed is not None:
            log.info("trial %d resumed after epoch %d", index, resumed)
            fields["resumed_from_epoch"] = resumed
        final = epoch == epochs  # the trial's results: worth waiting for
        self._record(index, self.final_pauses_s if final else self.progress_pauses_s, **fields)
        if self.runs is not None:
            if resumed is not None:
                self.runs.mark_resumed(index, resumed)
            if epoch > last:  # an epoch repeated after a restore has the same values: log once
                self.runs.log_epoch(index, metrics)
        directory = checkpoint_dir(trial, result)
        if directory is None or not (directory / MASKS).exists():
            return  # a dense run has no masks
        if index not in self._initial_logged and self.runs is not None:
            # every checkpoint holds the initial masks: the first one still on storage serves
            # (a multi-worker trial's first may be gone by the time its report arrives)
            self.runs.log_masks(index, directory / INITIAL_MASKS, "initial")
            self._initial_logged.add(index)
        if final:
            if self.runs is not None:
                self.runs.log_masks(index, directory / MASKS, "final")
            self._keep_masks(index, directory)

    def _placed(self, index: int, node: str, gpus: str) -> None:
        """The hosts and GPUs the trial (re)started on, in its row and as its run's tags."""
        self._record(index, self.progress_pauses_s, node=node or None, gpus=gpus or None)
        if self.runs is not None:
            self.runs.mark_placement(index, node, gpus)

    def _keep_masks(self, index: int, directory: Path) -> None:
        """Copy a finished trial's initial and final masks (and its first update's per-layer
        removal-set Jaccard index) to the shared storage, where the API's structure analysis
        reads them (no MLflow round trip). Best effort: a failed copy is a warning."""
        if self.mask_root is None:
            return
        target = trial_masks_dir(self.mask_root, index)
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / INITIAL_MASKS, target / INITIAL)
            shutil.copyfile(directory / MASKS, target / FINAL)
            if (directory / REMOVAL_LAYERS).exists():
                shutil.copyfile(directory / REMOVAL_LAYERS, target / FIRST_REMOVAL)
        except OSError as error:
            log.warning("could not keep the masks of trial %d for the analysis: %s", index, error)

    @never_raises
    def on_trial_recover(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        """Failed, and Tune will retry it from its last checkpoint: keep the error visible."""
        error = f"retrying after: {error_text(trial, 1000)}"
        self._record(trial_index(trial), self.progress_pauses_s, error=error)

    @never_raises
    def on_trial_error(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        index = trial_index(trial)
        self._record(
            index,
            self.final_pauses_s,
            state=TrialState.FAILED,
            error=error_text(trial),
            finished_at=datetime.now(UTC),
        )
        if self.runs is not None:
            self.runs.finish(index, TrialState.FAILED)

    @never_raises
    def on_trial_complete(
        self, iteration: int, trials: list, trial: TuneTrial, **info: Any
    ) -> None:
        """Succeeded; its run gets its figures, drawn from the history once the writes
        before have landed, and ends."""
        index = trial_index(trial)
        fields = {"state": TrialState.SUCCEEDED, "finished_at": datetime.now(UTC)}
        self._record(index, self.final_pauses_s, **fields)
        if self.runs is not None:
            self._writes.put(functools.partial(self._end_run, index, self.runs))

    def _end_run(self, index: int, runs: ChildRuns) -> None:
        """Log a succeeded trial's figures to its run, then end the run (on the recorder's
        thread: the figures read the history written before)."""
        figures = self._retry(
            f"the figures of trial {index}",
            self.progress_pauses_s,
            functools.partial(self._figures, index),
        )
        runs.log_figures(index, figures or {})
        runs.finish(index, TrialState.SUCCEEDED)

    def _figures(self, index: int) -> dict[str, Callable[[], Figure]]:
        """A finished trial's own figures, from its history in the database."""
        from service.figures import trial_figures

        with Session(self.engine) as session:
            row = crud.get_trial(session, self.experiment_id, index)
            history = crud.trial_histories(session, self.experiment_id, [index]).get(index, [])
            if row is None:
                return {}
            spec = RunSpec.model_validate_json(row.spec_json)
        return trial_figures(spec, history)


@functools.cache
def recorder_for(experiment_id: str) -> TrialRecorder:
    """The recorder of this driver process, configured from its environment (``DST_*``).

    Cached, so a Tune experiment restored from storage gets the very recorder the driver
    holds (and waits for before it exits).
    """
    settings = Settings()
    engine = shared_engine(settings.database_url)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        parent_run_id = experiment.mlflow_parent_run_id if experiment else None
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow_tracking_uri
    recorder = TrialRecorder(
        engine, experiment_id, None, experiment_masks_dir(settings.storage_path, experiment_id)
    )
    log.info(
        "recording to the database at %s and MLflow at %s",
        engine.url.render_as_string(hide_password=True),
        without_credentials(tracking_uri) if tracking_uri else "(none)",
    )
    if tracking_uri and parent_run_id:
        recorder.runs = ChildRuns(tracking_uri, parent_run_id, experiment_id, recorder.store_run_id)
    else:
        log.warning(
            "experiment %s has no MLflow parent run: recording to the database only", experiment_id
        )
    return recorder
