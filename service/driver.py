"""The Ray Job driver of one experiment: runs the study's trials as one Ray Tune experiment.

Started by the Jobs API as ``python -m service.driver --experiment-id ID`` with the service's
database URL, MLflow URI and storage path in its environment. If the Tune experiment already
exists on storage (the job was restarted), it is restored and unfinished trials resume from
their last checkpoints. SIGTERM (``ray job stop``) is turned into the SIGINT that makes Tune
stop gracefully and save its state.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import ray
from ray import tune
from sqlalchemy.orm import Session

from service import crud
from service.core.config import Settings
from service.db import make_engine
from service.study import StudySpec, expand
from service.trial import run_trial

log = logging.getLogger("service.driver")


def trial_configs(
    experiment_id: str, study: StudySpec, settings: Settings, tracking_uri: str, parent_run_id: str
) -> list[dict[str, Any]]:
    """One Tune config per trial: everything the trial needs, nothing it must look up."""
    res = study.resources
    return [
        {
            "experiment_id": experiment_id,
            "index": plan.index,
            "label": plan.label,
            "spec": plan.spec.model_dump(mode="json"),
            "tracking_uri": tracking_uri,
            "parent_run_id": parent_run_id,
            "cpus": res.cpus_per_trial,
            "gpus": res.gpus_per_trial,
            "workers": res.workers_per_trial,
        }
        for plan in expand(study)
    ]


def make_tuner(path: str, configs: list[dict[str, Any]], study: StudySpec, name: str) -> tune.Tuner:
    """A new Tune experiment over the trials, or the saved one at ``path`` restored."""
    res = study.resources
    resources = {
        "cpu": 0.01 if res.workers_per_trial > 1 else res.cpus_per_trial,
        "gpu": 0.0 if res.workers_per_trial > 1 else res.gpus_per_trial,
    }
    trainable = tune.with_resources(run_trial, resources)
    if tune.Tuner.can_restore(path):
        log.info("restoring Tune experiment from %s", path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=res.max_concurrent_trials,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            reuse_actors=True,  # trials share warm worker processes (imports, data)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=os.path.dirname(path),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )


def _trial_name(trial: tune.experiment.Trial) -> str:
    """``trial-3`` rather than Tune's default, which spells out the whole config."""
    return f"trial-{_unwrap(trial.config)['index']}"


def _unwrap(config: dict[str, Any]) -> dict[str, Any]:
    inner: dict[str, Any] = config.get("trial", config)
    return inner


def _sigterm_to_sigint(signum: int, frame: FrameType | None) -> None:
    log.warning("stop requested: letting Tune save its state")
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, args.experiment_id)
        if experiment is None:
            raise SystemExit(f"experiment {args.experiment_id} is not in the database")
        study = StudySpec.model_validate_json(experiment.spec_json)
        parent_run_id = experiment.mlflow_parent_run_id or ""
        crud.set_experiment_status(session, args.experiment_id, "running")
        session.commit()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.mlflow_tracking_uri or ""
    configs = trial_configs(args.experiment_id, study, settings, tracking_uri, parent_run_id)
    path = str(settings.storage_path / "ray_results" / args.experiment_id)
    ray.init(address="auto", log_to_driver=True)
    signal.signal(signal.SIGTERM, _sigterm_to_sigint)
    tuner = make_tuner(path, configs, study, args.experiment_id)
    results = tuner.fit()
    with Session(engine) as session:
        experiment = crud.get_experiment(session, args.experiment_id)
        if experiment is not None and experiment.status == "cancelling":
            moved = crud.finish_unfinished_trials(session, args.experiment_id, "cancelled")
            session.commit()
            log.info("experiment %s cancelled; %d trials stopped", args.experiment_id, moved)
            return
        for i in range(len(results)):
            result = results[i]
            config = _unwrap(result.config or {})
            if result.error is not None and "index" in config:
                crud.update_trial(
                    session,
                    args.experiment_id,
                    config["index"],
                    state="failed",
                    error=str(result.error)[:4000],
                    finished_at=datetime.now(UTC),
                )
        session.commit()
    log.info("experiment %s: %d trials done", args.experiment_id, len(results))


if __name__ == "__main__":
    main()
