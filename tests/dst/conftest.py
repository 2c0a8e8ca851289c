"""Fixtures shared by the engine's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def _forget_fused_kernel() -> None:
    """Drop what this process built for the fused kernel (compiled or interpreted)."""
    from dst import fused_sgd, kernels

    fused_sgd._program.cache_clear()
    kernels.fused_update.cache_clear()
    kernels.resolve_kernel.cache_clear()


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Triton's interpreter for this test: the fused kernel's own program runs on CPU tensors
    (slowly), so CI checks it without a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forget_fused_kernel()
    yield
    _forget_fused_kernel()
