"""The service database: experiments, their trials and the trials' per-epoch metrics
(SQLAlchemy ORM, Alembic migrations).

SQLite (the embedded default) and PostgreSQL (a cluster) are both supported. The API and the
Ray job drivers write to it (trials never do), so SQLite runs in WAL mode with a busy timeout.
Tables are prefixed ``dst_`` so one PostgreSQL database can also hold MLflow's tables.
The schema is created and upgraded only by Alembic (:func:`upgrade_database`), never by
``create_all``, so a deployed database can be migrated.
"""

from __future__ import annotations

import functools
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Prefixed names, so the service may share a database with MLflow (which has "experiments").
VERSION_TABLE = "dst_alembic_version"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    """One submitted study (a Ray job, an MLflow parent run)."""

    __tablename__ = "dst_experiments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)  # an ExperimentStatus
    spec_json: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    n_trials: Mapped[int] = mapped_column(Integer)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # what it waits for while it waits (its job driver's word: trials no node can hold)
    notice: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # when its MLflow parent run was closed (results, analysis, status); unset while that is
    # still to do, so an MLflow outage at the end is retried
    mlflow_closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    trials: Mapped[list[Trial]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", order_by="Trial.index"
    )


class Trial(Base):
    """One run of a study's grid (a Ray Tune trial, an MLflow child run)."""

    __tablename__ = "dst_trials"
    __table_args__ = (UniqueConstraint("experiment_id", "trial_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("dst_experiments.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column("trial_index", Integer)
    label: Mapped[str] = mapped_column(String(300))
    spec_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # a TrialState
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int | None] = mapped_column(Integer)
    metrics_json: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    resumed_from_epoch: Mapped[int | None] = mapped_column(Integer)  # last resume, if any
    node: Mapped[str | None] = mapped_column(Text)  # hosts it runs on (service.trial)
    gpus: Mapped[str | None] = mapped_column(Text)  # GPU ids Ray gave it (service.trial)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    experiment: Mapped[Experiment] = relationship(back_populates="trials")


class TrialEpoch(Base):
    """One epoch's metrics of one trial: the history its learning curves are drawn from
    (Figures 2, 4 and 18). Written by the job driver once per epoch; an epoch repeated after
    a restore from a checkpoint replaces its row."""

    __tablename__ = "dst_trial_epochs"
    __table_args__ = (UniqueConstraint("experiment_id", "trial_index", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("dst_experiments.id", ondelete="CASCADE"), index=True
    )
    index: Mapped[int] = mapped_column("trial_index", Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics_json: Mapped[str] = mapped_column(Text)


# enough connections for every request thread (the server's pool of 40) and the background
# threads at once, so a request never waits for a connection behind other requests
POOL_SIZE, POOL_OVERFLOW = 20, 40
CONNECT_TIMEOUT_S = 10


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and its directory created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            pool_timeout=60,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_timeout=60,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},  # a blackholed host fails, bounded
    )


@functools.cache
def shared_engine(url: str) -> Engine:
    """This process's one engine for ``url``. A job driver's own steps, its recorder and its
    capacity watch share it, so each driver holds one connection pool, not one per part
    (the API process builds its engine with :func:`make_engine` and owns it)."""
    return make_engine(url)


def alembic_config(url: str) -> Config:
    """An Alembic configuration for the service's migrations against ``url`` (Alembic is
    imported here, not by the job drivers that share this module: only the API migrates)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(engine: Engine) -> None:
    """Create or upgrade the schema to the newest migration (idempotent)."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def upgrade_when_reachable(
    engine: Engine, ready: threading.Event, stop: threading.Event, interval: float = 2.0
) -> None:
    """Upgrade the schema, retrying every ``interval`` s while the database is unreachable,
    until it succeeds (then set ``ready``) or ``stop`` is set. Says once what is wrong and
    once that it recovered, so a database that is down at start is one clear log line, not
    a crash loop."""
    where = engine.url.render_as_string(hide_password=True)
    failing = False
    while not stop.is_set():
        try:
            upgrade_database(engine)
        except Exception as error:
            if not failing:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else error
                log.error("the database at %s is unreachable (%s); retrying", where, reason)
                failing = True
            stop.wait(interval)
            continue
        if failing:
            log.info("the database at %s is reachable; schema up to date", where)
        ready.set()
        return


def database_outage(error: BaseException) -> bool:
    """A database error that retrying may cure: the server restarts or dropped the connection,
    SQLite stayed locked, the pool had no free connection, or the disk failed (an OSError).
    The job driver's recorder retries its writes on these, and MLflow's outbox the run ids
    it stores (SQLAlchemy's errors are no OSErrors)."""
    if isinstance(error, exc.DBAPIError):  # OperationalError: lost, refused, locked
        return isinstance(error, exc.OperationalError) or error.connection_invalidated
    return isinstance(error, OSError | exc.TimeoutError)
