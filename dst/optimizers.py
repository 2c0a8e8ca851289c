"""SGD that keeps masked weights at zero inside its own update (Appendix A.2 recipe, Section 3.1).

The paper's training loop is SGD with momentum 0.9, Nesterov and weight decay, with the masks
enforced after every optimizer step. Enforcing them as a separate pass (``w *= mask``) reads and
writes every weight once more per step: about 3% of a large-MLP step on one CPU thread, more
than all topology updates cost at Δt = 800 (``benchmarks/mask_enforcement.py``).
:class:`MaskedSGD` folds the mask into the update instead, and keeps one invariant: **off the
mask, weights and momentum are exactly zero**. Then only the gradient needs the mask::

    d = m ⊙ ∇θ + wd·θ
    b = μ·b + d                            (momentum buffer)
    θ = θ − lr·(d + μ·b)                   (Nesterov; plain momentum: θ − lr·b)

and off the mask d, b and θ stay zero. The invariant is re-established whenever something
else changes a mask or a masked weight (a topology update, a checkpoint load, a user's edit):
the optimizer notices through the tensors' version counters and zeroes weights and momentum
off the mask before the next update. A weight grown by a topology update therefore starts from
zero momentum as well.

Without a mask this is ``torch.optim.SGD(momentum=μ, nesterov=..., weight_decay=wd)``, and
unmasked parameters (biases, normalization layers, every parameter of a dense run) are updated
by exactly that: PyTorch's fused SGD kernel. How the masked update runs is
:mod:`dst.kernels`' choice (``kernel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dst.kernels import KERNELS, Kernel, MaskedKernel, dense_update, resolve_kernel

__all__ = ["KERNELS", "Kernel", "MaskedSGD"]  # Kernel and KERNELS are re-exported for specs


@dataclass
class _Masked:
    """A masked parameter's flat aliases, made once rather than at every step."""

    param: nn.Parameter
    weight: torch.Tensor  # [n], the parameter's storage
    buf: torch.Tensor  # [n], its momentum buffer's storage
    mask: torch.Tensor  # [n] uint8, the bool mask's storage
    kernel_mask: torch.Tensor | None = None  # the mask in the kernel's format (prepare_mask)
    synced: tuple[int, int] | None = None  # (mask, weight) versions after the last write


