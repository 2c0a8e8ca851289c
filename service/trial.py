"""The Ray Tune trial (runs on Ray workers): train one stored trial, report, checkpoint.

A trial only trains. When it (re)starts it first reports where it runs (:func:`placement`).
Each epoch it reports its metrics (under :data:`METRICS`) with a
checkpoint directory holding the whole training state (:data:`STATE_FILE`: model, optimizer,
masks, schedules, mask generator, ITOP, history), the initial and current masks as packed
bits and, with ``analysis.removal_sets``, the first update's per-layer removal-set Jaccard
index as JSON, so the job driver can record them without unpickling anything. With
``training.checkpoint_every_steps`` it also reports a checkpoint without metrics (under
:data:`STEP`) every N steps inside an epoch. It needs no database and
no MLflow: the driver's :class:`service.recorder.TrialRecorder` records what it reports.

A trial with one worker runs in its Tune process and resumes from Tune's checkpoint after a
failure. A trial with several workers runs a Ray Train ``TorchTrainer`` (DDP: gloo on CPU,
NCCL on GPU) from that process: rank 0 checkpoints, every rank restores the same state when
Train restarts the worker group after a failure, and Train's ``TuneReportCallback`` forwards
rank 0's reports (with the checkpoint's path) to Tune.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dst.spec import RunSpec

if TYPE_CHECKING:
    from dst.training import Metrics, Trainer

# torch and the trainer are imported in the functions that train: the job driver imports
# this module (for the trainable and its constants) and trains nothing
log = logging.getLogger(__name__)

METRICS = "dst"  # the key of a report's epoch metrics (Tune adds its own keys beside it)
RESUMED = "dst_resumed_from_epoch"  # in the first epoch report after a restore: its epoch
STEP = "dst_checkpoint_step"  # a report inside an epoch: only a checkpoint, at this global step
# a trial's first report after each start, before any epoch, says where it runs (placement)
NODE = "dst_node"  # the hosts of its training processes
GPUS = "dst_gpus"  # the GPUs Ray gave them
STATE_FILE = "state.pt"
INITIAL_MASKS = "masks_initial.npz"
MASKS = "masks.npz"
REMOVAL_LAYERS = "removal_first.json"  # per-layer removal-set Jaccard at the first update
DDP_MAX_FAILURES = 2  # worker-group restarts of one multi-worker trial
# How often Train's controller polls the workers (Ray's default: 2 s). A worker holds one
# unread report; its next report waits for the poll, so every report after the first costs up
# to one interval: at 2 s, seconds per epoch of a small trial. A poll is a cheap remote call,
# and one that has not answered yet is waited for at the next (not a failure).
TRAIN_POLL_S = 0.1
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # where Train reads it


@contextmanager
def checkpoint_directory(trainer: Trainer) -> Iterator[Path]:
    """A temporary directory holding the trainer's state and its masks."""
    import torch

    from dst.masks import save_masks

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        torch.save(trainer.state_dict(), directory / STATE_FILE)
        if trainer.initial_masks:
            save_masks(trainer.initial_masks, directory / INITIAL_MASKS)
            save_masks(trainer.masks, directory / MASKS)
        if trainer.first_removal_layers:
            (directory / REMOVAL_LAYERS).write_text(json.dumps(trainer.first_removal_layers))
        yield directory


def restore(trainer: Trainer, checkpoint: Any) -> dict[str, int]:
    """Load a reported checkpoint (a ``ray.train.Checkpoint``, or None) into ``trainer``;
    what the next report should add to say so (``{RESUMED: epoch}``, or nothing)."""
    if checkpoint is None:
        return {}
    import torch

    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=False, map_location="cpu")
    trainer.load_state_dict(state)
    log.info("resuming after epoch %d", trainer.epoch)
    return {RESUMED: trainer.epoch}


