"""Dense vs DST ResNet-50 on synthetic ImageNet-shaped data, side by side in one process.

For each batch size and each of fp32 / bf16 autocast, standard / channels-last batches:
  * images/s of a dense and of a DST training step (forward, backward, masked SGD step),
  * the DST/dense step-time ratio (median of per-round ratios: both run back to back in every
    round, in a shuffled order, so machine noise hits both alike),
  * the cost of one topology update (score, prune, grow, reset momentum), in dense steps,
  * the DST overhead per step at Δt = 800 and 100: ratio + update / (Δt · dense step) - 1,
  * peak GPU memory of each (CUDA only).
The paper's ImageNet setting (Appendix A.2): density 0.2, ERK, gradient growth; the steps are
the training loop's (dst.training: MaskedSGD with Nesterov momentum and weight decay, autocast
around forward and loss, channels-last inputs). Targets on a GPU: DST within 2 % of dense at
Δt = 800, and one topology update under one dense step.

    uv run python -m benchmarks.resnet50 --device cuda --batches 64 128 256
    uv run python -m benchmarks.resnet50 --device cpu --image-size 64 --batches 8 --rounds 3
    uv run python -m benchmarks.resnet50 --device cuda --batches 256 --profile-update
    uv run python -m benchmarks.resnet50 --device cuda --batches 64 --precision bf16 \
        --layouts nhwc --profile-steps
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.step_overhead import (
    interleaved,
    optimizer,
    paired,
    quartiles,
    sparsify,
    sync,
    timed,
    topology_updater,
)
from dst.datasets import DataInfo
from dst.kernels import resolve_kernel
from dst.masks import prunable_weights
from dst.models import build_model
from dst.optimizers import KERNELS


@dataclass(frozen=True)
class Setting:
    batch: int
    bf16: bool
    channels_last: bool

    def __str__(self) -> str:
        layout = "NHWC" if self.channels_last else "NCHW"
        return f"batch {self.batch:4d} {'bf16' if self.bf16 else 'fp32'} {layout}"


@dataclass(frozen=True)
class Measured:
    dense_s: float  # median seconds per dense step
    ratio: tuple[float, float, float]  # DST/dense step time: quartiles of per-round ratios
    update_s: float  # one topology update, seconds
    memory: tuple[float, float]  # peak GiB, dense and DST (0 off CUDA)


def build(info: DataInfo, device: torch.device) -> nn.Module:
    """ResNet-50 with the same initial weights every time."""
    torch.manual_seed(0)
    return build_model("resnet50", info).to(device)


@dataclass(frozen=True)
class Steps:
    """One setting's training steps, each on the same batch: dense, DST, and DST with a
    topology update before its optimizer step."""

    dense: Callable[[], None]
    sparse: Callable[[], None]
    update: Callable[[], None]


def training_steps(args: argparse.Namespace, setting: Setting, device: torch.device) -> Steps:
    """Two ResNet-50s with the same initial weights, one dense and one sparse (ERK masks, as
    A.2 for conv nets), and their steps as the training loop takes them."""
    info = DataInfo("imagenet", "image", (3, args.image_size, args.image_size), 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(setting.batch, *info.input_shape, generator=gen).to(device)
    if setting.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (setting.batch,), generator=gen).to(device)

    dense = build(info, device)
    dense_opt = optimizer(dense, None, args.kernel)
    sparse = build(info, device)
    masks = sparsify(sparse, args.density, gen, init="erk")
    weights = prunable_weights(sparse)
    sparse_opt = optimizer(sparse, masks, args.kernel)
    updater = topology_updater(args.criterion, args.growth)

    def backward(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.bf16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def dense_step() -> None:
        backward(dense, dense_opt)
        dense_opt.step()

    def sparse_step() -> None:
        backward(sparse, sparse_opt)
        sparse_opt.step()

    def update_step() -> None:
        backward(sparse, sparse_opt)
        updater.update(weights, masks, sparse_opt, 800)
        sparse_opt.step()

    steps = Steps(dense_step, sparse_step, update_step)
    for fn in (steps.dense, steps.sparse, steps.update):  # warm-up (cuDNN autotuning, kernels)
        timed(fn, 2, device)
    return steps


def measure(args: argparse.Namespace, setting: Setting, device: torch.device) -> Measured:
    steps = training_steps(args, setting, device)
    # after the warm-up: cuDNN's autotuning tries algorithms with large workspaces
    memory = (peak_memory(steps.dense, device), peak_memory(steps.sparse, device))
    blocks: dict[str, Callable[[], float]] = {
        "dense": lambda: timed(steps.dense, args.steps, device),
        "sparse": lambda: timed(steps.sparse, args.steps, device),
        "update": lambda: timed(steps.update, 1, device),
    }
    times = interleaved(blocks, args.rounds)
    update = statistics.median(
        [u - s for u, s in zip(times["update"], times["sparse"], strict=True)]
    )
    return Measured(
        statistics.median(times["dense"]),
        quartiles(paired(times["sparse"], times["dense"])),
        max(update, 0.0),
        memory,
    )


def peak_memory(step: Callable[[], None], device: torch.device) -> float:
    """Peak GiB allocated by two training steps (0 off CUDA)."""
    if device.type != "cuda":
        step()
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def profile_update(args: argparse.Namespace, device: torch.device) -> None:
    """Where one topology update's time goes, all layers at once and layer by layer: the
    median time of one update alone (no training step), its host synchronizations (CUDA),
    and PyTorch's profiler table of its operators (by self time on the device, or on the CPU
    off CUDA)."""
    info = DataInfo("imagenet", "image", (3, args.image_size, args.image_size), 1000)
    gen = torch.Generator().manual_seed(0)
    model = build(info, device)
    masks = sparsify(model, args.density, gen, init="erk")
    weights, opt = prunable_weights(model), optimizer(model, masks, args.kernel)
    x = torch.randn(args.batches[0], *info.input_shape, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batches[0],), generator=gen).to(device)
    nn.functional.cross_entropy(model(x), y).backward()
    for together in (True, False):
        updater = topology_updater(args.criterion, args.growth, together)
        for _ in range(2):  # warm-up (and the first update counts the active weights)
            updater.update(weights, masks, opt, 800)
        one_update = functools.partial(updater.update, weights, masks, opt, 800)
        seconds = [timed(one_update, 1, device) for _ in range(args.rounds)]
        how = "all layers at once" if together else "layer by layer"
        print(
            f"one update, {how}, over {len(weights)} layers: "
            f"{statistics.median(seconds) * 1e3:.2f} ms (median of {len(seconds)})"
        )
        profile_one(one_update, device)


def profile_one(update: Callable[[], object], device: torch.device) -> None:
    """PyTorch's profiler table of one call of ``update`` and, on CUDA, its host syncs."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        update()
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
        sync(device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    syncs = Counter(  # PyTorch's warning for each sync (not its one notice that the mode is new)
        f"{w.filename}:{w.lineno}"
        for w in caught
        if "called a synchronizing CUDA operation" in str(w.message)
    )
    print(f"host synchronizations: {sum(syncs.values())} {dict(syncs)}")


@dataclass(frozen=True)
class StepProfile:
    """Where one kind of training step spends its time, per step."""

    wall_ms: float  # timed outside the profiler
    busy_ms: float  # the GPU kernels' time (0 off CUDA)
    kernels: float  # GPU kernels launched (0 off CUDA)
    ops: dict[str, tuple[float, float]]  # operator -> (calls, self ms on the device, or host)


def step_profile(step: Callable[[], None], steps: int, device: torch.device) -> StepProfile:
    """``steps`` calls of ``step``, timed, then profiled with PyTorch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    wall = timed(step, steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    ops = {
        e.key: (
            e.count / steps,
            (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps,
        )
        for e in prof.key_averages()
    }
    return StepProfile(
        wall * 1e3,
        sum(k.time_range.elapsed_us() for k in kernels) / 1e3 / steps,
        len(kernels) / steps,
        ops,
    )


def profile_steps(args: argparse.Namespace, setting: Setting, device: torch.device) -> None:
    """A dense and a DST step side by side: wall time, GPU busy time and kernels per step,
    then the operators whose time or calls differ most. A step whose wall time exceeds its
    GPU time waits on the host (launches); one whose operators take longer is the GPU's."""
    steps = training_steps(args, setting, device)
    dense = step_profile(steps.dense, args.steps, device)
    sparse = step_profile(steps.sparse, args.steps, device)
    for name, p in (("dense", dense), ("DST", sparse)):
        busy = f"{p.busy_ms:7.2f} ms ({p.busy_ms / p.wall_ms:4.0%})" if p.kernels else "n/a"
        print(
            f"{setting!s:<24} {name:<5} {p.wall_ms:7.2f} ms a step, GPU busy {busy}, "
            f"{p.kernels:6.0f} GPU kernels, {sum(c for c, _ in p.ops.values()):6.0f} operators"
        )
    where = "device" if device.type == "cuda" else "host"
    names = set(dense.ops) | set(sparse.ops)

    def delta(name: str) -> tuple[float, float]:
        (dc, dt), (sc, st) = dense.ops.get(name, (0.0, 0.0)), sparse.ops.get(name, (0.0, 0.0))
        return abs(st - dt), abs(sc - dc)

    print(f"  {'operator, per step':<52} {'calls dense/DST':>17} {where + ' ms dense/DST':>24}")
    for name in sorted(names, key=delta, reverse=True)[:12]:
        (dc, dt), (sc, st) = dense.ops.get(name, (0.0, 0.0)), sparse.ops.get(name, (0.0, 0.0))
        print(f"  {name[:52]:<52} {dc:8.1f}/{sc:<8.1f} {dt:11.3f}/{st:.3f}")


def report(setting: Setting, m: Measured) -> None:
    q1, ratio, q3 = m.ratio
    dense_ips = setting.batch / m.dense_s
    steps = m.update_s / m.dense_s
    overhead = {p: (ratio + steps / p - 1) * 100 for p in (800, 100)}
    print(
        f"{setting!s:<24} dense {dense_ips:9.1f} img/s  DST {dense_ips / ratio:9.1f} img/s  "
        f"DST/dense {ratio:.4f} ({q1:.4f}-{q3:.4f})  update {steps:5.2f} dense steps  "
        f"overhead Δt=800 {overhead[800]:+6.2f} %  Δt=100 {overhead[100]:+6.2f} %  "
        f"memory {m.memory[0]:.2f}/{m.memory[1]:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=10, help="shuffled rounds of blocks")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--growth", default="gradient")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kernel", default="auto", choices=KERNELS, help="MaskedSGD's kernel")
    parser.add_argument(
        "--profile-update",
        action="store_true",
        help="time and profile one topology update, all layers at once and layer by layer "
        "(gradient of the first batch size, fp32), instead of the comparison",
    )
    parser.add_argument(
        "--profile-steps",
        action="store_true",
        help="profile --steps dense and DST steps of each setting side by side (time a step, "
        "GPU busy time, kernels, the operators that differ most), instead of the comparison",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    kernel = resolve_kernel(args.kernel, device.type, torch.float32).name  # what auto runs
    print(
        f"ResNet-50 on {name}; {args.image_size}px, density {args.density}, "
        f"{args.criterion}/{args.growth}, {kernel} kernel, {args.rounds} rounds x "
        f"{args.steps} steps; "
        f"torch {torch.__version__}"
    )
    if args.profile_update:
        profile_update(args, device)
        return
    for batch, precision, layout in itertools.product(args.batches, args.precision, args.layouts):
        setting = Setting(batch, precision == "bf16", layout == "nhwc")
        if args.profile_steps:
            profile_steps(args, setting, device)
        else:
            report(setting, measure(args, setting, device))


if __name__ == "__main__":
    main()
