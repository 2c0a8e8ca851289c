"""Database helpers: which errors a writer may retry (an outage) and which it may not."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, exc, text

from service.db import database_outage


def error_of(url: str, *statements: str) -> exc.SQLAlchemyError:
    """The error SQLAlchemy raises running ``statements`` on a fresh connection to ``url``."""
    engine = create_engine(url, connect_args={"connect_timeout": 2} if "postgresql" in url else {})
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    except exc.SQLAlchemyError as error:
        return error
    finally:
        engine.dispose()
    raise AssertionError("no error")


def test_an_unreachable_server_is_an_outage_a_wrong_write_is_not(tmp_path: Path) -> None:
    refused = error_of("postgresql+psycopg://u@127.0.0.1:1/test", "SELECT 1")
    assert isinstance(refused, exc.OperationalError) and database_outage(refused)
    sqlite = f"sqlite:///{tmp_path / 'db.sqlite'}"
    duplicate = error_of(
        sqlite, "CREATE TABLE t (id INTEGER PRIMARY KEY)", "INSERT INTO t VALUES (1)",
        "INSERT INTO t VALUES (1)",
    )  # fmt: skip
    assert isinstance(duplicate, exc.IntegrityError) and not database_outage(duplicate)
    assert database_outage(OSError(28, "No space left on device"))
    assert database_outage(exc.TimeoutError("QueuePool limit reached"))
    assert not database_outage(ValueError("a bug"))


@pytest.mark.parametrize("invalidated", [True, False])
def test_a_lost_connection_is_an_outage(invalidated: bool) -> None:
    lost = exc.DBAPIError("SELECT 1", {}, Exception("server closed the connection"))
    lost.connection_invalidated = invalidated
    assert database_outage(lost) is invalidated