def placement(workers: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Where a trial's training processes run, as the API shows it (``node``, ``gpus``):
    ``workers`` holds each process's (host, Ray GPU ids), in rank order. The hosts each
    once, in rank order; the GPU ids, as ``host:id`` where the processes span several hosts;
    "" for no GPU.

    >>> placement([("a", ["0"]), ("a", ["1"]), ("b", ["0"])])
    {'dst_node': 'a,b', 'dst_gpus': 'a:0,a:1,b:0'}
    """
    hosts = list(dict.fromkeys(host for host, _ in workers))
    one_host = len(hosts) == 1
    gpus = ",".join(gpu if one_host else f"{host}:{gpu}" for host, ids in workers for gpu in ids)
    return {NODE: ",".join(hosts), GPUS: gpus}


def this_process() -> tuple[str, list[str]]:
    """This Ray worker's host and the ids of the GPUs Ray assigned it (a trial sharing a GPU
    sees that GPU's id, as do the trials beside it)."""
    import ray

    return socket.gethostname(), [str(gpu) for gpu in ray.get_gpu_ids()]


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable; ``config["trial"]`` is :func:`service.driver.trial_config`'s."""
    trial = config["trial"]
    if trial["workers"] > 1:
        _run_data_parallel(trial)
        return
    import torch
    from ray import tune

    from dst.training import Trainer

    checkpoint = tune.get_checkpoint()  # (taken before any report)
    tune.report(placement([this_process()]))  # at once: the data may take long to load
    torch.set_num_threads(max(1, int(trial["cpus"])))
    keep_to_gpu_share(float(trial["gpus"]))
    trainer = Trainer(RunSpec.model_validate(trial["spec"]))
    note: dict[str, Any] = restore(trainer, checkpoint)

    def report(metrics: Metrics) -> None:
        with checkpoint_directory(trainer) as directory:
            result = {METRICS: metrics, **note}
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))
        note.clear()

    def save() -> None:  # inside an epoch (``checkpoint_every_steps``)
        with checkpoint_directory(trainer) as directory:
            checkpoint = tune.Checkpoint.from_directory(directory)
            tune.report({STEP: trainer.step}, checkpoint=checkpoint)

    trainer.fit(on_epoch=report, on_checkpoint=save)


def keep_to_gpu_share(gpus: float) -> None:
    """Hold a trial given part of a GPU (``gpus_per_trial`` below 1: several trials share the
    GPU Ray assigned) to that part of the GPU's memory.

    Ray shares a GPU by bookkeeping only; PyTorch's caching allocator would let one trial take
    memory the trials beside it need. Capped, a trial that outgrows its share fails with an
    out-of-memory error of its own instead. (The CUDA context, a few hundred MiB per process,
    is outside the cap.)
    """
    if not 0 < gpus < 1:
        return
    import torch

    if torch.cuda.is_available():  # Ray's CUDA_VISIBLE_DEVICES: device 0 is the one assigned
        torch.cuda.set_per_process_memory_fraction(gpus, 0)
        log.info("this trial keeps to %.0f%% of the GPU's memory", 100 * gpus)


def _run_data_parallel(trial: dict[str, Any]) -> None:
    """Run the trial as a ``TorchTrainer`` of ``workers`` DDP workers, forwarding to Tune."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from service.study import Resources

    # read by the controller TorchTrainer starts (Train passes it on); an operator's value stays
    os.environ.setdefault(TRAIN_POLL_ENV, str(TRAIN_POLL_S))
    workers, gpus = int(trial["workers"]), float(trial["gpus"])
    res = Resources(cpus_per_trial=trial["cpus"], gpus_per_trial=gpus, workers_per_trial=workers)
    per_worker = res.per_worker()
    TorchTrainer(
        _data_parallel_worker,
        train_loop_config=trial,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            # the same name when Tune retries this trial or the driver is restarted, so Train
            # finds its own checkpoints again
            name=f"ddp-{tune.get_context().get_trial_id()}",
            storage_path=trial["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=DDP_MAX_FAILURES),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 callback
        ),
    ).fit()


def _data_parallel_worker(trial: dict[str, Any]) -> None:
    """One DDP worker: every rank trains its share of each global batch; rank 0 checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from dst.distributed import World, all_gather
    from dst.training import Trainer

    world = World.current()
    checkpoint = ray.train.get_checkpoint()  # (taken before any report)
    ray.train.report(placement(all_gather(this_process(), world)))  # every rank, as below
    torch.set_num_threads(max(1, int(float(trial["cpus"]) / world.size)))
    trainer = Trainer(
        RunSpec.model_validate(trial["spec"]), device=ray.train.torch.get_device(), world=world
    )
    note: dict[str, Any] = restore(trainer, checkpoint)  # every rank: the same state

    def send(result: dict[str, Any]) -> None:  # every rank reports; rank 0 checkpoints
        if world.rank != 0:
            ray.train.report(result)
            return
        with checkpoint_directory(trainer) as directory:
            ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def report(metrics: Metrics) -> None:
        send({METRICS: metrics, **note})
        note.clear()

    trainer.fit(on_epoch=report, on_checkpoint=lambda: send({STEP: trainer.step}))
