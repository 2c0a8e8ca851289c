"""The CUDA paths: the masked update (one Triton kernel per group, or one kernel per tensor), a
training loop that does not synchronize the host
every step, and the fast options (bf16, channels-last, torch.compile, the tensor data path).

They need a CUDA device, which CI does not have; run them where one is:
``uv run pytest tests/dst/test_cuda.py``.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from dst.batches import GlobalBatchSampler, SampleKeys
from dst.criteria import CRITERIA, resolve_criterion
from dst.distributed import World
from dst.distributions import layer_densities
from dst.growth import GROWTH
from dst.kernels import compiled_kernel, fused_kernel, resolve_kernel
from dst.masks import Masks, apply_masks, density, init_masks, prunable_weights
from dst.optimizers import Kernel, MaskedSGD
from dst.schedules import PruneSchedule
from dst.selection import Segments, lowest_k
from dst.spec import RunSpec
from dst.tensor_data import ImageNorm, TensorBatches, TensorSplit
from dst.topology import TopologyUpdater
from dst.training import Trainer
from tests import ddp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def masked_mlp(device: torch.device) -> tuple[nn.Sequential, dict[nn.Parameter, torch.Tensor]]:
    """The same small MLP and 20 %-dense masks on any device (weights zero off the masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for layer in (model[0], model[2]):
        mask = torch.rand(layer.weight.shape, generator=gen) < 0.2
        with torch.no_grad():
            layer.weight.mul_(mask)
        masks[layer.weight] = mask
    model = model.to(device)  # moves the parameters' data: the same Parameter objects
    return model, {p: mask.to(device) for p, mask in masks.items()}


def train(device: torch.device, kernel: Kernel, steps: int = 5) -> list[torch.Tensor]:
    model, masks = masked_mlp(device)
    opt = MaskedSGD(model.parameters(), lr=0.1, weight_decay=5e-4, masks=masks, kernel=kernel)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen).to(device)
        y = torch.randint(0, 10, (32,), generator=gen).to(device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p, mask in masks.items():
        assert not p[~mask].any(), "a weight off its mask is not zero"
    return [p.detach().cpu() for p in model.parameters()]


def test_masked_update_on_cuda_matches_the_cpu() -> None:
    reference = train(torch.device("cpu"), "eager")
    for kernel in ("fused", "compiled", "foreach", "eager", "auto"):
        got = train(CUDA, kernel)
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


Flat = list[torch.Tensor]


def flat_case(sizes: tuple[int, ...]) -> tuple[Flat, Flat, Flat, Flat]:
    """Flat weights (zero off 10 %-dense byte masks), gradients, buffers and masks on the GPU."""
    masks = [(torch.rand(n, device=CUDA) < 0.1).view(torch.uint8) for n in sizes]
    ps = [torch.randn(n, device=CUDA) * m for n, m in zip(sizes, masks, strict=True)]
    gs = [torch.randn(n, device=CUDA) for n in sizes]
    bufs = [torch.zeros(n, device=CUDA) for n in sizes]
    return ps, gs, bufs, masks


def kernels_launched(update: Callable[[], None]) -> list[str]:
    """The GPU kernels one call of ``update`` launches, after two calls to compile and warm up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        update()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        update()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def test_compiled_update_is_one_fused_kernel_per_tensor() -> None:
    """The compiled update of n masked tensors launches at most n GPU kernels (the formula's
    six elementwise operations fused), where the eager one launches several per tensor."""
    kernel = compiled_kernel("cuda")
    sizes = (4096, 65_536, 1_000_000)
    case = flat_case(sizes)
    launched = kernels_launched(lambda: kernel.update(*case, 0.1, 5e-4, 0.9, True))
    assert 1 <= len(launched) <= len(sizes), launched


def test_auto_runs_the_fused_kernel_on_cuda() -> None:
    assert resolve_kernel("auto", "cuda", torch.float32).name == "fused"
    assert resolve_kernel("auto", "cuda", torch.bfloat16).name == "fused"


def test_fused_update_is_one_kernel_for_all_tensors_and_never_waits() -> None:
    """One launch updates every masked tensor of the group (with the gradients at addresses
    seen before), and new addresses are uploaded without the host waiting for the GPU."""
    kernel = fused_kernel("cuda", torch.float32)
    sizes = (100, 4096, 65_536, 1_000_000, 2_359_296)  # up to ResNet-50's largest conv
    ps, gs, bufs, masks = flat_case(sizes)
    launched = kernels_launched(lambda: kernel.update(ps, gs, bufs, masks, 0.1, 5e-4, 0.9, True))
    assert launched == ["masked_sgd_blocks"], launched
    moved = [g.clone() for g in gs]  # new addresses: new tables
    with counted_syncs() as syncs:
        kernel.update(ps, moved, bufs, masks, 0.1, 5e-4, 0.9, True)
    assert not syncs, syncs
    for p, b, m in zip(ps, bufs, masks, strict=True):
        assert not p[m == 0].any() and not b[m == 0].any()


SYNC_WARNING = "called a synchronizing CUDA operation"  # PyTorch's warning, one per sync


@contextmanager
def counted_syncs() -> Iterator[Counter[str]]:
    """Host synchronizations with the GPU inside the block, by the Python line that made them
    (PyTorch's synchronization debug mode). Only its per-operation warning counts: entering the
    mode warns once per process that it is a prototype, which synchronizes nothing."""
    syncs: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs.update(f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))


@pytest.mark.parametrize("n", [10, 1000, 300_000])
def test_lowest_k_on_cuda_is_the_cpu_selection(n: int) -> None:
    """The GPU's sort-based selection picks what the CPU's threshold selection picks, ties to
    the lowest position and NaN last included (values drawn from a few levels, so ties are
    many)."""
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(0, 7, (n,), generator=gen).float()
    values[torch.randperm(n, generator=gen)[: n // 10]] = -torch.inf
    values[torch.randperm(n, generator=gen)[: n // 10]] = torch.nan  # ranked after numbers
    for k in (1, n // 3, n - 1):
        assert torch.equal(lowest_k(values.to(CUDA), k).cpu(), lowest_k(values, k))


def test_segments_on_cuda_take_what_they_take_on_the_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [9, 1, 4000, 300_000, 70_000]
    values = torch.randint(0, 7, (sum(sizes),), generator=gen).float()
    values[torch.randperm(len(values), generator=gen)[: len(values) // 10]] = torch.nan
    ks = [3, 1, 0, 100_000, 69_999]
    on_cpu = Segments(sizes, torch.device("cpu")).lowest_k(values, ks)
    assert torch.equal(Segments(sizes, CUDA).lowest_k(values.to(CUDA), ks).cpu(), on_cpu)


def layered_state(device: torch.device) -> tuple[nn.Module, dict[str, nn.Parameter], Masks]:
    """A small MLP with 30 %-dense masks and the gradient of one batch, on ``device``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    weights = prunable_weights(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    masks = init_masks(
        weights, layer_densities(shapes, 0.3, "er"), torch.Generator().manual_seed(1)
    )
    apply_masks(weights, masks)
    model = model.to(device)
    masks = {n: m.to(device) for n, m in masks.items()}
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    return model, prunable_weights(model), masks


@pytest.mark.parametrize(
    ("criterion", "growth", "scope"),
    list(itertools.product(CRITERIA.names(), GROWTH.names(), ["local", "global"])),
)
def test_a_topology_update_on_cuda_is_the_cpu_update(
    criterion: str, growth: str, scope: str
) -> None:
    """Scores, selection and growth on the GPU choose exactly what they choose on the CPU."""
    results = []
    for device in (torch.device("cpu"), CUDA):
        _, weights, masks = layered_state(device)
        updater = TopologyUpdater(
            resolve_criterion(criterion),
            GROWTH.get(growth),
            PruneSchedule("constant", 0.3, 1, 10_000),
            scope,  # type: ignore[arg-type]
            torch.Generator().manual_seed(3),
        )
        changes = updater.update(weights, masks, None, 1)
        results.append(({n: m.cpu() for n, m in masks.items()}, changes))
    (cpu_masks, cpu_changes), (gpu_masks, gpu_changes) = results
    for name in cpu_masks:
        assert torch.equal(gpu_masks[name], cpu_masks[name]), name
        assert torch.equal(gpu_changes[name].new.cpu(), cpu_changes[name].new), name


@pytest.mark.parametrize("together", [True, False])
def test_a_topology_update_on_cuda_does_not_wait_for_the_device(together: bool) -> None:
    """Choosing, growing, zeroing and resetting momentum only queue work on the GPU (the
    paper's ImageNet setting: magnitude pruning, gradient growth), all layers at once or layer
    by layer. The first update counts every layer's active weights, in one wait; later ones
    know the counts. (On torch 2.11 an H200 showed, all layers at once, one more wait per
    update inside ``torch.cuda`` itself, from no line of ``dst``: allowed, and counted.)"""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(6)]).to(CUDA)
    weights = prunable_weights(model)
    masks = {n: torch.rand(w.shape, device=CUDA) < 0.3 for n, w in weights.items()}
    opt = MaskedSGD(model.parameters(), lr=0.1, masks={weights[n]: m for n, m in masks.items()})
    updater = TopologyUpdater(
        resolve_criterion("magnitude"),
        GROWTH.get("gradient"),
        PruneSchedule("constant", 0.3, 1, 10_000),
        "local",
        torch.Generator().manual_seed(3),
        together=together,
    )
    waits = []
    for step in (1, 2, 3):
        model(torch.randn(64, 128, device=CUDA)).square().mean().backward()
        opt.step()
        with counted_syncs() as syncs:
            changes = updater.update(weights, masks, opt, step)
        waits.append(syncs)
        assert all(len(c.grown) > 0 for c in changes.values())
    ours = [{line: n for line, n in w.items() if "/dst/" in line} for w in waits]
    assert sum(ours[0].values()) <= 1 and not ours[1] and not ours[2], waits
    assert sum(waits[0].values()) <= 2 and all(sum(w.values()) <= 1 for w in waits[1:]), waits


def test_augmented_tensor_batches_do_not_synchronize_per_batch() -> None:
    """Indices and the keyed draws (hashed on the host) reach the GPU through page-locked
    memory. (On torch 2.11 an H100 showed one synchronization in eight batches, inside
    ``torch.cuda``: not one per batch.)"""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (576, 3, 32, 32), dtype=torch.uint8, generator=gen)
    norm = ImageNorm((0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
    split = TensorSplit(images, torch.randint(0, 10, (576,)), norm, 4, True).to(CUDA)
    batches = iter(TensorBatches(split, SampleKeys(GlobalBatchSampler(576, 64, seed=0)), seed=0))
    next(batches)  # warm-up
    with counted_syncs() as syncs:
        for x, _ in batches:  # eight more
            assert x.shape == (64, 3, 32, 32) and x.is_cuda
    assert sum(syncs.values()) < 8, syncs


def digits_spec(**training: object) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": "small-mlp",
            "dataset": "digits",
            "device": "cuda",
            "training": {"epochs": 3, "batch_size": 32, "lr": 0.05, **training},
            "sparsity": {"mode": "dst", "density": 0.1, "update_period": 10_000},
        }
    )


