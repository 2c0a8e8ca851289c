"""The kernels that run :class:`dst.optimizers.MaskedSGD`'s update on masked weights.

Section 3.1 enforces the masks after every optimizer step; Appendix A.2's optimizer is SGD with
momentum, Nesterov and weight decay. Every kernel here computes the same step on flat tensors
whose weights and momentum are already zero off the mask (the optimizer keeps that invariant,
see :meth:`MaskedSGD.step`), with ``m`` the mask (1 active, 0 inactive)::

    d = m ⊙ ∇θ + wd·θ
    b = μ·b + d                            (momentum buffer)
    θ = θ − lr·(d + μ·b)                   (Nesterov; plain momentum: θ − lr·b)

Off the mask θ and b are zero on entry, so d, b and θ stay exactly zero: only the gradient needs
the mask. Kernels, fastest first on one CPU thread (large-MLP, density 0.1,
``benchmarks/mask_enforcement.py``):

* ``native``: the loop in ``masked_sgd.c``, compiled once per machine with the system C
  compiler for the CPU it runs on (``-O3 -march=native``) and called through ``ctypes``. The
  mask becomes a zeroing load, so the step costs about what dense fused SGD costs.
  float32 on the CPU only.
* ``fused``: one Triton kernel over all masked tensors of a parameter group (``dst.fused_sgd``):
  one launch, each element read and written once. CUDA (and CPU tensors under Triton's
  interpreter, for tests).
* ``compiled``: the same formula through ``torch.compile`` (C++ on the CPU, Triton on CUDA),
  one call for all masked tensors.
* ``foreach``: no compiler; two multi-tensor passes over all masked tensors: the gradients
  times the masks (``torch._foreach_mul``), then PyTorch's fused SGD, as for dense weights.
  Off the mask the masked gradient is zero, so the invariant keeps d, b and θ zero there. A
  few kernel launches and two Python calls per step however many tensors (the ``compiled``
  kernel launches one kernel per tensor and checks its guards on every tensor), for one more
  read and write of the gradients; the masks are kept as floats (4 bytes an entry).
* ``eager``: no compiler; PyTorch's SGD, then weights and momentum are masked.
* ``auto``: ``native`` for float32 CPU weights, ``fused`` on CUDA, else ``compiled``, else
  ``eager`` (with a warning naming why the faster kernel is not available).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast, get_args

import numpy as np
import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices
from torch.optim.sgd import sgd as torch_sgd

from dst.spec import OptimizerKernel as Kernel  # the names, declared where specs see them

log = logging.getLogger(__name__)

KERNELS: tuple[Kernel, ...] = get_args(Kernel)

# (weights, grads, momentum buffers, byte masks: lists of flat tensors; lr, weight decay,
#  momentum, nesterov) -> None
MaskedUpdate = Callable[..., None]

_COMPILABLE_DEVICES = ("cpu", "cuda")
_FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
_SOURCE = Path(__file__).with_name("masked_sgd.c")
# The compiler may fuse multiply-adds (its default), so results can differ from the other
# kernels in the last bit; forbidding that (-ffp-contract=off) made the loop about 5% slower.
_NATIVE_FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")
_PORTABLE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")
_MIN_CHUNK = 1 << 16  # elements per thread below which splitting a tensor does not pay


class KernelUnavailableError(RuntimeError):
    """A kernel cannot run here (no C compiler, an unsupported device or dtype...)."""


# ---- the formula, for torch.compile ------------------------------------------------------


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
    """One masked SGD step on flat ``[n]`` tensors, in the form the compiler fuses into one loop.

    ``mask`` is the bool mask viewed as ``uint8`` (the CPU code generator vectorizes a byte load,
    not a bool one). Written out of place so the hyperparameters stay symbolic inputs (LR decay
    does not recompile); run eagerly it would allocate several temporaries.
    """
    d = torch.where(mask != 0, g, 0.0) + weight_decay * p  # [n]; a select: inf·0 is nan
    b = momentum * buf + d  # [n]
    step = d + momentum * b if nesterov else b  # [n]
    buf.copy_(b)
    p.copy_(p - lr * step)


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


@functools.cache
def compiled_update(device_type: str) -> MaskedUpdate:
    """:func:`masked_sgd_update` over lists, compiled once per process for ``device_type``.

    One call updates every masked tensor (a call into compiled code has a fixed cost of tens of
    microseconds). ``dynamic=True`` keeps tensor sizes symbolic, so a new model with the same
    number of masked tensors usually reuses the code. A tiny update runs here, so a machine
    that cannot compile fails before any weight is touched.
    """
    if device_type not in _COMPILABLE_DEVICES:
        raise KernelUnavailableError(f"torch.compile is not set up here for {device_type} tensors")
    update = cast(MaskedUpdate, torch.compile(_each(masked_sgd_update), dynamic=True))
    _self_check(update, torch.device(device_type))
    return update


# ---- PyTorch only -----------------------------------------------------------------------


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
        fused={p.device.type for p in params} <= _FUSED_DEVICES,
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

    On the mask this is the formula above; off it everything ends at zero either way.
    """
    dense_update(params, grads, bufs, lr, weight_decay, momentum, nesterov)
    zero_off_mask(params + bufs, masks + masks)


