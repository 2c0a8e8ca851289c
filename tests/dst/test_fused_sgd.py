"""The fused kernel: one Triton launch updates every masked tensor of a group, as the formula.

Run on CPU tensors in Triton's interpreter (the same program the GPU compiles), and compiled
ahead of time for NVIDIA GPUs (Triton ships the assembler, so no GPU is needed);
``tests/dst/test_cuda.py`` runs it on a GPU, where one is.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import torch

from dst import fused_sgd
from dst.fused_sgd import BLOCK, FusedMaskedSGD
from dst.kernels import KernelUnavailableError, masked_sgd_update, resolve_kernel

pytest.importorskip("triton", reason="the fused kernel is Triton's (Linux wheels only)")

SIZES = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17)


def tensors(
    sizes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[list[torch.Tensor], ...]:
    """Weights, gradients, buffers (zero off the masks) and byte masks of the given sizes."""
    gen = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(n, generator=gen) < 0.3).to(torch.uint8) for n in sizes]
    params = [(torch.randn(m.numel(), generator=gen) * m).to(dtype) for m in masks]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    bufs = [(torch.randn(m.numel(), generator=gen) * m).to(dtype) for m in masks]
    return params, grads, bufs, masks


def formula(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    masks: list[torch.Tensor],
    *hyper: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The step computed in float32, one tensor at a time, by the formula written in PyTorch."""
    ps = [p.float() for p in params]
    bs = [b.float() for b in bufs]
    for p, g, b, m in zip(ps, grads, bs, masks, strict=True):
        masked_sgd_update(p, g.float(), b, m, *hyper)
    return ps, bs


