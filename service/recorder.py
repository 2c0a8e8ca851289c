"""Recording trials as they run (in the Ray job driver): a Ray Tune callback.

Trials only train and report (:mod:`service.trial`). This callback, in the experiment's job
driver, turns Tune's events into the trial's row in the service database (state, epoch,
latest metrics, error, resume; the per-epoch history) and its MLflow child run (params, spec,
per-epoch metrics, the initial and final masks read from the reported checkpoint on the
shared storage, and at the end the trial's own figures). So the
database URL and the MLflow server are needed by the driver alone, never by a Ray worker,
and only one process writes each trial's state.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from service.core.config import Settings
from service.db import shared_engine
from service.states import TrialState
from service.tracking import ChildRuns, without_credentials
from service.trial import GPUS, INITIAL_MASKS, MASKS, METRICS, NODE, REMOVAL_LAYERS, RESUMED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


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
    if path and os.path.exists(path):
        return Path(path).read_text(errors="replace")[-limit:]
    return "the trial failed (Tune recorded no error text)"


class TrialRecorder(tune.Callback):
    """Writes what the trials of experiment ``experiment_id`` report to the database and
    (through ``runs``, which never blocks) to MLflow."""

    def __init__(
        self,
        engine: Engine,
        experiment_id: str,
        runs: ChildRuns | None,
        mask_root: Path | None = None,
    ) -> None:
        self.engine, self.experiment_id, self.runs = engine, experiment_id, runs
        self.mask_root = mask_root  # where finished trials' masks are kept for the analysis
        self._epochs: dict[int, int] = {}  # last epoch each trial reported to this driver
        self._initial_logged: set[int] = set()  # trials whose initial masks this driver logged

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Tune saves its callbacks with the experiment's state on storage: save only the
        experiment id (no database URL), and come back as this driver's own recorder."""
        return recorder_for, (self.experiment_id,)

    def store_run_id(self, index: int, run_id: str) -> None:
        """Remember trial ``index``'s MLflow run, so a resumed trial continues it."""
        self._record(index, mlflow_run_id=run_id)

    def _record(self, index: int, **fields: Any) -> None:
        with Session(self.engine) as session:
            crud.update_trial(session, self.experiment_id, index, **fields)
            if fields.get("metrics") is not None:  # an epoch: also into the trial's history
                crud.record_epoch(session, self.experiment_id, index, fields["metrics"])
            session.commit()

    def on_trial_start(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        """Running; a trial that already has epochs behind it resumes (its first epoch
        report says from which epoch; a Tune retry already shows it here)."""
        index = trial_index(trial)
        with Session(self.engine) as session:
            row = crud.get_trial(session, self.experiment_id, index)
            if row is None:
                log.error("trial %d of %s is not stored", index, self.experiment_id)
                return
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
                log.info("trial %d resumes after epoch %d", index, resumed)
            crud.update_trial(session, self.experiment_id, index, **fields)
            session.commit()
        if self.runs is not None:
            self.runs.start(index, label, spec, run_id, resumed)

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
        fields: dict[str, Any] = {"epoch": epoch, "metrics": metrics}
        resumed = result.get(RESUMED)  # the trial restored a checkpoint (e.g. DDP workers lost)
        if resumed is not None:
            log.info("trial %d resumed after epoch %d", index, resumed)
            fields["resumed_from_epoch"] = resumed
        self._record(index, **fields)
        if self.runs is not None:
            if resumed is not None:
                self.runs.mark_resumed(index, resumed)
            if epoch > last:  # an epoch repeated after a restore has the same values: log once
                self.runs.log_epoch(index, metrics)
        directory = checkpoint_dir(trial, result)
        epochs = resolve_training(RunSpec.model_validate(trial.config["trial"]["spec"])).epochs
        if directory is None or not (directory / MASKS).exists():
            return  # a dense run has no masks
        if index not in self._initial_logged and self.runs is not None:
            # every checkpoint holds the initial masks: the first one still on storage serves
            # (a multi-worker trial's first may be gone by the time its report arrives)
            self.runs.log_masks(index, directory / INITIAL_MASKS, "initial")
            self._initial_logged.add(index)
        if epoch == epochs:
            if self.runs is not None:
                self.runs.log_masks(index, directory / MASKS, "final")
            self._keep_masks(index, directory)

    def _placed(self, index: int, node: str, gpus: str) -> None:
        """The hosts and GPUs the trial (re)started on, in its row and as its run's tags."""
        self._record(index, node=node or None, gpus=gpus or None)
        if self.runs is not None:
            self.runs.mark_placement(index, node, gpus)

    def _keep_masks(self, index: int, directory: Path) -> None:
        """Copy a finished trial's initial and final masks (and its first update's per-layer
        removal-set Jaccard index) to the shared storage, where the API's structure analysis
        reads them (no MLflow round trip)."""
        if self.mask_root is None:
            return
        target = trial_masks_dir(self.mask_root, index)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(directory / INITIAL_MASKS, target / INITIAL)
        shutil.copyfile(directory / MASKS, target / FINAL)
        if (directory / REMOVAL_LAYERS).exists():
            shutil.copyfile(directory / REMOVAL_LAYERS, target / FIRST_REMOVAL)

    def on_trial_recover(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        """Failed, and Tune will retry it from its last checkpoint: keep the error visible."""
        self._record(trial_index(trial), error=f"retrying after: {error_text(trial, 1000)}")

    def on_trial_error(self, iteration: int, trials: list, trial: TuneTrial, **info: Any) -> None:
        index = trial_index(trial)
        self._record(
            index,
            state=TrialState.FAILED,
            error=error_text(trial),
            finished_at=datetime.now(UTC),
        )
        if self.runs is not None:
            self.runs.finish(index, TrialState.FAILED)

    def on_trial_complete(
        self, iteration: int, trials: list, trial: TuneTrial, **info: Any
    ) -> None:
        index = trial_index(trial)
        self._record(index, state=TrialState.SUCCEEDED, finished_at=datetime.now(UTC))
        if self.runs is not None:
            self.runs.log_figures(index, self._figures(index))
            self.runs.finish(index, TrialState.SUCCEEDED)

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
