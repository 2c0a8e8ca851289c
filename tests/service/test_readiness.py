"""Readiness answers within its deadline however slow a dependency is, and never piles up
calls to a hung one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from service.core.config import Settings
from service.execution import RayExecutor
from service.lifecycle import Services
from service.main import create_app
from service.readiness import ReadinessProbe
from service.tracking import MlflowTracker


class Pinger:
    """A dependency whose ping blocks until ``release`` is set (``None``: answers at once)."""

    def __init__(self, answer: bool = True, release: threading.Event | None = None) -> None:
        self.answer, self.release, self.calls = answer, release, 0

    def ping(self) -> bool:
        self.calls += 1
        if self.release is not None:
            self.release.wait(10)
        return self.answer


def probe(ray: Pinger, mlflow: Pinger, deadline_s: float = 0.3) -> ReadinessProbe:
    services = Services(engine=create_engine("sqlite://"), executor=ray, tracker=mlflow)  # type: ignore[arg-type]
    return ReadinessProbe(services, deadline_s=deadline_s)


def test_every_dependency_answering_is_ready() -> None:
    ready = probe(Pinger(), Pinger())
    assert ready.check() == {"database": True, "ray": True, "mlflow": True}
    assert ready.check(skip=frozenset({"database"})) == {
        "database": False,
        "ray": True,
        "mlflow": True,
    }
    ready.close()  # the app is stopping: not ready, and no thread started
    assert ready.check() == {"database": False, "ray": False, "mlflow": False}
    assert ready._start("ray").result(timeout=1) is False  # a probe begun before the close


def test_a_hung_dependency_is_not_ready_by_the_deadline_and_is_not_called_again() -> None:
    release = threading.Event()
    hung, fine = Pinger(release=release), Pinger()
    ready = probe(hung, fine)
    for _ in range(5):
        started = time.monotonic()
        assert ready.check() == {"database": True, "ray": False, "mlflow": True}
        assert time.monotonic() - started < 2.0
    assert hung.calls == 1 and fine.calls == 5  # the hung call is waited on, not repeated
    release.set()
    deadline = time.monotonic() + 5
    while not ready.check()["ray"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.check()["ray"]  # back once the call under way answered
    ready.close()


def test_a_failing_check_is_not_ready() -> None:
    class Broken:
        def ping(self) -> bool:
            raise OSError("refused")

    ready = probe(Broken(), Pinger(answer=False))  # type: ignore[arg-type]
    assert ready.check() == {"database": True, "ray": False, "mlflow": False}
    ready.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung host)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(100)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_readyz_answers_in_seconds_when_ray_and_mlflow_hang(
    tmp_path: Path, silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each client waits up to its 10 s timeout; /readyz does not wait for them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    settings = Settings(
        storage_path=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'api.db'}",
        api_token="t" * 32,
        reconcile_interval_s=3600,
    )
    app = create_app(settings, RayExecutor(silent_server, timeout=10), MlflowTracker(silent_server))
    with TestClient(app) as client:
        for _ in range(2):
            started = time.monotonic()
            response = client.get("/readyz")
            assert time.monotonic() - started < 6.0
            assert response.status_code == 503
            assert response.json() == {
                "ready": False,
                "database": True,
                "ray": False,
                "mlflow": False,
            }
