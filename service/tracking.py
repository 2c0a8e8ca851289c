"""MLflow bookkeeping: one parent run per experiment, one nested child run per trial.

The API creates the MLflow experiment and the parent run before the Ray job is submitted, so
trials never race to create them. Trials log flattened params, per-epoch metrics, their spec
and their initial and final masks (compressed ``.npz``) to their child run.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dst.masks import Masks, save_masks
from dst.spec import RunSpec, flatten
from service.results import Results, format_table
from service.study import StudySpec, TrialPlan

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "dst-lab"
TAG_EXPERIMENT = "dst.experiment_id"
TAG_TRIAL = "dst.trial_index"
TAG_RESUMED = "dst.resumed_from_epoch"  # set on a child run when its trial resumed
PARENT_TAG = "mlflow.parentRunId"
RUN_STATUS = {  # the MLflow status that ends the run of an experiment or trial in this state
    "succeeded": RunStatus.to_string(RunStatus.FINISHED),
    "failed": RunStatus.to_string(RunStatus.FAILED),
    "cancelled": RunStatus.to_string(RunStatus.KILLED),
}


def _params(data: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in flatten(data).items()]


class MlflowTracker:
    """Creates and finishes parent runs; builds UI links (used by the API)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # created concurrently by another API replica
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
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
            return mlflow_experiment, existing[0].info.run_id
        run = self.client.create_run(
            mlflow_experiment,
            run_name=study.name,
            tags={TAG_EXPERIMENT: experiment_id, **study.tags},
        )
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=_params(study.base_run())[:100])
        self.client.log_dict(run_id, study.model_dump(mode="json"), "study.json")
        self.client.log_dict(run_id, {str(p.index): p.label for p in plans}, "trials.json")
        return mlflow_experiment, run_id

    def finish_parent(self, parent_run_id: str, status: str, results: Results) -> None:
        """Attach the results table (JSON and text) and close the parent run."""
        data = asdict(results)
        self.client.log_dict(parent_run_id, data, "results.json")
        self.client.log_text(
            parent_run_id, format_table(data["group_by"], data["rows"]), "results.txt"
        )
        self.client.set_terminated(parent_run_id, RUN_STATUS.get(status, "FINISHED"))

    def links(
        self, mlflow_experiment_id: str | None, parent_run_id: str | None
    ) -> dict[str, str | None]:
        """Addresses of the experiment and parent run in the MLflow UI."""
        base = self.tracking_uri.rstrip("/")
        web = base.startswith("http")
        exp = (
            f"{base}/#/experiments/{mlflow_experiment_id}" if web and mlflow_experiment_id else None
        )
        run = f"{exp}/runs/{parent_run_id}" if exp and parent_run_id else None
        return {"tracking_uri": self.tracking_uri, "experiment_url": exp, "parent_run_url": run}

    def ping(self) -> bool:
        """True when the tracking server answers."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception:
            return False
        return True


class TrialRun:
    """The child run of one trial (created once, reused when the trial resumes)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        parent_run_id: str,
        experiment_id: str,
        plan_index: int,
        label: str,
        spec: RunSpec,
        run_id: str | None = None,
    ) -> TrialRun:
        """Reuse ``run_id`` or create a child run under the parent, with params and spec."""
        client = MlflowClient(tracking_uri)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
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
        trial = cls(client, run.info.run_id)
        spec_data = spec.model_dump(mode="json")
        client.log_batch(trial.run_id, params=_params(spec_data))
        client.log_dict(trial.run_id, spec_data, "spec.json")
        return trial

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """Per-epoch metrics, stepped by epoch."""
        epoch = int(metrics["epoch"])
        now = int(mlflow.utils.time.get_current_time_millis())
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_masks(self, masks: Masks, name: str) -> None:
        """A mask set as ``masks/<name>.npz`` (packed bits, compressed)."""
        if not masks:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.npz"
            save_masks(masks, path)
            self.client.log_artifact(self.run_id, str(path), "masks")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FINISHED"))