@pytest.mark.parametrize("data_path", ["loader", "tensor"])
def test_a_training_epoch_does_not_synchronize_every_step(data_path: str) -> None:
    """The loop reads its sums once an epoch: a CUDA synchronization per step would cap a GPU
    at the host's pace. Counted with PyTorch's synchronization debug mode."""
    trainer = Trainer(digits_spec(data_path=data_path))
    trainer.train_epoch()  # warm-up: first allocations, cuBLAS handles
    steps = trainer.steps_per_epoch
    with counted_syncs() as syncs:
        trainer.train_epoch()
    assert steps > 20
    assert sum(syncs.values()) <= 4, f"{sum(syncs.values())} syncs in {steps} steps: {syncs}"


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("small-mlp", {"data_path": "tensor"}),
        ("small-cnn", {"data_path": "tensor", "precision": "bf16", "channels_last": True}),
        ("small-cnn", {"precision": "bf16", "channels_last": True, "compile": True}),
    ],
)
def test_fast_options_train_on_cuda(model: str, options: dict[str, object]) -> None:
    spec = RunSpec.model_validate(
        {
            "model": model,
            "dataset": "digits",
            "device": "cuda",
            "training": {"epochs": 6, "batch_size": 32, "lr": 0.1, **options},
            "sparsity": {"mode": "dst", "density": 0.5, "update_period": 20},
        }
    )
    trainer = Trainer(spec)
    history = trainer.fit()
    assert trainer.step > 20  # topology updates ran
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.7  # chance is 0.1; about 0.95 on a CPU
    assert trainer.sparsity is not None
    assert density(trainer.masks) == pytest.approx(density(trainer.initial_masks))
    for name, w in trainer.sparsity.weights.items():
        assert w.is_cuda
        assert not w[~trainer.sparsity.masks[name]].any()


