"""The loader data path vs the tensor data path, side by side on CIFAR-10-format data.

Writes a CIFAR-10 of random images in the real on-disk format (python pickle batches, 50,000
train and 10,000 test images) to a temporary directory, then measures in one process, one
thread, alternating the two paths each round:
  * one epoch of input: every training batch of 45,000 images loaded and augmented (random
    crop of the image padded by 4 by reflection, horizontal flip, normalization), no model;
  * one training epoch of large-MLP (DST, density 0.1, Δt = 800, batch 128): input and steps.
Prints the seconds of each (median over rounds) and the loader/tensor ratios.

    uv run python benchmarks/data_path.py [--rounds 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from dst.spec import RunSpec
from dst.training import Trainer

log = logging.getLogger("benchmarks.data_path")


def write_cifar10(root: Path, seed: int = 0) -> None:
    """Random images as CIFAR-10's python batches (5 x 10,000 train, 10,000 test)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 10_000).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def spec(root: Path, data_path: str, device: str) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": "large-mlp",
            "dataset": "cifar10",
            "device": device,
            "training": {"epochs": 1, "batch_size": 128, "data_path": data_path},
            "sparsity": {"mode": "dst", "density": 0.1, "update_period": 800},
            "data": {"root": str(root), "download": False},
        }
    )


def input_epoch(loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    """Seconds to load and augment every training batch once (on ``device``)."""
    start = time.perf_counter()
    for x, _ in loader:
        x = x.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_epoch(trainer: Trainer) -> float:
    start = time.perf_counter()
    trainer.train_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(rounds: int, fn: Callable[[str], float]) -> dict[str, float]:
    """Median seconds of ``fn(path)`` for both paths, alternating which goes first."""
    times: dict[str, list[float]] = {"loader": [], "tensor": []}
    for r in range(rounds):
        order = ("loader", "tensor") if r % 2 == 0 else ("tensor", "loader")
        for path in order:
            times[path].append(fn(path))
    return {path: statistics.median(ts) for path, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar10(root)
        trainers = {p: Trainer(spec(root, p, args.device)) for p in ("loader", "tensor")}
        inputs = measure(args.rounds, lambda p: input_epoch(trainers[p].train_loader, args.device))
        epochs = measure(args.rounds, lambda p: train_epoch(trainers[p]))
    log.info("device %s, %d thread(s), median of %d rounds", args.device, args.threads, args.rounds)
    log.info("%-36s %10s %10s %8s", "", "loader s", "tensor s", "ratio")
    for name, t in (("input epoch (45,000 images)", inputs), ("large-MLP DST epoch", epochs)):
        ratio = t["loader"] / t["tensor"]
        log.info("%-36s %10.3f %10.3f %7.2fx", name, t["loader"], t["tensor"], ratio)


if __name__ == "__main__":
    main()
