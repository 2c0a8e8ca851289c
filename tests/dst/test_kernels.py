"""The masked-update kernels: building the native one, choosing one, and what each refuses."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dst import kernels
from dst.kernels import (
    KernelUnavailableError,
    MaskedKernel,
    build_native,
    masked_sgd_update,
    native_kernel,
    native_library,
    pack_bits,
    resolve_kernel,
)


def case(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Flat weights and momentum zero off a random byte mask, and a dense gradient."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, generator=gen) < 0.3).to(torch.uint8)  # [n]
    p = torch.randn(n, generator=gen) * mask
    g = torch.randn(n, generator=gen)
    buf = torch.randn(n, generator=gen) * mask
    return p, g, buf, mask


@pytest.mark.parametrize("nesterov", [True, False])
def test_native_matches_the_formula(nesterov: bool) -> None:
    p, g, buf, mask = case(1003)  # not a multiple of any vector width: the tail runs too
    want_p, want_buf = p.clone(), buf.clone()
    masked_sgd_update(want_p, g, want_buf, mask, 0.05, 1e-3, 0.9, nesterov)
    native_library().update([p], [g], [buf], [pack_bits(mask)], 0.05, 1e-3, 0.9, nesterov)
    torch.testing.assert_close(p, want_p)
    torch.testing.assert_close(buf, want_buf)
    off = mask == 0
    assert not p[off].any() and not buf[off].any()


def test_threads_split_the_work_without_changing_it() -> None:
    n = 3 * (1 << 16) + 5
    one, two = case(n), case(n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        native_library().update(
            [one[0]], [one[1]], [one[2]], [pack_bits(one[3])], 0.1, 0, 0.9, True
        )
        torch.set_num_threads(2)
        native_library().update(
            [two[0]], [two[1]], [two[2]], [pack_bits(two[3])], 0.1, 0, 0.9, True
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])


def test_chunks_cover_the_range_on_cache_line_boundaries() -> None:
    assert kernels._chunks(100, 8) == [(0, 100)]  # too small to split
    n = 5 * (1 << 16) + 7
    chunks = kernels._chunks(n, 3)
    assert len(chunks) == 3
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all(start % 64 == 0 for start, _ in chunks)


def test_packed_bits_are_least_significant_first() -> None:
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert pack_bits(mask).tolist() == [0b00000001, 0b00000011]


def test_native_zero_off_mask() -> None:
    x = torch.arange(1.0, 11.0)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.uint8)
    native_library().zero_off_mask([x], [mask])
    assert x.tolist() == [1, 0, 0, 4, 5, 0, 7, 0, 0, 10]


def test_native_refuses_what_it_cannot_read() -> None:
    p, g, buf, mask = case(64)
    lib, bits = native_library(), pack_bits(mask)
    with pytest.raises(KernelUnavailableError, match="float32"):
        lib.update([p.double()], [g], [buf], [bits], 0.1, 0.0, 0.9, True)
    with pytest.raises(KernelUnavailableError, match="strided"):
        lib.update([p[::2]], [g[::2]], [buf[::2]], [bits], 0.1, 0.0, 0.9, True)
    with pytest.raises(KernelUnavailableError, match=r"torch\.uint8"):
        lib.update([p], [g], [buf], [bits.bool()], 0.1, 0.0, 0.9, True)
    with pytest.raises(KernelUnavailableError, match=r"\[n/8\] mask bytes"):
        lib.update([p], [g], [buf], [mask], 0.1, 0.0, 0.9, True)  # bytes, not packed bits
    with pytest.raises(KernelUnavailableError, match="float32 weights on the CPU"):
        native_kernel("cpu", torch.float64)
    with pytest.raises(KernelUnavailableError, match="float32 weights on the CPU"):
        native_kernel("cuda", torch.float32)


def test_build_is_cached_per_machine(tmp_path: Path) -> None:
    first = build_native(tmp_path)
    stamp = first.stat().st_mtime_ns
    again = build_native(tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert first.parent == tmp_path and first.name.startswith("masked_sgd-")
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_cache_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DST_CACHE_DIR", "/somewhere/dst")
    assert str(kernels.kernel_cache_dir()) == "/somewhere/dst/kernels"
    monkeypatch.delenv("DST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert str(kernels.kernel_cache_dir()) == "/xdg/dst/kernels"


def test_no_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(KernelUnavailableError, match=r"CC='/nonexistent/cc' is not an exec"):
        build_native(tmp_path)
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(KernelUnavailableError, match=r"cannot compile masked_sgd\.c"):
        build_native(tmp_path)


def test_a_wrong_kernel_is_refused_by_its_self_check() -> None:
    def broken(*args: object) -> None:
        return None  # updates nothing

    with pytest.raises(KernelUnavailableError, match="self-check"):
        kernels._self_check(broken, torch.device("cpu"))


def test_auto_falls_back_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable(*args: object) -> None:
        raise KernelUnavailableError("no C compiler found (install one, or set CC)")

    choose = resolve_kernel.__wrapped__  # type: ignore[attr-defined]  # bypass the cache
    monkeypatch.setattr(kernels, "native_kernel", unavailable)
    assert choose("auto", "cpu", torch.float32).name == "compiled"
    monkeypatch.setattr(kernels, "compiled_kernel", unavailable)
    with caplog.at_level(logging.WARNING, logger="dst.kernels"):
        assert choose("auto", "cpu", torch.float32).name == "eager"
    assert "no C compiler found" in caplog.text and "eager" in caplog.text
    with pytest.raises(KernelUnavailableError):
        choose("native", "cpu", torch.float32)  # an explicit choice is not replaced


def test_auto_on_cuda_takes_the_fused_kernel_else_the_compiled_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def made(name: str) -> Callable[..., MaskedKernel]:
        return lambda *args: MaskedKernel(name, kernels.eager_update, kernels.zero_off_mask)

    def unavailable(*args: object) -> None:
        raise KernelUnavailableError("Triton is not installed")

    choose = resolve_kernel.__wrapped__  # type: ignore[attr-defined]  # bypass the cache
    monkeypatch.setattr(kernels, "fused_kernel", made("fused"))
    monkeypatch.setattr(kernels, "compiled_kernel", made("compiled"))
    assert choose("auto", "cuda", torch.float32).name == "fused"
    monkeypatch.setattr(kernels, "fused_kernel", unavailable)
    assert choose("auto", "cuda", torch.float32).name == "compiled"
