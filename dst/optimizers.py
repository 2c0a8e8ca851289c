"""SGD that keeps masked weights at zero inside its own update (Appendix A.2 recipe, Section 3.1).

The paper's training loop is SGD with momentum 0.9, Nesterov and weight decay, with the masks
enforced after every optimizer step. Enforcing them as a separate pass (``w *= mask``) reads and
writes every weight once more per step: about 4% of a large-MLP step on one CPU thread, more
than all topology updates cost at Δt = 800 (``benchmarks/mask_enforcement.py``).
:class:`MaskedSGD` folds the mask into the update instead. With ``m`` the mask (1 active,
0 inactive), for every masked weight tensor::

    d = m ⊙ (∇θ + wd·θ)
    b = m ⊙ (μ·b + d)                      (momentum buffer)
    θ = m ⊙ (θ − lr·(d + μ·b))             (Nesterov; plain momentum: θ − lr·b)

Without a mask this is ``torch.optim.SGD(momentum=μ, nesterov=..., weight_decay=wd)``, and
unmasked parameters (biases, normalization layers, every parameter of a dense run) are updated
by exactly that: PyTorch's fused SGD kernel. With a mask, inactive weights *and their momentum*
are exactly zero after every step, so a weight grown by a topology update starts from zero
momentum as well.

Kernels for the masked tensors: ``compiled`` runs :func:`masked_sgd_update` through
``torch.compile``, one call per step for all masked tensors, so each is read and written once
in a fused loop (C++ on the CPU, Triton on CUDA); ``eager`` runs PyTorch's SGD and then masks
weights and momentum (no compiler, two more passes); ``auto`` compiles where the machine can
and otherwise falls back to ``eager`` with a warning. On one CPU thread (large-MLP, density
0.1) the compiled update costs about 0.3-0.5 ms per step more than dense fused SGD, the eager
one about 3 ms more (``benchmarks/mask_enforcement.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, cast, get_args

import torch
from torch import nn
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.optim.sgd import sgd as torch_sgd

log = logging.getLogger(__name__)

Kernel = Literal["auto", "compiled", "eager"]
KERNELS: tuple[Kernel, ...] = get_args(Kernel)
_COMPILABLE_DEVICES = ("cpu", "cuda")

_FUSED_DEVICES = tuple(_get_fused_kernels_supported_devices())

# (weights, grads, momentum buffers, byte masks: lists of flat tensors; lr, weight decay,
#  momentum, nesterov) -> None
MaskedUpdate = Callable[..., None]


def masked_sgd_update(
    p: torch.Tensor,
    g: torch.Tensor,
    buf: torch.Tensor,
    mask: torch.Tensor,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """One masked SGD step in the form the compiler fuses into a single loop (flat ``[n]``).

    ``mask`` is the bool mask viewed as ``uint8``: the CPU code generator vectorizes a byte
    load but not a bool one. Written out of place so the hyperparameters stay symbolic inputs
    (LR decay does not recompile); run eagerly it would allocate several temporaries.
    """
    keep = mask.to(p.dtype)  # [n] 0/1
    d = (g + weight_decay * p) * keep  # [n]
    b = (momentum * buf + d) * keep  # [n]
    step = d + momentum * b if nesterov else b  # [n]
    buf.copy_(b)
    p.copy_((p - lr * step) * keep)


def _each(update: Callable[..., None]) -> MaskedUpdate:
    """Apply a one-tensor update to parallel lists of tensors."""

    def apply(
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        bufs: list[torch.Tensor],
        masks: list[torch.Tensor],
        lr: float,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
    ) -> None:
        for p, g, buf, mask in zip(params, grads, bufs, masks, strict=True):
            update(p, g, buf, mask, lr, weight_decay, momentum, nesterov)

    return apply


def dense_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """PyTorch's own SGD step (its fused kernel where the device has one) on unmasked tensors."""
    torch_sgd(
        params,
        grads,
        cast(list[torch.Tensor | None], bufs),
        fused=all(p.device.type in _FUSED_DEVICES for p in params),
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        dampening=0.0,
        maximize=False,
    )


@torch.no_grad()
def eager_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    masks: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """The same update without a compiler: PyTorch's SGD, then weights and momentum are masked.

    For active entries (m = 1) this is the update above; inactive ones end at zero either way.
    """
    dense_update(params, grads, bufs, lr, weight_decay, momentum, nesterov)
    for p, buf, mask in zip(params, bufs, masks, strict=True):
        keep = mask.view(torch.bool)  # [n]
        p.mul_(keep)
        buf.mul_(keep)


