"""The API when PostgreSQL is unreachable at start: it keeps answering ``/healthz``, reports
the database in ``/readyz``, answers 503 elsewhere, logs one clear line, and becomes ready by
itself once the database is reachable (no crash loop, no restart)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from service.execution import RayExecutor
from service.local import free_port
from service.main import create_app
from service.tracking import MlflowTracker
from tests.service.conftest import fresh_database
from tests.service.test_api import AUTH, TOKEN, UNREACHABLE, valid_study


class Forwarder:
    """A TCP forwarder from ``127.0.0.1:port`` to PostgreSQL, switched on when asked: until
    then connections to ``port`` are refused, as from a database host that is down."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._server: socket.socket | None = None

    def start(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database("dstlab_outage") as name:
        yield name


def test_api_waits_for_a_database_that_is_down_at_start(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    forwarder = Forwarder(port, ("127.0.0.1", 5432))
    settings = Settings(
        database_url=f"postgresql+psycopg://postgres:secret-pw@127.0.0.1:{port}/{database}",
        api_token=TOKEN,
        reconcile_interval_s=3600,
    )
    app = create_app(settings, RayExecutor(UNREACHABLE, timeout=1), MlflowTracker(UNREACHABLE))
    caplog.set_level(logging.INFO, logger="service.db")
    try:
        with TestClient(app) as client:  # starts although the database is down
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"] is False
            submitted = client.post("/experiments", json=valid_study(), headers=AUTH)
            assert submitted.status_code == 503, submitted.text
            assert "database" in submitted.json()["detail"]
            assert submitted.headers["retry-after"]
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1, [r.getMessage() for r in errors]
            assert "unreachable" in errors[0].getMessage()
            assert f"127.0.0.1:{port}/{database}" in errors[0].getMessage()
            assert "secret-pw" not in caplog.text  # the password is never logged

            forwarder.start()  # the database comes up
            deadline = time.monotonic() + 30
            while not client.get("/readyz").json()["database"]:
                assert time.monotonic() < deadline, "the API never saw the database come up"
                time.sleep(0.2)
            created = client.post("/experiments", json=valid_study(), headers=AUTH)
            assert created.status_code == 201, created.text
            assert client.get("/experiments", headers=AUTH).json()["total"] == 1
            assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    finally:
        forwarder.stop()
