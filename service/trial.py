"""The Ray Tune trial: one ``dst`` training run that reports per epoch and checkpoints.

Each epoch the trial logs its metrics to its MLflow child run, records its progress in the
service database, and reports to Tune with a checkpoint (model, optimizer, masks, LR schedule,
ITOP and every RNG state), so a failed trial resumes from its last epoch (Tune FailureConfig).
A trial with more than one worker runs a Ray Train ``TorchTrainer`` (DDP) instead.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from ray import tune
from sqlalchemy.orm import Session

from dst.spec import RunSpec
from dst.training import Metrics, Trainer
from service import crud
from service.core.config import Settings
from service.db import make_engine
from service.tracking import TAG_RESUMED, TrialRun

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class TrialContext:
    """Where a trial reports: its database row and its MLflow child run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.experiment_id: str = config["experiment_id"]
        self.index: int = config["index"]
        self.label: str = config["label"]
        self.spec = RunSpec.model_validate(config["spec"])
        self.tracking_uri: str = config["tracking_uri"]
        self.parent_run_id: str = config["parent_run_id"]
        # from the job's environment (DST_DATABASE_URL), never from the Tune config, which Tune
        # writes to its result files: the URL may hold a password
        self.engine = make_engine(Settings().database_url)

    def record(self, **fields: Any) -> None:
        """Update this trial's row in the service database."""
        with Session(self.engine) as session:
            crud.update_trial(session, self.experiment_id, self.index, **fields)
            session.commit()


def _save_checkpoint(trainer: Trainer, mlflow_run_id: str, metrics: Metrics) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {"trainer": trainer.state_dict(), "mlflow_run_id": mlflow_run_id},
            Path(tmp) / STATE_FILE,
        )
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _load_checkpoint() -> dict[str, Any] | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state: dict[str, Any] = torch.load(Path(directory) / STATE_FILE, weights_only=False)
    return state


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable; ``config["trial"]`` is built by :mod:`service.driver`."""
    config = config.get("trial", config)
    if config.get("workers", 1) > 1:
        run_distributed_trial(config)
        return
    torch.set_num_threads(max(1, int(config.get("cpus", 1))))
    ctx = TrialContext(config)
    trainer = Trainer(ctx.spec)
    state = _load_checkpoint()
    run_id = None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        run_id = state["mlflow_run_id"]
        log.info("trial %s resumes at epoch %d", ctx.index, trainer.epoch)
    mlrun = TrialRun.open(
        ctx.tracking_uri,
        ctx.parent_run_id,
        ctx.experiment_id,
        ctx.index,
        ctx.label,
        ctx.spec,
        run_id,
    )
    if state is None:
        mlrun.log_masks(trainer.initial_masks, "initial")
        ctx.record(
            state="running",
            epochs=trainer.config.epochs,
            mlflow_run_id=mlrun.run_id,
            started_at=datetime.now(UTC),
        )
    else:  # a retry after a failure: visible in MLflow, and the error is cleared
        mlrun.client.set_tag(mlrun.run_id, TAG_RESUMED, str(trainer.epoch))
        ctx.record(state="running", error=None)

    def on_epoch(metrics: Metrics) -> None:
        mlrun.log_epoch(metrics)
        ctx.record(epoch=int(metrics["epoch"]), metrics=metrics)
        _save_checkpoint(trainer, mlrun.run_id, metrics)

    try:
        trainer.fit(on_epoch=on_epoch)
    except Exception as error:
        ctx.record(error=f"{type(error).__name__}: {error}")
        raise
    mlrun.log_masks(trainer.masks, "final")
    mlrun.finish("succeeded")
    ctx.record(state="succeeded", finished_at=datetime.now(UTC))


def run_distributed_trial(config: dict[str, Any]) -> None:
    """Run the trial as a Ray Train ``TorchTrainer`` with ``workers`` DDP workers.

    Rank 0 reports; every worker trains on its shard. (Multi-GPU specifics such as per-rank
    device placement and checkpoint merging are completed by the multi-GPU follow-up issue.)
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = int(config["workers"])
    gpus = float(config.get("gpus", 0.0))
    trainer = TorchTrainer(
        train_loop_per_worker=_ddp_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": max(float(config.get("cpus", 1)) / workers, 0.01)},
        ),
        run_config=RunConfig(name=f"{config['experiment_id']}-{config['index']}-ddp"),
    )
    trainer.fit()


def _ddp_worker(config: dict[str, Any]) -> None:
    """Per-worker loop: DDP-wrapped model, sharded data; rank 0 logs and records."""
    import ray.train
    import ray.train.torch

    ctx = TrialContext(config)
    rank = ray.train.get_context().get_world_rank()
    trainer = Trainer(ctx.spec, device=ray.train.torch.get_device())
    trainer.model = ray.train.torch.prepare_model(trainer.model)
    trainer.train_loader = ray.train.torch.prepare_data_loader(trainer.train_loader)
    mlrun = None
    if rank == 0:
        mlrun = TrialRun.open(
            ctx.tracking_uri, ctx.parent_run_id, ctx.experiment_id, ctx.index, ctx.label, ctx.spec
        )
        mlrun.log_masks(trainer.initial_masks, "initial")
        ctx.record(state="running", epochs=trainer.config.epochs, mlflow_run_id=mlrun.run_id)

    def on_epoch(metrics: Metrics) -> None:
        if mlrun is not None:
            mlrun.log_epoch(metrics)
            ctx.record(epoch=int(metrics["epoch"]), metrics=metrics)
        ray.train.report(metrics)

    trainer.fit(on_epoch=on_epoch)
    if mlrun is not None:
        mlrun.log_masks(trainer.masks, "final")
        mlrun.finish("succeeded")
        ctx.record(state="succeeded", finished_at=datetime.now(UTC))