class MaskedSGD(torch.optim.Optimizer):
    """SGD with momentum, Nesterov and weight decay that enforces masks inside its update.

    ``masks`` maps a parameter to its bool mask (same shape and device). The optimizer keeps a
    byte view of each mask, not a copy, so in-place mask edits (topology updates, checkpoint
    loads) take effect at the next step. The state layout is ``torch.optim.SGD``'s
    (``state[p]["momentum_buffer"]``), so topology updates can reset it per weight; replace a
    buffer tensor only through :meth:`load_state_dict`.
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
        self.set_masks(masks or {})

    def set_masks(self, masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
        """Attach (or replace) the masks; each must be a bool tensor of its parameter's shape."""
        known = {id(p) for group in self.param_groups for p in group["params"]}
        checked: dict[int, torch.Tensor] = {}
        for p, mask in masks.items():
            if id(p) not in known:
                raise ValueError("a mask was given for a parameter this optimizer does not update")
            if mask.dtype != torch.bool or mask.shape != p.shape or mask.device != p.device:
                raise ValueError(
                    f"a mask must be a bool tensor of its weight's shape and device: got "
                    f"{mask.dtype} {tuple(mask.shape)} on {mask.device} for a weight of shape "
                    f"{tuple(p.shape)} on {p.device}"
                )
            if not mask.is_contiguous():
                raise ValueError("a mask must be contiguous")
            checked[id(p)] = mask.view(torch.uint8)
        self._masks = checked  # by id(param): Tensor hashing is a Python call, ids are not
        self._entries: dict[int, _Masked] = {}
        self._dense_bufs: dict[int, torch.Tensor] = {}  # id(param) -> its momentum buffer

    # torch wraps these four methods so that torch.compile never traces them, and the wrapper
    # imports torch._dynamo on its first call: seconds of CPU in every fresh trial process.
    # This optimizer never runs under torch.compile (the model and the masked update are
    # compiled, never the optimizer's bookkeeping), so it calls them unwrapped.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _unwrapped(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _unwrapped(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return dict(_unwrapped(torch.optim.Optimizer.state_dict)(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load momentum buffers (then re-zero them off the masks before the next update)."""
        _unwrapped(torch.optim.Optimizer.load_state_dict)(self, state_dict)
        self._entries, self._dense_bufs = {}, {}

    def masked_kernel(self, device: torch.device, dtype: torch.dtype) -> MaskedKernel:
        """The kernel this optimizer runs on masked ``dtype`` weights on ``device``."""
        return resolve_kernel(self.kernel, device.type, dtype)

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
        # runs at every step over every parameter: on a GPU the host's time here is not
        # hidden behind the device's when steps are short, so the loop stays lean
        hyper = (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"])
        dense: list[torch.Tensor] = []
        dense_grads: list[torch.Tensor] = []
        dense_bufs: list[torch.Tensor] = []
        masked: dict[tuple[torch.device, torch.dtype], list[_Masked]] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("MaskedSGD does not support sparse gradients")
            key = id(p)
            if key in self._masks:
                entry = self._entries.get(key)
                if entry is None or entry.weight.data_ptr() != p.data_ptr():  # new, or p.data=
                    entry = self._entry(p)
                masked.setdefault((p.device, p.dtype), []).append(entry)
            else:
                buf = self._dense_bufs.get(key)
                dense.append(p)
                dense_grads.append(grad)
                dense_bufs.append(self._dense_buf(p) if buf is None else buf)
        for (device, dtype), entries in masked.items():
            kernel = self.masked_kernel(device, dtype)
            _restore_invariant(kernel, entries)
            kernel.update(
                [e.weight for e in entries],
                [_grad(e.param).view(-1) for e in entries],  # read only: no detach needed
                [e.buf for e in entries],
                [e.kernel_mask for e in entries],
                *hyper,
            )
            for e in entries:
                e.synced = (e.mask._version, e.param._version)
        if dense:
            dense_update(dense, dense_grads, dense_bufs, *hyper)

    def _dense_buf(self, p: nn.Parameter) -> torch.Tensor:
        """An unmasked parameter's momentum buffer (created at zero), remembered by id."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        self._dense_bufs[id(p)] = state["momentum_buffer"]
        return state["momentum_buffer"]

    def _entry(self, p: nn.Parameter) -> _Masked:
        """Flat aliases of a masked parameter, its momentum buffer (created at zero) and mask."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        entry = _Masked(p, _flat(p), _flat(state["momentum_buffer"]), self._masks[id(p)].view(-1))
        self._entries[id(p)] = entry
        return entry


def _restore_invariant(kernel: MaskedKernel, entries: list[_Masked]) -> None:
    """Zero weights and momentum off the mask where a mask or a weight changed since the
    optimizer last wrote them (their version counters moved), or where state is new; and
    convert those masks to the kernel's format again."""
    stale = [e for e in entries if e.synced != (e.mask._version, e.param._version)]
    for e in stale:
        e.kernel_mask = kernel.prepare_mask(e.mask)
    if stale:
        kernel.zero_off_mask(
            [e.weight for e in stale] + [e.buf for e in stale], [e.mask for e in stale] * 2
        )


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` without torch's compile-disabling wrapper (the function it wraps)."""
    return getattr(method, "__wrapped__", method)


def _grad(p: nn.Parameter) -> torch.Tensor:
    assert p.grad is not None  # parameters without a gradient are skipped before this
    return p.grad


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat alias of a contiguous tensor that the update writes through.

    Detached, so autograd does not track it as a view (writing through a view made under
    ``no_grad`` confuses ``torch.compile``); it shares the tensor's storage and version counter.
    """
    if not t.is_contiguous():
        raise RuntimeError("MaskedSGD needs contiguous masked weights, gradients and buffers")
    return t.detach().view(-1)