def zero_off_mask(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """``x[m == 0] = 0`` for each flat tensor and its byte mask, in place.

    A fill, not a multiplication by the mask: nan·0 is nan, so a diverged value off the mask
    (a pruned weight's momentum, say) would stay and come back into the weight. About 3x the
    time of the multiplication, but it runs after topology updates and restores (every Δt
    steps), and at each step only in the ``eager`` fallback.
    """
    for x, mask in zip(tensors, masks, strict=True):
        x.masked_fill_(mask.logical_not(), 0)


def foreach_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    masks: list[torch.Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """The masked update as two multi-tensor passes: masked gradients (new tensors: a
    parameter's ``.grad`` stays the dense gradient), then :func:`dense_update` on them.
    ``masks`` are float masks of the weights' dtype (:func:`foreach_kernel` prepares them).

    The gradients are masked by multiplying (there is no multi-tensor select), so a
    non-finite gradient off the mask (inf·0 = nan) reaches that weight; the other kernels
    select, and keep it at zero."""
    masked = list(torch._foreach_mul(grads, masks))
    dense_update(params, masked, bufs, lr, weight_decay, momentum, nesterov)
    torch.autograd.graph.increment_version(params + bufs)  # the fused step does not


# ---- native: masked_sgd.c compiled for this machine --------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat byte mask ``[n]`` as packed bits ``[ceil(n / 8)]``, least significant bit first
    (the native kernel's mask format: 1/8 of the memory traffic)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy(), bitorder="little"))


class NativeLibrary:
    """``masked_sgd.c`` loaded through ``ctypes``; float32 CPU tensors, flat and contiguous."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._sgd = lib.dst_masked_sgd_f32
        # (p, g, b, m, n, lr, wd, momentum, nesterov); a Python bool passes as the int
        self._sgd.argtypes = [ptr, ptr, ptr, ptr, i64, f32, f32, f32, ctypes.c_int]
        self._sgd.restype = None
        self._mask = lib.dst_mask_f32
        self._mask.argtypes = [ptr, ptr, i64]
        self._mask.restype = None
        self.path = path

    def update(
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
        """The masked SGD step, ``masks`` as :func:`pack_bits` makes them; large tensors are split
        across ``torch.get_num_threads()``."""
        _check_native(params + grads + bufs, torch.float32)
        _check_native(masks, torch.uint8)
        for p, g, b, m in zip(params, grads, bufs, masks, strict=True):
            if not p.numel() == g.numel() == b.numel() or m.numel() != -(-p.numel() // 8):
                raise KernelUnavailableError(
                    f"the native kernel needs [n] weights, gradients, buffers and [n/8] mask "
                    f"bytes, got {p.numel()}, {g.numel()}, {b.numel()}, {m.numel()}"
                )
        threads = torch.get_num_threads()
        jobs: list[Callable[[], None]] = []
        for p, g, b, m in zip(params, grads, bufs, masks, strict=True):
            for start, stop in _chunks(p.numel(), threads):  # one chunk on one thread
                jobs.append(
                    functools.partial(
                        self._sgd,
                        p.data_ptr() + 4 * start,
                        g.data_ptr() + 4 * start,
                        b.data_ptr() + 4 * start,
                        m.data_ptr() + start // 8,  # chunks start on multiples of 64
                        stop - start,
                        lr,
                        weight_decay,
                        momentum,
                        nesterov,
                    )
                )
        if threads == 1:
            for job in jobs:
                job()
        else:
            _run(jobs, threads)
        torch.autograd.graph.increment_version(params + bufs)  # written behind autograd's back

    def zero_off_mask(self, tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        """:func:`zero_off_mask` in one pass per tensor."""
        _check_native(tensors, torch.float32)
        _check_native(masks, torch.uint8)
        for x, m in zip(tensors, masks, strict=True):
            self._mask(x.data_ptr(), m.data_ptr(), x.numel())
        torch.autograd.graph.increment_version(tensors)


def _check_native(tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    """The C code reads raw memory: refuse anything but contiguous ``dtype`` CPU tensors."""
    for t in tensors:
        if not t.is_cpu or t.dtype != dtype or not t.is_contiguous():
            raise KernelUnavailableError(
                f"the native kernel takes contiguous {dtype} CPU tensors, got a "
                f"{'contiguous' if t.is_contiguous() else 'strided'} {t.dtype} on {t.device}"
            )


def _chunks(n: int, threads: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into at most ``threads`` pieces of at least ``_MIN_CHUNK`` elements,
    each starting on a 64-element boundary (whole cache lines per thread)."""
    parts = max(1, min(threads, n // _MIN_CHUNK))
    size = -(-n // parts)
    size = -(-size // 64) * 64
    return [(start, min(start + size, n)) for start in range(0, n, size)] or [(0, 0)]


def _run(jobs: list[Callable[[], None]], threads: int) -> None:
    """Run the jobs on ``threads`` worker threads at once (``ctypes`` releases the GIL)."""
    for future in [_pool(threads).submit(job) for job in jobs]:
        future.result()


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dst-masked-sgd")


def kernel_cache_dir() -> Path:
    """Where built kernels are kept: ``$DST_CACHE_DIR/kernels``, else ``~/.cache/dst/kernels``
    (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("DST_CACHE_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "dst")
    return Path(root) / "kernels"


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` (may carry flags), else cc, gcc or clang on the PATH."""
    wanted = os.environ.get("CC")
    for command in [shlex.split(wanted)] if wanted else [["cc"], ["gcc"], ["clang"]]:
        if command and shutil.which(command[0]):
            return command
    if wanted:
        raise KernelUnavailableError(f"no C compiler: CC={wanted!r} is not an executable")
    raise KernelUnavailableError("no C compiler found (install one, or set CC)")


def _machine_signature(cc: list[str]) -> bytes:
    """What a ``-march=native`` build depends on: the compiler and this CPU's features."""
    parts = [platform.machine(), platform.processor()]
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False)
    parts.append(version.stdout)
    try:
        with open("/proc/cpuinfo") as f:
            wanted = ("flags", "features", "model name", "cpu part")
            seen: set[str] = set()
            for line in f:
                key = line.split(":")[0].strip().lower()
                if key in wanted and key not in seen:
                    seen.add(key)
                    parts.append(line.strip())
    except OSError:
        pass
    return "\n".join(parts).encode()


def build_native(cache_dir: Path | None = None) -> Path:
    """Compile ``masked_sgd.c`` for this machine (once: later calls find it in the cache).

    Tries ``-march=native`` first and a portable build if the compiler refuses it. The file
    name is a hash of the source, the compiler, the flags and the CPU's features, so machines of
    a cluster that share a home directory never load each other's builds. Concurrent builds
    (several Ray workers) are safe: each writes its own file and renames it into place.
    """
    cache_dir = cache_dir or kernel_cache_dir()
    cc = _compiler()
    source = _SOURCE.read_bytes()
    signature = _machine_signature(cc)
    errors = []
    for flags in (_NATIVE_FLAGS, _PORTABLE_FLAGS):
        key = hashlib.sha256(source + signature + " ".join(flags).encode()).hexdigest()[:20]
        target = cache_dir / f"masked_sgd-{key}.so"
        if target.exists():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        result = subprocess.run(
            [*cc, *flags, "-o", str(tmp), str(_SOURCE)], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            os.replace(tmp, target)
            log.info("built the native masked SGD kernel: %s", target)
            return target
        tmp.unlink(missing_ok=True)
        errors.append(f"{' '.join(cc + list(flags))}: {result.stderr.strip()[:300]}")
    raise KernelUnavailableError("cannot compile masked_sgd.c: " + " | ".join(errors))


@functools.cache
def native_library() -> NativeLibrary:
    """The native kernel for this process: built (or found in the cache), loaded, checked."""
    try:
        library = NativeLibrary(build_native())
    except OSError as error:  # a file that is not a loadable library, a read-only cache...
        raise KernelUnavailableError(f"cannot build or load the native kernel: {error}") from error
    _self_check(library.update, torch.device("cpu"), pack_bits)
    return library


# ---- choosing a kernel -------------------------------------------------------------------


def _self_check(
    update: MaskedUpdate,
    device: torch.device,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask,
) -> None:
    """Run ``update`` on a tiny case against the formula run eagerly; refuse a wrong kernel."""
    gen = torch.Generator().manual_seed(0)
    n = 2085  # two whole blocks of the fused kernel and a partial one; odd for vector tails
    mask = (torch.arange(n) % 3 != 0).to(torch.uint8)  # [n]
    p = torch.randn(n, generator=gen) * mask  # [n], zero off the mask
    g = torch.randn(n, generator=gen)
    buf = torch.randn(n, generator=gen) * mask
    expected_p, expected_buf = p.clone(), buf.clone()
    masked_sgd_update(expected_p, g, expected_buf, mask, 0.1, 0.01, 0.9, True)
    got = [t.to(device) for t in (p, g, buf, prepare(mask))]
    update([got[0]], [got[1]], [got[2]], [got[3]], 0.1, 0.01, 0.9, True)
    if not (
        torch.allclose(got[0].cpu(), expected_p, rtol=1e-5, atol=1e-6)
        and torch.allclose(got[2].cpu(), expected_buf, rtol=1e-5, atol=1e-6)
    ):
        raise KernelUnavailableError("the kernel gave a wrong result on its self-check")


@dataclass(frozen=True)
class MaskedKernel:
    """A named way of running the masked update, and of zeroing tensors off their masks."""

    name: str
    update: MaskedUpdate  # takes masks as ``prepare_mask`` made them
    zero_off_mask: Callable[[list[torch.Tensor], list[torch.Tensor]], None]  # byte masks
    prepare_mask: Callable[[torch.Tensor], torch.Tensor] = lambda mask: mask  # [n] uint8 ->


EAGER = MaskedKernel("eager", eager_update, zero_off_mask)


def native_kernel(device_type: str, dtype: torch.dtype) -> MaskedKernel:
    """The native kernel, if it can run ``dtype`` weights on ``device_type`` here."""
    if device_type != "cpu" or dtype != torch.float32:
        raise KernelUnavailableError(
            f"the native kernel runs float32 weights on the CPU, not {dtype} on {device_type}"
        )
    library = native_library()
    return MaskedKernel("native", library.update, library.zero_off_mask, pack_bits)


def compiled_kernel(device_type: str) -> MaskedKernel:
    """The ``torch.compile`` kernel for ``device_type``."""
    return MaskedKernel("compiled", compiled_update(device_type), zero_off_mask)


@functools.cache
def fused_update(device_type: str) -> MaskedUpdate:
    """The ``fused`` kernel's update for ``device_type``, made and checked once per process."""
    from dst import fused_sgd  # imports Triton where it is used

    try:
        fused_sgd.check_device(device_type)
        update = fused_sgd.FusedMaskedSGD()
    except fused_sgd.TritonUnavailableError as error:
        raise KernelUnavailableError(str(error)) from error
    _self_check(update, torch.device(device_type))
    return update


def fused_kernel(device_type: str, dtype: torch.dtype) -> MaskedKernel:
    """The ``fused`` Triton kernel, if it can run ``dtype`` weights on ``device_type`` here."""
    from dst.fused_sgd import DTYPES

    if dtype not in DTYPES:
        raise KernelUnavailableError(f"the fused kernel updates float weights, not {dtype}")
    return MaskedKernel("fused", fused_update(device_type), zero_off_mask)


def foreach_kernel(dtype: torch.dtype) -> MaskedKernel:
    """The ``foreach`` kernel for ``dtype`` weights (any device PyTorch runs SGD on)."""
    return MaskedKernel("foreach", foreach_update, zero_off_mask, lambda mask: mask.to(dtype))


@functools.cache
def resolve_kernel(kernel: Kernel, device_type: str, dtype: torch.dtype) -> MaskedKernel:
    """The masked-update kernel ``kernel`` names, for ``dtype`` weights on ``device_type``.

    An explicit kernel that cannot run raises :class:`KernelUnavailableError` (before any weight is
    touched); ``auto`` takes the fastest that can, and says why when it has to fall back.
    """
    if kernel == "eager":
        return EAGER
    if kernel == "native":
        return native_kernel(device_type, dtype)
    if kernel == "compiled":
        return compiled_kernel(device_type)
    if kernel == "fused":
        return fused_kernel(device_type, dtype)
    if kernel == "foreach":
        return foreach_kernel(dtype)
    reasons = []
    candidates: list[Callable[[], MaskedKernel]] = [lambda: compiled_kernel(device_type)]
    if device_type == "cpu" and dtype == torch.float32:
        candidates.insert(0, lambda: native_kernel(device_type, dtype))
    if device_type == "cuda":
        candidates.insert(0, lambda: fused_kernel(device_type, dtype))
    for candidate in candidates:
        try:
            return candidate()
        except Exception as error:  # no compiler, no Triton, an unsupported platform...
            first_line = str(error).splitlines()[0] if str(error) else ""
            reasons.append(f"{type(error).__name__}: {first_line}")
    log.warning(
        "no compiled masked SGD kernel for %s on %s (%s); using the eager kernel, which gives "
        "the same result more slowly",
        dtype,
        device_type,
        "; ".join(reasons),
    )
    return EAGER
