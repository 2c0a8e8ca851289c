"""Embedded defaults: a local Ray head (with the dashboard the Jobs API needs) and a local
MLflow tracking server on SQLite, started as child process groups and stopped on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

log = logging.getLogger(__name__)


def uncached_bytecode(package: str = "torch") -> str | None:
    """Why every process started here would compile its imports from source, or None.

    Python caches a module's compiled bytecode beside its source on first import, unless it
    may not: ``PYTHONDONTWRITEBYTECODE`` is set, or the environment is not writable by this
    user. Then each Ray worker, job driver and server compiles its imports again (seconds
    each: ``dst demo`` takes about 95 s instead of 60) unless the installed packages' bytecode
    was compiled when they were installed. ``package`` is looked up, not imported.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    cache = Path(spec.origin).parent / "__pycache__"
    if any(cache.glob("__init__.*.pyc")):
        return None
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        reason = "PYTHONDONTWRITEBYTECODE is set"
    elif not os.access(cache if cache.exists() else cache.parent, os.W_OK):
        reason = f"{cache.parent} is not writable"
    else:
        return None  # the first import writes it
    return (
        f"the installed packages' bytecode is not compiled and {reason}: every process "
        "compiles its imports again (seconds each); run `uv sync --compile-bytecode` once"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1, free right now: all held open while they
    are chosen, so no two are the same (ports picked one at a time may repeat)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class StartupExitError(RuntimeError):
    """A service's process ended before the service answered."""


class OutputTail:
    """The last lines a child process printed, read on a thread (so the child never blocks on
    a full pipe, and nothing grows however long it runs): what a process that dies while
    starting said about why."""

    def __init__(self, stream: IO[bytes], lines: int = 40) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                self.lines.append(raw.decode(errors="replace").rstrip())

    def text(self, wait: float = 2.0) -> str:
        """The lines so far; first up to ``wait`` s for a process that ended to finish."""
        self._reader.join(wait)
        return "\n".join(self.lines)


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen,
    output: OutputTail | None = None,
) -> None:
    """Poll ``check`` until it is true; fail early if ``proc`` died, with the end of its
    ``output`` when there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = output.text() if output is not None else ""
            raise StartupExitError(
                f"{what} exited with code {proc.returncode} while starting"
                + (f"; it said:\n{said}" if said else "")
            )
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


RAY_START_TRIES = 2


@dataclass
class LocalServices:
    """Child processes started for the embedded configuration; :meth:`stop` ends them all."""

    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)
    ray_address: str | None = None
    mlflow_uri: str | None = None

    def start_ray(
        self, num_cpus: int | None = None, object_store_mb: int = 256, dashboard: int | None = None
    ) -> str:
        """Start a local Ray head with the dashboard (on port ``dashboard``, else a free one);
        return the Jobs API address once it answers. ``ray start`` gives up when its raylet
        has not registered within 30 s, which a loaded machine can take: then once more."""
        for attempt in range(1, RAY_START_TRIES + 1):
            try:
                return self._start_ray_once(num_cpus, object_store_mb, dashboard)
            except StartupExitError as error:
                self._discard_last()  # what the failed try left behind (its GCS, ...)
                if attempt == RAY_START_TRIES:
                    raise
                log.warning("local Ray did not start; starting it once more: %s", error)
        raise AssertionError("not reached")

    def _start_ray_once(
        self, num_cpus: int | None, object_store_mb: int, dashboard: int | None
    ) -> str:
        # every listening port explicit: Ray's defaults (agent 52365, client 10001, ...) clash
        # with any other Ray on the machine, and the Jobs API then finds no agent
        port, free_dashboard, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
        dashboard = dashboard or free_dashboard
        temp = Path(tempfile.mkdtemp(prefix="dstray-", dir="/tmp"))  # short: Ray's socket paths
        self.temp_dirs.append(temp)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--object-store-memory={object_store_mb * 2**20}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp}", "--disable-usage-stats",
        ]  # fmt: skip
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        # a loopback-only head: no token authentication unless asked for (Ray would turn it
        # on for any token file it finds in ~/.ray, and the readiness probe would get 401s)
        env.setdefault("RAY_AUTH_MODE", "disabled")
        proc, output = self._spawn("ray", cmd, env)
        address = f"http://127.0.0.1:{dashboard}"
        wait_until(lambda: _http_ok(f"{address}/api/version"), "Ray", 120, proc, output)
        wait_until(lambda: _http_ok(f"{address}/api/jobs/"), "Ray Jobs API", 60, proc, output)
        self.ray_address = address
        log.info("local Ray head at %s", address)
        return address

    def start_mlflow(
        self, storage: Path, backend_store_uri: str | None = None, port: int | None = None
    ) -> str:
        """Start ``mlflow server`` (SQLite by default) with a local artifact directory."""
        storage.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        backend = backend_store_uri or f"sqlite:///{storage / 'mlflow.db'}"
        cmd = [
            sys.executable, "-m", "service.mlflow_server",  # `mlflow server`, in one process
            "--backend-store-uri", backend,
            "--artifacts-destination", str(storage / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        # no MLflow job runner (a pool of huey workers): we never use MLflow jobs
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc, output = self._spawn("mlflow", cmd, env)
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(f"{uri}/health"), "MLflow server", 120, proc, output)
        self.mlflow_uri = uri
        log.info("local MLflow server at %s", uri)
        return uri

    def _discard_last(self) -> None:
        """Kill the process group started last, and forget it."""
        _, proc = self.processes.pop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str]
    ) -> tuple[subprocess.Popen, OutputTail]:
        """Start ``cmd`` as its own process group; its output (stdout and stderr) is kept to
        its last lines."""
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.processes.append((name, proc))
        assert proc.stdout is not None  # a pipe, as asked
        return proc, OutputTail(proc.stdout)

    def stop(self, grace: float = 8.0) -> None:
        """Terminate every started process group at once, kill what is left after ``grace``
        seconds, and clean up."""
        processes = list(reversed(self.processes))
        for _, proc in processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc in processes:
            _end_group(name, proc, max(deadline - time.monotonic(), 0.1))
        self.processes.clear()
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        self.temp_dirs.clear()

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL every started process group now (a second Ctrl-C)."""
        for _, proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _end_group(name: str, proc: subprocess.Popen, grace: float) -> None:
    """Wait up to ``grace`` s for a group sent SIGTERM, then kill what is left of it."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.1f s; killing it", name, grace)
    with contextlib.suppress(ProcessLookupError):  # what the group left behind (raylet, ...)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
