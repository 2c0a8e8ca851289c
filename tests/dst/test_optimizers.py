"""MaskedSGD: plain SGD without masks, exact zeros off the mask, one result whatever the kernel."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from dst.kernels import resolve_kernel
from dst.optimizers import KERNELS, MaskedSGD

HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
HAS_TRITON = importlib.util.find_spec("triton") is not None  # PyTorch's Linux wheels bring it
RUNNABLE = ["eager", "native", "compiled", "foreach"] + (["fused"] if HAS_TRITON else [])
NO_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="the fused kernel needs Triton")
EXACT_KERNELS = ["eager", "native", pytest.param("fused", marks=NO_TRITON), "compiled", "foreach"]


@pytest.fixture(autouse=True)
def _fused_runs_interpreted(triton_interpreter: None) -> None:
    """The ``fused`` kernel's Triton program runs on CPU tensors in Triton's interpreter."""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def masks_for(model: nn.Module, density: float = 0.4) -> dict[nn.Parameter, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            mask = torch.rand(module.weight.shape, generator=gen) < density
            with torch.no_grad():
                module.weight.mul_(mask)
            masks[module.weight] = mask
    return masks


def masked_setup(kernel: str) -> tuple[nn.Module, dict[nn.Parameter, torch.Tensor], MaskedSGD]:
    """A small MLP, random masks applied to its weights, and a MaskedSGD on ``kernel``."""
    model = mlp()
    masks = masks_for(model)
    opt = MaskedSGD(model.parameters(), masks=masks, kernel=kernel, **HYPER)  # type: ignore[arg-type]
    return model, masks, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, lr_at: int = -1) -> None:
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        if step == lr_at:  # as an LR schedule would
            for group in opt.param_groups:
                group["lr"] *= 0.1
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
@pytest.mark.parametrize("nesterov", [True, False])
def test_without_masks_it_is_torch_sgd(kernel: str, nesterov: bool) -> None:
    ours, ref = mlp(), mlp()
    train(ours, MaskedSGD(ours.parameters(), nesterov=nesterov, kernel=kernel, **HYPER), 6, 3)
    train(ref, torch.optim.SGD(ref.parameters(), nesterov=nesterov, **HYPER), 6, 3)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_hand_worked_masked_step(kernel: str) -> None:
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p.grad = torch.ones(4)
    mask = torch.tensor([True, False, True, False])
    with torch.no_grad():
        p.mul_(mask)
    opt = MaskedSGD([p], lr=0.1, momentum=0.9, masks={p: mask}, kernel=kernel)  # type: ignore[arg-type]
    opt.step()
    # d = m(g) = [1, 0, 1, 0]; b = d; step = d + 0.9 b = 1.9 d; θ = m(θ - 0.19 d)
    torch.testing.assert_close(p.detach(), torch.tensor([0.81, 0.0, 2.81, 0.0]))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([1.0, 0, 1.0, 0]))


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_weights_and_momentum_stay_exactly_zero_off_the_mask(kernel: str) -> None:
    model, masks, opt = masked_setup(kernel)
    for _ in range(5):
        train(model, opt, 1)
        for w, mask in masks.items():
            assert not w[~mask].any()
            assert not opt.state[w]["momentum_buffer"][~mask].any()
            assert w[mask].any()  # active weights do train


def test_every_kernel_gives_the_same_training() -> None:
    runs = []
    for kernel in RUNNABLE:
        model = mlp()
        masks = masks_for(model)
        opt = MaskedSGD(model.parameters(), masks=masks, kernel=kernel, **HYPER)  # type: ignore[arg-type]
        train(model, opt, 8, 4)
        runs.append(list(model.parameters()))
    for other in runs[1:]:  # the native build may fuse multiply-adds: equal to rounding
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_in_place_mask_edits_take_effect_at_the_next_step(kernel: str) -> None:
    model, masks, opt = masked_setup(kernel)
    train(model, opt, 2)
    w, mask = next(iter(masks.items()))
    flat = mask.view(-1)
    on, off = flat.nonzero()[0].item(), (~flat).nonzero()[0].item()
    flat[on], flat[off] = False, True  # as a topology update: prune one weight, grow another
    train(model, opt, 1)
    assert w.view(-1)[on] == 0 and opt.state[w]["momentum_buffer"].view(-1)[on] == 0
    assert w.view(-1)[off] != 0  # the grown weight trains from the next step on


def test_state_dict_round_trip_continues_identically() -> None:
    a, b = mlp(), mlp()
    ma, mb = masks_for(a), masks_for(b)
    oa = MaskedSGD(a.parameters(), masks=ma, **HYPER)  # type: ignore[arg-type]
    ob = MaskedSGD(b.parameters(), masks=mb, **HYPER)  # type: ignore[arg-type]
    train(a, oa, 3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint file would
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    train(a, oa, 2)
    train(b, ob, 2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_auto_runs_the_native_kernel_on_this_machine() -> None:
    """CI has a C compiler, so ``auto`` must really run native here, not fall back."""
    assert resolve_kernel("auto", "cpu", torch.float32).name == "native"
    assert resolve_kernel("auto", "cpu", torch.float64).name == "compiled"


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_weights_edited_off_the_mask_are_zeroed_before_the_next_update(kernel: str) -> None:
    model, masks, opt = masked_setup(kernel)
    train(model, opt, 2)
    w, mask = next(iter(masks.items()))
    with torch.no_grad():
        w[~mask] = 5.0  # breaks the invariant behind the optimizer's back
    opt.state[w]["momentum_buffer"][~mask] = 3.0
    train(model, opt, 1)
    assert not w[~mask].any()
    assert not opt.state[w]["momentum_buffer"][~mask].any()


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_replaced_weight_storage_is_followed(kernel: str) -> None:
    model, masks, opt = masked_setup(kernel)
    train(model, opt, 1)
    w, mask = next(iter(masks.items()))
    w.data = w.data.clone()  # e.g. a checkpoint loaded with assign=True
    before = w.detach().clone()
    train(model, opt, 1)
    assert not torch.equal(w[mask], before[mask])  # the new storage was updated
    assert not w[~mask].any()


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_loaded_momentum_is_zeroed_off_the_mask(kernel: str) -> None:
    model, masks, opt = masked_setup(kernel)
    train(model, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    for value in state["state"].values():
        value["momentum_buffer"].fill_(1.0)  # a checkpoint with junk off the mask
    opt.load_state_dict(state)
    train(model, opt, 1)
    for w, mask in masks.items():
        assert not opt.state[w]["momentum_buffer"][~mask].any()
        assert not w[~mask].any()


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_non_finite_momentum_off_the_mask_is_zeroed_not_kept(kernel: str) -> None:
    """A pruned weight whose momentum diverged (nan): nan·0 is nan, so the restore must
    fill, not multiply, or the nan comes back into the weight at the next step."""
    model, masks, opt = masked_setup(kernel)
    train(model, opt, 1)
    for w, mask in masks.items():  # as a checkpoint of a run whose pruned weights diverged
        opt.state[w]["momentum_buffer"][~mask] = float("nan")
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 2)
    for w, mask in masks.items():
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        off = opt.state[w]["momentum_buffer"][~mask]
        assert torch.equal(off, torch.zeros_like(off))


@pytest.mark.parametrize("kernel", [k for k in EXACT_KERNELS if k != "foreach"])
def test_a_non_finite_gradient_off_the_mask_never_reaches_the_weight(kernel: str) -> None:
    """``foreach`` masks gradients by multiplying and is documented not to keep this."""
    p = nn.Parameter(torch.tensor([1.0, 0.0, 3.0, 0.0]))
    mask = torch.tensor([True, False, True, False])
    opt = MaskedSGD([p], lr=0.1, momentum=0.9, masks={p: mask}, kernel=kernel)  # type: ignore[arg-type]
    for _ in range(2):
        p.grad = torch.tensor([1.0, float("inf"), 1.0, float("nan")])
        opt.step()
    assert torch.equal(p.detach()[~mask], torch.zeros(2))
    assert torch.equal(opt.state[p]["momentum_buffer"][~mask], torch.zeros(2))
    assert torch.isfinite(p.detach()).all()


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_autograd_sees_the_in_place_update(kernel: str) -> None:
    """Stepping between forward and backward must fail loudly, as with torch.optim.SGD: the
    native kernel writes raw memory, so it has to bump the version counters itself."""
    model, _, opt = masked_setup(kernel)
    train(model, opt, 1)
    loss = model(torch.randn(4, 12)).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_arguments_are_named() -> None:
    model = mlp()
    weight = model[0].weight
    with pytest.raises(ValueError, match="one of auto, native, fused, compiled, foreach, eager"):
        MaskedSGD(model.parameters(), lr=0.1, kernel="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bool tensor of its weight's shape"):
        MaskedSGD(model.parameters(), lr=0.1, masks={weight: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor"):
        MaskedSGD(model.parameters(), lr=0.1, masks={weight: torch.ones(weight.shape)})
    other = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="does not update"):
        MaskedSGD(model.parameters(), lr=0.1, masks={other: torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        MaskedSGD(model.parameters(), lr=0.1, momentum=0.0)
    assert set(KERNELS) == {"auto", "native", "fused", "compiled", "foreach", "eager"}
