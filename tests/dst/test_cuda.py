"""The CUDA paths: the fused masked update, a training loop that does not synchronize the host
every step, and the fast options (bf16, channels-last, torch.compile, the tensor data path).

They need a CUDA device, which CI does not have; run them where one is:
``uv run pytest tests/dst/test_cuda.py``.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from dst.kernels import compiled_kernel
from dst.masks import density
from dst.optimizers import Kernel, MaskedSGD
from dst.spec import RunSpec
from dst.training import Trainer

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
    for kernel in ("compiled", "eager", "auto"):
        got = train(CUDA, kernel)
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_masked_update_is_one_fused_kernel_per_tensor() -> None:
    """The compiled update of n masked tensors launches at most n GPU kernels (the formula's
    six elementwise operations fused), where the eager one launches several per tensor."""
    from torch.profiler import ProfilerActivity, profile

    kernel = compiled_kernel("cuda")
    sizes = (4096, 65_536, 1_000_000)
    ps = [torch.randn(n, device=CUDA) for n in sizes]
    gs = [torch.randn(n, device=CUDA) for n in sizes]
    bufs = [torch.zeros(n, device=CUDA) for n in sizes]
    masks = [(torch.rand(n, device=CUDA) < 0.1).view(torch.uint8) for n in sizes]
    for _ in range(2):  # compile and warm up
        kernel.update(ps, gs, bufs, masks, 0.1, 5e-4, 0.9, True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        kernel.update(ps, gs, bufs, masks, 0.1, 5e-4, 0.9, True)
        torch.cuda.synchronize()
    launched = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert 1 <= len(launched) <= len(sizes), launched


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message))
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
