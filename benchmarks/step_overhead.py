"""Per-step cost of DST vs dense training of the same model on the same data, side by side.

Measures, in one process and interleaved (so machine noise hits both alike):
  * the mean time of a dense training step (forward, backward, SGD step),
  * the mean time of a DST step without a topology update (the same + mask enforcement),
  * the time of one topology update (score, prune, grow, reset momentum),
and prints the per-step overhead of DST at each update period Δt (each time is the fastest of
the interleaved rounds: the least disturbed by whatever else the machine runs):
  overhead(Δt) = (t_sparse + t_update / Δt) / t_dense - 1.

Defaults follow the issue: large-MLP on CIFAR-10-shaped data, batch 128, one thread.

    uv run python benchmarks/step_overhead.py [--threads 1] [--steps 60] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from dst.criteria import resolve_criterion
from dst.datasets import DataInfo
from dst.distributions import layer_densities
from dst.growth import GROWTH
from dst.masks import apply_masks, init_masks, mask_factors, prunable_weights
from dst.models import build_model
from dst.schedules import PruneSchedule
from dst.topology import TopologyUpdater

CIFAR10 = DataInfo("cifar10", "image", (3, 32, 32), 10)


def make(model_name: str, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(model_name, CIFAR10).to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    return model, opt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="large-mlp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved dense/DST blocks")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--growth", default="random")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *CIFAR10.input_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    dense, dense_opt = make(args.model, device)
    sparse, sparse_opt = make(args.model, device)
    weights = prunable_weights(sparse)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    masks = init_masks(weights, layer_densities(shapes, args.density, "er"), gen)
    apply_masks(weights, masks)
    factors = mask_factors(masks, weights)
    updater = TopologyUpdater(
        resolve_criterion(args.criterion),
        GROWTH.get(args.growth),
        PruneSchedule("cosine", 0.5, 800, 10**9),
        "local",
        torch.Generator().manual_seed(1),
    )

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def dense_step() -> None:
        step(dense, dense_opt)
        dense_opt.step()

    def sparse_step() -> None:
        step(sparse, sparse_opt)
        sparse_opt.step()
        apply_masks(weights, factors)

    def update() -> None:
        nonlocal factors
        step(sparse, sparse_opt)
        updater.update(weights, masks, sparse_opt, 800)
        factors = mask_factors(masks, weights)
        sparse_opt.step()
        apply_masks(weights, factors)

    for fn in (dense_step, sparse_step, update):  # warm-up
        timed(fn, 3, device)
    t_dense, t_sparse, t_update = [], [], []
    for _ in range(args.rounds):
        t_dense.append(timed(dense_step, args.steps, device))
        t_sparse.append(timed(sparse_step, args.steps, device))
        t_update.append(timed(update, 3, device) - t_sparse[-1])
    d, s, u = (min(t) for t in (t_dense, t_sparse, t_update))
    print(
        f"model={args.model} batch={args.batch} threads={args.threads} device={args.device} "
        f"density={args.density} criterion={args.criterion} growth={args.growth}"
    )
    print(f"dense step        {d * 1e3:9.3f} ms")
    print(f"DST step (no upd) {s * 1e3:9.3f} ms   ratio {s / d:.4f}")
    print(f"one mask update   {u * 1e3:9.3f} ms   = {u / d:.2f} dense steps")
    for period in (100, 800):
        overhead = (s + u / period) / d - 1
        print(f"DST overhead at Δt={period:<4d} {overhead * 100:+7.2f} %")


if __name__ == "__main__":
    main()
