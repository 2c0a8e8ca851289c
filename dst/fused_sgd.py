"""The masked SGD update as one Triton kernel over all masked tensors of a parameter group.

The step is :mod:`dst.kernels`' (Section 3.1 enforces the masks after every optimizer step;
Appendix A.2's optimizer is SGD with momentum, Nesterov and weight decay), on flat tensors whose
weights and momentum are already zero off the mask::

    d = m ⊙ ∇θ + wd·θ;   b = μ·b + d;   θ = θ − lr·(d + μ·b)   (Nesterov; else θ − lr·b)

PyTorch's fused optimizers are multi-tensor kernels: one launch walks chunks of many tensors.
This is that idea for the masked update. Two small device tables describe the work:

* ``addresses`` ``[4·T]`` int64: the T weights', gradients', momentum buffers' and byte masks'
  addresses, row after row;
* ``block_tensor`` ``[B]`` int32 and ``block_start`` ``[B]`` int64: for each of the B blocks of
  ``BLOCK`` elements, the tensor it belongs to and its first element there.

One launch of B programs then updates all T tensors. Each element is read once (weight, gradient,
buffer, one mask byte) and written once (weight, buffer): the least memory traffic this step can
have, where ``compiled`` launches one kernel per tensor and ``foreach`` makes two passes. Whole
blocks of tensors that start on 16 bytes (as PyTorch allocates them) are moved by 16-byte
vectors; only a tensor's last, partial block checks bounds.

The host's share per step: the tensors' addresses look up the device tables made for them.
The gradients are new tensors after every ``zero_grad``, but the caching allocator usually hands
back the same blocks (and under DDP they are views of its fixed buckets), so the addresses
repeat. A new set of addresses is uploaded once, through page-locked memory and without waiting
for the GPU, on the current stream (the training loop runs on one; a caller that steps on several
must order them). Nothing is read back.

It runs wherever Triton runs: CUDA tensors, and CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``: slow, for tests of the same program on machines without a GPU).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

BLOCK = 1024  # elements per program: 4 KiB of float32 per tensor read
FP_FUSION = True  # multiply-adds fused, as the native kernel's compiler does: last-bit changes
_TABLES_KEPT = 16  # address sets remembered (several groups, alternating gradient blocks)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonUnavailableError(RuntimeError):
    """Triton cannot run this kernel here (not installed, or no device it compiles for)."""


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(device_type: str) -> None:
    """Refuse a device this kernel cannot run on here, naming why."""
    if device_type == "cuda" or (device_type == "cpu" and interpreted()):
        return
    if device_type == "cpu":
        raise TritonUnavailableError(
            "the fused kernel runs on CUDA (on the CPU only under TRITON_INTERPRET=1, for tests)"
        )
    raise TritonUnavailableError(f"the fused kernel runs on CUDA, not on {device_type}")


@functools.cache
def _program() -> Any:
    """The Triton program, made on first use: importing Triton costs time, and whether it is
    compiled or interpreted is decided when the function is decorated."""
    try:
        import triton
        import triton.language as tl
    except ImportError as error:
        raise TritonUnavailableError(f"Triton is not installed: {error}") from error

    # Triton reads a jit function's annotations as code: its arguments stay unannotated
    @triton.jit(do_not_specialize=["tensors"])  # one program however many tensors
    def masked_sgd_blocks(  # type: ignore[no-untyped-def]
        addresses,  # [4·T] int64
        block_tensor,  # [B] int32
        block_start,  # [B] int64
        numels,  # [T] int64
        aligned,  # [T] int8: 1 where the tensor's four pointers start on 16 bytes
        tensors,  # T
        lr,
        weight_decay,
        momentum,
        NESTEROV: tl.constexpr,  # noqa: N803 - Triton's compile-time constants
        DTYPE: tl.constexpr,  # noqa: N803
        BLOCK: tl.constexpr,  # noqa: N803
    ):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)  # this block's tensor
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        offs = start + tl.arange(0, BLOCK)  # [BLOCK] its elements
        n = tl.load(numels + t)
        weight = tl.load(addresses + t).to(tl.pointer_type(DTYPE))
        grad = tl.load(addresses + tensors + t).to(tl.pointer_type(DTYPE))
        buf = tl.load(addresses + 2 * tensors + t).to(tl.pointer_type(DTYPE))
        mask = tl.load(addresses + 3 * tensors + t).to(tl.pointer_type(tl.uint8))
        inside = offs < n
        # a whole block (all but a tensor's last) of a tensor that starts on 16 bytes: no
        # bounds to check, and the alignment lets the compiler use 16-byte vector accesses
        vector = (start + BLOCK <= n) & (tl.load(aligned + t) != 0)
        if vector:
            keep = tl.load(tl.multiple_of(mask, 16) + offs) != 0  # [BLOCK]
            g = tl.load(tl.multiple_of(grad, 16) + offs).to(tl.float32)
            g = tl.where(keep, g, 0.0)  # m ⊙ ∇θ
            p = tl.load(tl.multiple_of(weight, 16) + offs).to(tl.float32)
            b = tl.load(tl.multiple_of(buf, 16) + offs).to(tl.float32)
        else:
            keep = tl.load(mask + offs, mask=inside, other=0) != 0
            g = tl.load(grad + offs, mask=inside & keep, other=0.0).to(tl.float32)
            p = tl.load(weight + offs, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(buf + offs, mask=inside, other=0.0).to(tl.float32)
        d = g + weight_decay * p
        b = momentum * b + d
        step = d + momentum * b if NESTEROV else b  # chosen when the kernel is compiled
        p = p - lr * step
        if vector:
            tl.store(tl.multiple_of(buf, 16) + offs, b.to(DTYPE))
            tl.store(tl.multiple_of(weight, 16) + offs, p.to(DTYPE))
        else:
            tl.store(buf + offs, b.to(DTYPE), mask=inside)
            tl.store(weight + offs, p.to(DTYPE), mask=inside)

    return masked_sgd_blocks


@functools.cache
def _triton_dtype(dtype: torch.dtype) -> Any:
    """Triton's type for a weight dtype (one of :data:`DTYPES`)."""
    import triton.language as tl

    types = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    return types[dtype]


