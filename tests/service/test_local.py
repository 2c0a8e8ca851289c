"""The local stack's helpers that need no running service."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.local import uncached_bytecode


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking package ``dstfake`` without compiled bytecode."""
    folder = tmp_path / "dstfake"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dstfake", raising=False)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    return folder


def test_no_bytecode_and_no_writing_it_is_named(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert uncached_bytecode("dstfake") is None  # the first import will write it
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    why = uncached_bytecode("dstfake")
    assert why is not None and "PYTHONDONTWRITEBYTECODE is set" in why
    assert "uv sync --compile-bytecode" in why
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # a read-only environment
    why = uncached_bytecode("dstfake")
    assert why is not None and f"{package} is not writable" in why


def test_compiled_bytecode_is_enough(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"")
    assert uncached_bytecode("dstfake") is None
    assert uncached_bytecode("no_such_package_here") is None
