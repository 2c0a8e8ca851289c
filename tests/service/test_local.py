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


def test_ports_chosen_together_differ() -> None:
    from service.local import free_ports

    for _ in range(20):
        ports = free_ports(7)
        assert len(set(ports)) == 7


def test_a_service_that_dies_while_starting_says_why(tmp_path: Path) -> None:
    """Its last lines come with the error (the rest of a long output is not kept)."""
    from service.local import LocalServices, wait_until

    script = "import sys\nfor i in range(100): print('line', i)\nsys.exit('no such port: 99999')"
    services = LocalServices()
    try:
        proc, output = services._spawn("svc", [sys.executable, "-u", "-c", script], {})
        with pytest.raises(RuntimeError) as raised:
            wait_until(lambda: False, "svc", 30, proc, output)
    finally:
        services.stop()
    message = str(raised.value)
    assert message.startswith("svc exited with code 1 while starting; it said:\n")
    assert message.endswith("line 99\nno such port: 99999")
    assert "line 60\n" not in message and "line 61\n" in message  # the last 40 lines


def test_ray_that_gives_up_while_starting_is_started_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As ``ray start`` does when its raylet registers late on a loaded machine: what the
    failed try left running is killed, and a second try runs."""
    from service.local import LocalServices, StartupExitError

    services = LocalServices()
    left: list[object] = []

    def start_once(*args: object) -> str:
        if not left:  # the first try: a process group stays behind, and the start fails
            sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
            proc, _ = services._spawn("ray", sleeper, {})
            left.append(proc)
            raise StartupExitError("Ray exited with code 1 while starting")
        return "http://127.0.0.1:8265"

    monkeypatch.setattr(services, "_start_ray_once", start_once)
    try:
        assert services.start_ray() == "http://127.0.0.1:8265"
        assert left[0].poll() is not None  # type: ignore[attr-defined]
        assert services.processes == []
        left.clear()
        monkeypatch.setattr("service.local.RAY_START_TRIES", 1)
        with pytest.raises(StartupExitError):
            services.start_ray()
    finally:
        services.stop()
