"""Per-step cost of DST vs dense training of the same model on the same data, side by side.

Measures, in one process, in blocks whose order is shuffled every round (so machine noise and
cache effects hit both alike):
  * the time of a dense training step (forward, backward, SGD step),
  * the time of a DST step without a topology update: the same, with the masks enforced inside
    the SGD step (dst.optimizers.MaskedSGD, as dst.training runs it),
  * the time of one topology update (score, prune, grow, reset momentum),
and prints the per-step overhead of DST at each update period Δt:
  overhead(Δt) = (t_sparse + t_update / Δt) / t_dense - 1.
The DST/dense ratio is the median of per-round ratios (both blocks of a round run back to back,
so a slow spell of the machine hits both), with its quartiles; the ratios of the fastest and
of the median blocks are printed beside it to show how far the estimator moves the result.

Both models train with the same optimizer class, MaskedSGD: without masks it is PyTorch's fused
SGD (``torch.optim.SGD(fused=True)``), so the dense baseline is plain PyTorch.
Defaults: large-MLP on CIFAR-10-shaped data, batch 128, one thread.

    uv run python benchmarks/step_overhead.py [--threads 1] [--rounds 120] [--steps 5]
        [--kernel auto]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from dst.criteria import resolve_criterion
from dst.datasets import DataInfo
from dst.distributions import layer_densities
from dst.growth import GROWTH
from dst.masks import Masks, apply_masks, init_masks, prunable_weights
from dst.models import build_model
from dst.optimizers import KERNELS, Kernel, MaskedSGD
from dst.schedules import PruneSchedule
from dst.topology import TopologyUpdater

CIFAR10 = DataInfo("cifar10", "image", (3, 32, 32), 10)
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def make(model_name: str, device: torch.device) -> nn.Module:
    """The model with the same initial weights every time."""
    torch.manual_seed(0)
    return build_model(model_name, CIFAR10).to(device)


def sparsify(model: nn.Module, density: float, gen: torch.Generator, init: str = "er") -> Masks:
    """``init`` masks at ``density`` (as dst.training builds them), applied to the weights."""
    weights = prunable_weights(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    masks = init_masks(weights, layer_densities(shapes, density, init), gen)
    apply_masks(weights, masks)
    return masks


def topology_updater(criterion: str, growth: str, together: bool | None = None) -> TopologyUpdater:
    """The updater of a DST run (local scope, cosine ρ = 0.5) with a fixed generator; all
    layers at once or layer by layer as ``together`` says (None: as a run chooses)."""
    return TopologyUpdater(
        resolve_criterion(criterion),
        GROWTH.get(growth),
        PruneSchedule("cosine", 0.5, 800, 10**9),
        "local",
        torch.Generator().manual_seed(1),
        together=together,
    )


def optimizer(model: nn.Module, masks: Masks | None, kernel: Kernel) -> MaskedSGD:
    """The training loop's optimizer (Appendix A.2: momentum 0.9, Nesterov, weight decay)."""
    weights = prunable_weights(model)
    return MaskedSGD(
        model.parameters(),
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        nesterov=True,
        masks={weights[n]: m for n, m in masks.items()} if masks else None,
        kernel=kernel,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def interleaved(
    blocks: Mapping[str, Callable[[], float]], rounds: int, seed: int = 0
) -> dict[str, list[float]]:
    """Run every block once per round, in a freshly shuffled order each round."""
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        names = list(blocks)
        order.shuffle(names)
        for name in names:
            times[name].append(blocks[name]())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="large-mlp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=120, help="shuffled rounds of blocks")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--growth", default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default="auto", choices=KERNELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *CIFAR10.input_shape, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    dense = make(args.model, device)
    dense_opt = optimizer(dense, None, args.kernel)
    sparse = make(args.model, device)
    masks = sparsify(sparse, args.density, gen)
    sparse_opt = optimizer(sparse, masks, args.kernel)
    weights = prunable_weights(sparse)
    updater = topology_updater(args.criterion, args.growth)

    # seconds spent outside forward/backward (optimizer step, and topology update), per block
    in_step: dict[str, list[float]] = {"dense": [], "sparse": [], "update": []}
    spent = {"s": 0.0}

    def backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def after_backward(fn: Callable[[], object]) -> None:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        spent["s"] += time.perf_counter() - start

    def dense_step() -> None:
        backward(dense, dense_opt)
        after_backward(dense_opt.step)

    def sparse_step() -> None:
        backward(sparse, sparse_opt)
        after_backward(sparse_opt.step)

    def update_step() -> None:
        backward(sparse, sparse_opt)
        after_backward(lambda: (updater.update(weights, masks, sparse_opt, 800), sparse_opt.step()))

    def block(name: str, fn: Callable[[], None], steps: int) -> float:
        spent["s"] = 0.0
        seconds = timed(fn, steps, device)
        in_step[name].append(spent["s"] / steps)
        return seconds

    for fn in (dense_step, sparse_step, update_step):  # warm-up (and compile)
        timed(fn, 3, device)
    times = interleaved(
        {
            "dense": lambda: block("dense", dense_step, args.steps),
            "sparse": lambda: block("sparse", sparse_step, args.steps),
            "update": lambda: block("update", update_step, 3),
        },
        args.rounds,
    )
    report(args, times)
    report_components(times, in_step)


def report_components(times: dict[str, list[float]], in_step: dict[str, list[float]]) -> None:
    """The same overhead from its parts, with far less noise than whole steps.

    DST and dense run the same forward and backward (same shapes, same dense kernels; zeros are
    not skipped), so DST's extra cost is in what follows backward: the optimizer step and, every
    Δt steps, the topology update. Those are short (a few ms), so their per-round differences
    are precise; the forward+backward ratio is printed to show the assumption holds.
    """
    dense_opt, sparse_opt, update_opt = in_step["dense"], in_step["sparse"], in_step["update"]
    fb_ratio = statistics.median(
        paired(
            [t - o for t, o in zip(times["sparse"], sparse_opt, strict=True)],
            [t - o for t, o in zip(times["dense"], dense_opt, strict=True)],
        )
    )
    d_med = statistics.median(times["dense"])
    extra = [s - d for s, d in zip(sparse_opt, dense_opt, strict=True)]  # per step, per round
    u = statistics.median([x - s for x, s in zip(update_opt, sparse_opt, strict=True)])
    print(
        f"components: forward+backward DST/dense {fb_ratio:.4f}; optimizer step "
        f"{statistics.median(dense_opt) * 1e3:.3f} ms dense, "
        f"{statistics.median(sparse_opt) * 1e3:.3f} ms DST "
        f"(+{statistics.median(extra) * 1e3:.3f} ms, quartiles "
        f"{quartiles(extra)[0] * 1e3:+.3f} to {quartiles(extra)[2] * 1e3:+.3f}); "
        f"topology update {u * 1e3:.3f} ms"
    )
    for period in (100, 800):
        q1, q2, q3 = (q + u / period for q in quartiles(extra))
        print(
            f"DST overhead at Δt={period:<4d} from components {q2 / d_med * 100:+6.2f} %   "
            f"(quartiles {q1 / d_med * 100:+.2f} to {q3 / d_med * 100:+.2f} %)"
        )


def paired(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios a/b of two blocks timed in the same round (drift cancels)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (one value: that value three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    """Print step times, the DST/dense ratio and the overhead at Δt = 100 and 800.

    Three estimates of the ratio: fastest block over fastest block, median over median, and
    the median of the per-round ratios (each round times both blocks back to back, so a slow
    spell of the machine hits both). The overhead uses the per-round ratios; the other two show
    how far the estimator moves it.
    """
    dense, sparse = times["dense"], times["sparse"]
    d, s = min(dense), min(sparse)
    d_med, s_med = statistics.median(dense), statistics.median(sparse)
    ratio_q1, ratio, ratio_q3 = quartiles(paired(sparse, dense))
    # an update step minus a plain DST step of the same round, per step
    u = max(statistics.median([x - y for x, y in zip(times["update"], sparse, strict=True)]), 0)
    print(
        f"model={args.model} batch={args.batch} threads={args.threads} device={args.device} "
        f"density={args.density} criterion={args.criterion} growth={args.growth} "
        f"kernel={args.kernel} rounds={args.rounds} steps/block={args.steps}"
    )
    print(f"dense step        {d * 1e3:9.3f} ms fastest block, {d_med * 1e3:.3f} ms median")
    print(f"DST step (no upd) {s * 1e3:9.3f} ms fastest block, {s_med * 1e3:.3f} ms median")
    print(
        f"DST/dense ratio   {ratio:.4f} median of per-round ratios "
        f"(quartiles {ratio_q1:.4f}-{ratio_q3:.4f}); fastest blocks {s / d:.4f}, "
        f"median blocks {s_med / d_med:.4f}"
    )
    print(f"one mask update   {u * 1e3:9.3f} ms   = {u / d_med:.2f} dense steps")
    for period in (100, 800):
        overhead = ratio + u / (period * d_med) - 1
        spread = (ratio_q1 + u / (period * d_med) - 1, ratio_q3 + u / (period * d_med) - 1)
        fastest = (s + u / period) / d - 1
        print(
            f"DST overhead at Δt={period:<4d} {overhead * 100:+6.2f} %   "
            f"(quartiles {spread[0] * 100:+.2f} to {spread[1] * 100:+.2f} %; "
            f"from fastest blocks {fastest * 100:+.2f} %)"
        )


if __name__ == "__main__":
    main()
