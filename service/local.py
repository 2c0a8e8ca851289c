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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen
) -> None:
    """Poll ``check`` until it is true; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


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
        return the Jobs API address once it answers."""
        port, dashboard = free_port(), dashboard or free_port()
        # every listening port explicit: Ray's defaults (agent 52365, client 10001, ...) clash
        # with any other Ray on the machine, and the Jobs API then finds no agent
        agent, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(5))
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
        proc = self._spawn("ray", cmd, env)
        address = f"http://127.0.0.1:{dashboard}"
        wait_until(lambda: _http_ok(f"{address}/api/version"), "Ray", 120, proc)
        wait_until(lambda: _http_ok(f"{address}/api/jobs/"), "Ray Jobs API", 60, proc)
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
        proc = self._spawn("mlflow", cmd, env)
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: _http_ok(f"{uri}/health"), "MLflow server", 120, proc)
        self.mlflow_uri = uri
        log.info("local MLflow server at %s", uri)
        return uri

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.processes.append((name, proc))
        return proc

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