def test_two_workers_sharing_the_gpu_do_what_one_worker_does(tmp_path: Path) -> None:
    """Data-parallel training on CUDA tensors: two ranks on this one GPU (gloo; NCCL wants a
    GPU per rank) train what one worker trains, topology updates on the GPU included."""
    spec = {
        "model": "small-mlp",
        "dataset": "digits",
        "device": "cuda",
        "training": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "sparsity": {"mode": "dst", "density": 0.1, "update_period": 5, "growth": "gradient"},
    }
    ranks = ddp.run_world(functools.partial(ddp.train, spec), 2, tmp_path)
    single = ddp.train(spec, World())
    keys = ("train_loss", "val_loss", "val_acc", "test_acc", "itop", "new_connections")
    for rank in ranks:
        for mine, ref in zip(rank["history"], single["history"], strict=True):
            for key in keys:
                assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
        for name, mask in single["masks"].items():  # summation orders differ: near-ties may
            assert torch.equal(rank["masks"][name], ranks[0]["masks"][name]), name
            shared = (rank["masks"][name].cpu() & mask.cpu()).sum() / mask.sum()  # flip
            assert shared > 0.99, (name, float(shared))


def test_a_trial_given_a_quarter_of_the_gpu_keeps_to_a_quarter_of_its_memory() -> None:
    """In a process of its own (the cap lasts a process's lifetime), as a Ray trial is."""
    code = """
import torch
from service.trial import keep_to_gpu_share
keep_to_gpu_share(0.25)
total = torch.cuda.get_device_properties(0).total_memory
kept = torch.empty(int(total * 0.2), dtype=torch.uint8, device="cuda")
try:
    torch.empty(int(total * 0.1), dtype=torch.uint8, device="cuda")
    print("not capped")
except torch.OutOfMemoryError:
    print("capped")
"""
    repo = Path(__file__).resolve().parents[2]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["capped"]
