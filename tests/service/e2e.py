"""Shared helpers of the end-to-end tests: real local Ray, real MLflow, real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.cli import running_api
from service.client import TERMINAL, ApiClient, parent_closed
from service.core.config import Settings
from service.local import free_port

TOKEN = "e2e-test-token-0123456789"


def study(name: str, epochs: int = 2, **extra: Any) -> dict[str, Any]:
    """A 4-trial digits study: 2 criteria x 2 seeds."""
    return {
        "name": name,
        "model": "small-mlp",
        "dataset": "digits",
        "training": {"epochs": epochs, "batch_size": 64, "lr": 0.05},
        "sparsity": {"density": 0.1, "update_period": 10},
        "grid": {"sparsity.criterion": ["magnitude", "snip"], "seed": [0, 1]},
        "resources": {"cpus_per_trial": 0.5},
        **extra,
    }


@contextmanager
def api(
    storage: Path, database_url: str, ray: str, mlflow: str, **more: Any
) -> Iterator[ApiClient]:
    """A real API server (uvicorn in a thread) over the given Ray, MLflow and database
    (``more``: other settings)."""
    settings = Settings(
        storage_path=storage,
        database_url=database_url,
        ray_address=ray,
        mlflow_tracking_uri=mlflow,
        api_token=TOKEN,
        port=free_port(),
        reconcile_interval_s=0.5,
        **more,
    )
    with running_api(settings) as url:
        yield ApiClient(url, TOKEN)


def wait_terminal(client: ApiClient, experiment_id: str, timeout: float = 240) -> dict[str, Any]:
    """Poll until the experiment reaches a terminal state and its MLflow parent run (if it
    has one) is closed, which follows the end within seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = client.experiment(experiment_id)
        if experiment["status"] in TERMINAL and parent_closed(experiment):
            return experiment
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} did not finish: {experiment}")


def wait_for(predicate: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def cmdline(pid: int) -> str:
    """A process's command line, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def environ(pid: int) -> bytes:
    """The environment a process started with, as /proc holds it (b"" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def processes_with(needle: str, where: str = "cmdline") -> list[int]:
    """PIDs whose /proc ``cmdline`` (or ``environ``) contains ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle.encode() in (entry / where).read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids
