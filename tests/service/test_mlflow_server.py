"""The embedded MLflow server: MLflow's own command, with its uvicorn run in the same process."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from service.local import LocalServices
from service.mlflow_server import uvicorn_arguments


def test_only_a_uvicorn_command_is_run_in_process() -> None:
    cmd = ["/venv/bin/python", "-m", "uvicorn", "--host", "127.0.0.1", "--port", "5000", "app"]
    assert uvicorn_arguments(cmd) == ["--host", "127.0.0.1", "--port", "5000", "app"]
    assert uvicorn_arguments(["/venv/bin/python", "-m", "gunicorn", "app"]) is None
    assert uvicorn_arguments(["huey_consumer", "tasks"]) is None


def _children(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return [c for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_the_server_is_one_process_that_tracks_and_stops(tmp_path: Path) -> None:
    """One process serves (no second Python importing MLflow again), runs and artifacts
    round-trip through it, and SIGTERM stops it at once."""
    local = LocalServices()
    try:
        uri = local.start_mlflow(tmp_path)
        ((_, proc),) = local.processes
        assert _children(proc.pid) == []
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("one-process"))
        client.log_metric(run.info.run_id, "acc", 0.5, step=1)
        client.log_dict(run.info.run_id, {"a": 1}, "d.json")
        assert client.get_metric_history(run.info.run_id, "acc")[0].value == 0.5
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["d.json"]
    finally:
        start = time.monotonic()
        local.stop(grace=10)
    assert proc.returncode is not None and time.monotonic() - start < 5
