"""The dispatcher: background work of the API process, and a shutdown that lets it finish."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from service import dispatcher as dispatcher_module
from service.db import make_engine, upgrade_database
from service.dispatcher import Dispatcher


@pytest.fixture
def slow_advance(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """``advance`` replaced by one that takes 0.5 s once started; records what it finished."""
    started, done = threading.Event(), []

    def advance(services: object, experiment_id: str) -> None:
        started.set()
        time.sleep(0.5)
        done.append(experiment_id)

    monkeypatch.setattr(dispatcher_module, "advance", advance)
    return started, done


def busy_dispatcher(tmp_path: Path, started: threading.Event) -> Dispatcher:
    """A started dispatcher that is advancing experiment ``e1``."""
    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    d = Dispatcher(SimpleNamespace(engine=engine), interval=60, threads=2)  # type: ignore[arg-type]
    d.start()
    d.request("e1")
    assert started.wait(5)
    return d


def test_stopping_waits_for_the_work_in_flight(tmp_path: Path, slow_advance) -> None:
    """A parent run being closed when the API stops is finished, not cut off at exit."""
    started, done = slow_advance
    d = busy_dispatcher(tmp_path, started)
    assert d.stop(wait=5) is True
    assert done == ["e1"]


def test_stopping_waits_no_longer_than_asked(tmp_path: Path, slow_advance) -> None:
    started, done = slow_advance
    d = busy_dispatcher(tmp_path, started)
    begin = time.monotonic()
    assert d.stop(wait=0.1) is False  # still busy: the process may exit with it running
    assert time.monotonic() - begin < 0.4 and done == []
