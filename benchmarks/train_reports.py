"""How fast a multi-worker (DDP) trial gets through its epochs when Ray Train's controller
polls the workers every 2 s (Ray's default) and every ``service.trial.TRAIN_POLL_S`` (what
trials set), side by side.

A DDP trial reports every epoch (metrics and a checkpoint). A Train worker holds one unread
report, so each later report waits for the controller's next poll: with short epochs the poll
interval, not the training, sets the pace. This runs the product's trainable
(``service.trial.run_trial``) through the job driver's Tuner (``service.driver.make_tuner``)
on a local Ray started for each run: one 2-worker trial (gloo) of small-mlp on digits, the two
settings alternating round by round. It prints the seconds per epoch (between the first and
the last epoch report, so start-up is left out) and the wall time of each run, and their ratio.

    uv run python -m benchmarks.train_reports [--epochs 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from service.study import Resources, StudySpec, expand
from service.trial import METRICS, TRAIN_POLL_ENV, TRAIN_POLL_S

RAY_DEFAULT_POLL_S = 2.0


class EpochClock(tune.Callback):
    """When each epoch report reaches the Tune driver."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if METRICS in result:
            self.times.append(time.monotonic())


def trial(epochs: int, storage: Path) -> tuple[dict[str, Any], Resources]:
    """The Tune config of a 2-worker DDP trial, as the driver builds it from a stored trial."""
    from service.db import Trial
    from service.driver import trial_config

    resources = Resources(cpus_per_trial=1, workers_per_trial=2)
    study = StudySpec.model_validate(
        {
            "name": "train-reports",
            "model": "small-mlp",
            "dataset": "digits",
            "training": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
            "sparsity": {"density": 0.1, "update_period": 10},
        }
    )
    (plan,) = expand(study)
    stored = Trial(index=plan.index, label=plan.label, spec_json=plan.spec.model_dump_json())
    return trial_config(stored, resources, str(storage)), resources


def run(poll_s: float | None, epochs: int, storage: Path) -> tuple[float, float]:
    """Seconds per epoch and the whole run's seconds, with the controller polling every
    ``poll_s`` (None: as the trial sets it)."""
    import ray

    from service.driver import make_tuner

    if poll_s is None:
        os.environ.pop(TRAIN_POLL_ENV, None)
    else:  # the local Ray started below, and so every trial process, inherits it
        os.environ[TRAIN_POLL_ENV] = str(poll_s)
    config, resources = trial(epochs, storage)
    clock = EpochClock()
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    try:
        name = f"run-{time.monotonic_ns()}"
        start = time.monotonic()
        make_tuner(str(storage / name), [config], resources, name, [clock]).fit()
        wall = time.monotonic() - start
    finally:
        ray.shutdown()
        os.environ.pop(TRAIN_POLL_ENV, None)
    if len(clock.times) != epochs:
        raise RuntimeError(f"{len(clock.times)} epoch reports of {epochs}: the trial failed")
    return (clock.times[-1] - clock.times[0]) / (epochs - 1), wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = {f"Ray's default ({RAY_DEFAULT_POLL_S:g} s)": RAY_DEFAULT_POLL_S,
                f"trials' ({TRAIN_POLL_S:g} s)": None}  # fmt: skip
    per_epoch: dict[str, list[float]] = {name: [] for name in settings}
    walls: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="dst-train-reports-") as tmp:
        for round_ in range(args.rounds):
            order = list(settings.items())
            for name, poll_s in order if round_ % 2 == 0 else order[::-1]:
                epoch_s, wall = run(poll_s, args.epochs, Path(tmp))
                per_epoch[name].append(epoch_s)
                walls[name].append(wall)
    print(f"one 2-worker DDP trial (gloo), small-mlp on digits, {args.epochs} epochs; "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'controller poll':<24} {'s / epoch':>10} {'run (s)':>9}")
    for name in settings:
        epoch_s, wall = statistics.median(per_epoch[name]), statistics.median(walls[name])
        print(f"{name:<24} {epoch_s:>10.3f} {wall:>9.1f}")
    slow, fast = (statistics.median(per_epoch[name]) for name in settings)
    print(f"seconds per epoch, Ray's default / trials': {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
