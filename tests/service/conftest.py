"""Session fixtures: one local Ray head and MLflow servers for the whole test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from service.local import LocalServices

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def local_ray() -> Iterator[str]:
    """A real local Ray head (2 CPUs, small object store) with the Jobs API."""
    with LocalServices() as services:
        yield services.start_ray(num_cpus=2, object_store_mb=200)


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on SQLite with a local artifact directory."""
    with LocalServices() as services:
        yield services.start_mlflow(tmp_path_factory.mktemp("mlflow"))


@contextmanager
def fresh_database(prefix: str = "dstlab") -> Iterator[str]:
    """A new PostgreSQL database on the local server, dropped afterwards; yields its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database shared by the session's tests."""
    with fresh_database() as name:
        yield name


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")