@dataclass(frozen=True)
class _Tables:
    """The device tables for one set of tensors (see the module's docstring)."""

    addresses: torch.Tensor  # [4·T] int64
    block_tensor: torch.Tensor  # [B] int32
    block_start: torch.Tensor  # [B] int64
    numels: torch.Tensor  # [T] int64
    aligned: torch.Tensor  # [T] int8: the tensor's four pointers start on 16 bytes
    blocks: int  # B


def _upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without making the host wait for the device."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _tables(
    tensors: tuple[list[torch.Tensor], ...], addresses: tuple[int, ...], dtype: torch.dtype
) -> _Tables:
    """Check the tensors once for the set of addresses they occupy, then lay out the blocks."""
    params, grads, bufs, masks = tensors
    device = params[0].device
    for group, want in ((params, dtype), (grads, dtype), (bufs, dtype), (masks, torch.uint8)):
        for x in group:
            if x.device != device or x.dtype != want or not x.is_contiguous():
                raise ValueError(
                    f"the fused kernel takes contiguous tensors on one device ({dtype} weights, "
                    f"gradients and buffers, uint8 masks), got a {x.dtype} on {x.device}"
                )
    sizes = [p.numel() for p in params]
    if any([x.numel() for x in group] != sizes for group in (grads, bufs, masks)):
        raise ValueError("the fused kernel needs weights, gradients, buffers, masks of a size")
    numels = torch.tensor(sizes, dtype=torch.int64)  # [T]
    counts = -(-numels // BLOCK)  # [T] blocks per tensor
    blocks = int(counts.sum())
    block_tensor = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts  # [T] each tensor's first block
    block_start = (torch.arange(blocks) - first[block_tensor.long()]) * BLOCK  # [B]
    starts = torch.tensor(addresses, dtype=torch.int64)  # [4·T]
    return _Tables(
        addresses=_upload(starts, device),
        block_tensor=_upload(block_tensor, device),
        block_start=_upload(block_start, device),
        numels=_upload(numels, device),
        aligned=_upload(_aligned(starts.view(4, len(params))), device),
        blocks=blocks,
    )


def _aligned(starts: torch.Tensor) -> torch.Tensor:
    """``[T]`` int8: 1 where a tensor's weight, gradient, buffer and mask (``starts`` ``[4, T]``,
    their addresses) all start on 16 bytes.

    PyTorch's allocations do; views need not (DDP packs gradients into its buckets end to end,
    so a gradient after a 10-element bias starts 40 bytes off)."""
    return (starts % 16 == 0).all(dim=0).to(torch.int8)


class FusedMaskedSGD:
    """The masked update (:data:`dst.kernels.MaskedUpdate`) as one launch per call: weights,
    gradients and buffers of one dtype, byte masks, all flat, contiguous and on one device.

    The tensors are checked when a set of addresses is first seen, not at every step: a caller
    passes what :class:`dst.optimizers.MaskedSGD` passes (flat views of contiguous tensors)."""

    def __init__(self) -> None:
        self._program = _program()
        self._tables: OrderedDict[tuple[int, ...], _Tables] = OrderedDict()

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        bufs: list[torch.Tensor],
        masks: list[torch.Tensor],
        lr: float,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
    ) -> None:
        if not params:
            return
        dtype = params[0].dtype
        if dtype not in DTYPES:
            raise ValueError(f"the fused kernel updates {DTYPES} weights, not {dtype}")
        tensors = (params, grads, bufs, masks)
        # the sizes too: another model's tensors may later sit at the same addresses
        key = tuple(x.data_ptr() for group in tensors for x in group)
        key += tuple(p.numel() for p in params)
        tables = self._tables.get(key)
        if tables is None:
            tables = _tables(tensors, key[: 4 * len(params)], dtype)
            self._tables[key] = tables
            if len(self._tables) > _TABLES_KEPT:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        if tables.blocks:
            device = params[0].device
            # Triton launches on the current device: make it the tensors' (cuda:1 of a process
            # whose current device is cuda:0 would otherwise be read from the wrong GPU)
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                self._program[(tables.blocks,)](
                    tables.addresses,
                    tables.block_tensor,
                    tables.block_start,
                    tables.numels,
                    tables.aligned,
                    len(params),
                    float(lr),  # an int would be specialized: a program per value
                    float(weight_decay),
                    float(momentum),
                    NESTEROV=bool(nesterov),
                    DTYPE=_triton_dtype(dtype),
                    BLOCK=BLOCK,
                    enable_fp_fusion=FP_FUSION,
                )
        torch.autograd.graph.increment_version(params + bufs)  # written behind autograd's back