@functools.cache
def compiled_update(device_type: str) -> MaskedUpdate:
    """:func:`masked_sgd_update` over lists, compiled once per process for ``device_type``.

    One call updates every masked tensor (a call into compiled code has a fixed cost of tens of
    microseconds). ``dynamic=True`` keeps tensor sizes symbolic, so a new model with the same
    number of masked tensors usually reuses the code. A tiny update runs here, so a machine
    that cannot compile fails before any weight is touched.
    """
    update = cast(MaskedUpdate, torch.compile(_each(masked_sgd_update), dynamic=True))
    device = torch.device(device_type)
    p, g, buf = (torch.zeros(16, device=device) for _ in range(3))
    mask = torch.ones(16, dtype=torch.uint8, device=device)
    update([p], [g], [buf], [mask], 0.1, 0.0, 0.9, True)
    return update


@functools.cache
def _auto_update(device_type: str) -> MaskedUpdate:
    """The compiled update where this machine can compile for ``device_type``, else eager."""
    if device_type in _COMPILABLE_DEVICES:
        try:
            return compiled_update(device_type)
        except Exception as error:  # no C++ compiler, no Triton, an unsupported platform...
            first_line = str(error).splitlines()[0] if str(error) else ""
            log.warning(
                "cannot compile the masked SGD update on %s (%s: %s); using the eager kernel, "
                "which gives the same result more slowly",
                device_type,
                type(error).__name__,
                first_line,
            )
    return eager_update


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum, Nesterov and weight decay that enforces masks inside its update.

    ``masks`` maps a parameter to its bool mask (same shape and device). The optimizer keeps a
    byte view of each mask, not a copy, so in-place mask edits (topology updates, checkpoint
    loads) take effect at the next step. The state layout is ``torch.optim.SGD``'s
    (``state[p]["momentum_buffer"]``), so topology updates can reset it per weight.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        masks: Mapping[nn.Parameter, torch.Tensor] | None = None,
        kernel: Kernel = "auto",
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(params, defaults)
        self.kernel: Kernel = kernel
        self._masks: dict[nn.Parameter, torch.Tensor] = {}
        self.set_masks(masks or {})

    def set_masks(self, masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
        """Attach (or replace) the masks; each must be a bool tensor of its parameter's shape."""
        known = {p for group in self.param_groups for p in group["params"]}
        checked: dict[nn.Parameter, torch.Tensor] = {}
        for p, mask in masks.items():
            if p not in known:
                raise ValueError("a mask was given for a parameter this optimizer does not update")
            if mask.dtype != torch.bool or mask.shape != p.shape or mask.device != p.device:
                raise ValueError(
                    f"a mask must be a bool tensor of its weight's shape and device: got "
                    f"{mask.dtype} {tuple(mask.shape)} on {mask.device} for a weight of shape "
                    f"{tuple(p.shape)} on {p.device}"
                )
            if not mask.is_contiguous():
                raise ValueError("a mask must be contiguous")
            checked[p] = mask.view(torch.uint8)
        self._masks = checked

    def masked_update(self, device: torch.device) -> MaskedUpdate:
        """The update this optimizer runs on the masked tensors of ``device``."""
        if self.kernel == "eager":
            return eager_update
        if self.kernel == "compiled":
            return compiled_update(device.type)
        return _auto_update(device.type)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every parameter that has a gradient; masked ones stay zero off their mask."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        hyper = (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"])
        dense: list[nn.Parameter] = []
        masked: dict[torch.device, list[nn.Parameter]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MaskedSGD does not support sparse gradients")
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            if p in self._masks:
                masked.setdefault(p.device, []).append(p)
            else:
                dense.append(p)
        for device, params in masked.items():
            self.masked_update(device)(
                [_flat(p) for p in params],
                [_flat(_grad(p)) for p in params],
                [_flat(self.state[p]["momentum_buffer"]) for p in params],
                [self._masks[p].view(-1) for p in params],
                *hyper,
            )
        if dense:
            dense_update(
                list(dense),
                [_grad(p) for p in dense],
                [self.state[p]["momentum_buffer"] for p in dense],
                *hyper,
            )


def _grad(p: nn.Parameter) -> torch.Tensor:
    assert p.grad is not None  # parameters without a gradient are skipped before this
    return p.grad


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor (the update writes through it)."""
    if not t.is_contiguous():
        raise RuntimeError("MaskedSGD needs contiguous masked weights, gradients and buffers")
    return t.view(-1)