class CountedLaunches:
    """The Triton program, counting launches and the programs each launch runs."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        self.grids.append(grid)
        return self.program[grid]


@pytest.mark.parametrize("nesterov", [True, False])
def test_one_launch_updates_every_tensor_as_the_formula(
    triton_interpreter: None, nesterov: bool
) -> None:
    params, grads, bufs, masks = tensors(SIZES)
    hyper = (0.1, 5e-4, 0.9, nesterov)
    want_p, want_b = formula(params, grads, bufs, masks, *hyper)
    update = FusedMaskedSGD()
    update._program = launches = CountedLaunches(update._program)
    update(params, grads, bufs, masks, *hyper)
    # one launch, one program per BLOCK elements of each tensor (an empty tensor has none)
    assert launches.grids == [(sum(-(-n // BLOCK) for n in SIZES),)]
    for got, want in zip(params + bufs, want_p + want_b, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for p, b, m in zip(params, bufs, masks, strict=True):
        assert not p[m == 0].any() and not b[m == 0].any()  # still exactly zero off the mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_get_the_float32_step_rounded_to_their_dtype(
    triton_interpreter: None, dtype: torch.dtype
) -> None:
    params, grads, bufs, masks = tensors((300, 2 * BLOCK + 5), dtype)
    hyper = (0.05, 1e-3, 0.9, True)
    want_p, want_b = formula(params, grads, bufs, masks, *hyper)
    FusedMaskedSGD()(params, grads, bufs, masks, *hyper)
    for got, want in zip(params + bufs, want_p + want_b, strict=True):
        assert got.dtype == dtype
        # one rounding (to nearest on a GPU; the interpreter truncates): within one unit
        torch.testing.assert_close(got, want.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_tables_are_made_once_per_set_of_addresses(triton_interpreter: None) -> None:
    """Gradients that come back at the same addresses reuse the device tables; new addresses,
    or other sizes at the same addresses, get tables of their own; few are kept."""
    params, grads, bufs, masks = tensors((50, 2000))
    update = FusedMaskedSGD()
    hyper = (0.1, 0.0, 0.9, True)
    update(params, grads, bufs, masks, *hyper)
    update(params, grads, bufs, masks, *hyper)
    assert len(update._tables) == 1
    moved = [g.clone() for g in grads]  # as after zero_grad and a backward pass elsewhere
    update(params, moved, bufs, masks, *hyper)
    assert len(update._tables) == 2
    storage = [torch.zeros(3000) for _ in range(3)]  # other sizes at the same addresses
    smaller = [s[:40] for s in storage]
    larger = [s[:2500] for s in storage]
    mask_storage = torch.ones(3000, dtype=torch.uint8)
    update([smaller[0]], [smaller[1]], [smaller[2]], [mask_storage[:40]], *hyper)
    update([larger[0]], [larger[1]], [larger[2]], [mask_storage[:2500]], *hyper)
    assert len(update._tables) == 4
    torch.testing.assert_close(storage[2][:2500], torch.zeros(2500))  # zero gradient, zero step
    elsewhere = [[g.clone() for g in grads] for _ in range(fused_sgd._TABLES_KEPT + 3)]
    for moved in elsewhere:  # all alive at once: every one at new addresses
        update(params, moved, bufs, masks, *hyper)
    assert len(update._tables) == fused_sgd._TABLES_KEPT


def test_mismatched_tensors_are_refused(triton_interpreter: None) -> None:
    params, grads, bufs, masks = tensors((10,))
    update = FusedMaskedSGD()
    with pytest.raises(ValueError, match="of a size"):
        update(params, [torch.zeros(11)], bufs, masks, 0.1, 0.0, 0.9, True)
    with pytest.raises(ValueError, match="uint8 masks"):
        update(params, grads, bufs, [m.bool() for m in masks], 0.1, 0.0, 0.9, True)
    with pytest.raises(ValueError, match="float64"):
        update([p.double() for p in params], grads, bufs, masks, 0.1, 0.0, 0.9, True)


def test_the_kernel_is_offered_where_triton_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA only (and CPU tensors under the interpreter); ``auto`` never picks it for the CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    resolve_kernel.cache_clear()
    with pytest.raises(KernelUnavailableError, match="runs on CUDA"):
        resolve_kernel("fused", "cpu", torch.float32)
    with pytest.raises(KernelUnavailableError, match="runs on CUDA, not on mps"):
        resolve_kernel("fused", "mps", torch.float32)
    with pytest.raises(KernelUnavailableError, match=r"float weights, not torch\.int32"):
        resolve_kernel("fused", "cuda", torch.int32)
    assert resolve_kernel("auto", "cpu", torch.float32).name == "native"
    resolve_kernel.cache_clear()


def test_misaligned_tensors_take_the_bounds_checked_path_and_agree(
    triton_interpreter: None,
) -> None:
    """A view 40 bytes into its storage (as a DDP bucket's gradient after a 10-element bias)
    is not read by 16-byte vectors; its tensor alone takes the checked path, with one result."""
    sizes = (2 * BLOCK + 3, 3 * BLOCK)
    params, grads, bufs, masks = tensors(sizes)
    bucket = torch.zeros(10 + sizes[1])
    bucket[10:] = grads[1]
    grads[1] = bucket[10:]  # starts 40 bytes into its storage
    hyper = (0.1, 5e-4, 0.9, True)
    want_p, want_b = formula(params, grads, bufs, masks, *hyper)
    update = FusedMaskedSGD()
    update(params, grads, bufs, masks, *hyper)
    (tables,) = update._tables.values()
    assert tables.aligned.tolist() == [1, 0]
    for got, want in zip(params + bufs, want_p + want_b, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_the_kernel_compiles_for_gpus_with_vector_loads_and_stores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled program (not the interpreter's Python) builds for Ampere and Hopper GPUs in
    every variant, and moves whole blocks of aligned tensors by 16-byte vectors."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_sgd._program.cache_clear()
    program = fused_sgd._program()
    fused_sgd._program.cache_clear()
    signature = dict.fromkeys([p.name for p in program.params], "constexpr")
    tables = {"addresses": "*i64", "block_tensor": "*i32", "block_start": "*i64"}
    signature.update({**tables, "numels": "*i64", "aligned": "*i8", "tensors": "i32"})
    signature.update({"lr": "fp32", "weight_decay": "fp32", "momentum": "fp32"})
    tables_aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # as PyTorch allocates
    for capability, dtype, nesterov in itertools.product((80, 90), triton_dtypes(), (True, False)):
        constants = {"NESTEROV": nesterov, "DTYPE": dtype, "BLOCK": BLOCK}
        kernel = triton_compile(
            ASTSource(program, signature, constexprs=constants, attrs=tables_aligned),
            target=GPUTarget("cuda", capability, 32),
            options={"enable_fp_fusion": fused_sgd.FP_FUSION},
        )
        vectors = re.findall(r"(ld|st)\.global\.v\d", kernel.asm["ptx"])
        assert kernel.asm["cubin"], (capability, dtype)
        assert {"ld", "st"} <= set(vectors), (capability, dtype, vectors)


def triton_dtypes() -> list[Any]:
    """Triton's types for the weights the kernel updates."""
    return [fused_sgd._triton_dtype(dtype) for dtype in fused_sgd.DTYPES]
