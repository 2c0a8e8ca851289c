"""Many clients at once against a real server (uvicorn) on the default SQLite database and on
PostgreSQL, with Ray and MLflow unreachable: every submission is stored exactly once and
answered without a 5xx, and the liveness probe keeps answering meanwhile."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.service.conftest import POSTGRES
from tests.service.e2e import TOKEN, api
from tests.service.test_api import UNREACHABLE, valid_study

pytestmark = pytest.mark.slow
N = 100


def hammer(url: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    health: list[int] = []
    done = threading.Event()

    def probe() -> None:  # a liveness probe with a probe's timeout, all through the load
        with httpx.Client(timeout=5) as client:
            while not done.is_set():
                health.append(client.get(f"{url}/healthz").status_code)
                done.wait(0.2)

    def submit(i: int) -> tuple[int, str]:
        headers = auth | {"Idempotency-Key": f"key-{i}"}
        with httpx.Client(timeout=120) as client:
            response = client.post(
                f"{url}/experiments", json=valid_study(name=f"c{i}"), headers=headers
            )
            return response.status_code, response.text

    prober = threading.Thread(target=probe)
    prober.start()
    with ThreadPoolExecutor(N) as pool:
        answers = list(pool.map(submit, range(N)))
    done.set()
    prober.join()
    assert [code for code, _ in answers] == [201] * N, [a for a in answers if a[0] != 201][:3]
    with httpx.Client(timeout=30) as client:
        page = client.get(f"{url}/experiments", params={"limit": 500}, headers=auth).json()
    assert page["total"] == N
    assert sorted(e["name"] for e in page["items"]) == sorted(f"c{i}" for i in range(N))
    assert health and set(health) == {200}


def test_concurrent_submissions_on_sqlite(tmp_path: Path) -> None:
    with api(tmp_path, f"sqlite:///{tmp_path / 'c.db'}", UNREACHABLE, UNREACHABLE) as client:
        hammer(str(client.http.base_url))


@pytest.fixture
def own_postgres() -> Iterator[str]:
    """A PostgreSQL database of this test alone (no other API's dispatcher sees its rows)."""
    name = f"dstlab_c_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_concurrent_submissions_on_postgres(tmp_path: Path, own_postgres: str) -> None:
    with api(tmp_path, own_postgres, UNREACHABLE, UNREACHABLE) as client:
        hammer(str(client.http.base_url))
