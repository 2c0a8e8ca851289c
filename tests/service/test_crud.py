"""The service database on SQLite and on the real PostgreSQL: migrations and guarded writes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import crud
from service.db import VERSION_TABLE, Base, make_engine, upgrade_database
from service.states import ExperimentStatus
from service.study import StudySpec, expand
from tests.service.conftest import POSTGRES


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'sub' / 'svc.db'}")
        upgrade_database(eng)
        yield eng
        eng.dispose()
        return
    name = f"dstcrud_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    eng = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    with eng.begin() as conn:  # a table of MLflow's name and its version table must not clash
        conn.execute(text("CREATE TABLE experiments (experiment_id integer primary key)"))
        conn.execute(text("CREATE TABLE alembic_version (version_num varchar(32) primary key)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('mlflow-head')"))
    upgrade_database(eng)
    yield eng
    eng.dispose()
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_experiment(session: Session, key: str | None = None, trials: int = 3) -> str:
    study = StudySpec.model_validate(
        {
            "name": "db",
            "model": "small-mlp",
            "dataset": "digits",
            "grid": {"seed": list(range(trials))},
        }
    )
    experiment_id = uuid.uuid4().hex
    crud.create_experiment(
        session,
        experiment_id=experiment_id,
        name=study.name,
        spec_json=study.model_dump_json(),
        plans=expand(study),
        idempotency_key=key,
    )
    session.commit()
    return experiment_id


def only_service_tables(name: str | None, kind: str, parent: object) -> bool:
    return kind != "table" or (name or "").startswith("dst_")


def test_migrations_match_the_models_and_are_idempotent(engine: Engine) -> None:
    upgrade_database(engine)  # second run: nothing to do
    with engine.connect() as conn:
        ours = {"version_table": VERSION_TABLE, "include_name": only_service_tables}
        context = MigrationContext.configure(conn, opts=ours)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from service.db import alembic_config

    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"the migrations branch: {heads}"
    return str(heads[0])


def test_experiments_that_ended_before_the_closing_time_was_kept_count_as_closed(
    tmp_path: Path,
) -> None:
    from alembic import command

    from service.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        for name, state, parent in [("a", "succeeded", "p"), ("b", "running", "p")]:
            conn.execute(
                text(
                    "INSERT INTO dst_experiments (id, name, status, spec_json, n_trials, "
                    "mlflow_parent_run_id, created_at, updated_at, finished_at) VALUES "
                    "(:id, 'x', :state, '{}', 0, :parent, '2026-01-01', '2026-01-01', "
                    "'2026-01-02')"
                ),
                {"id": name, "state": state, "parent": parent},
            )
    upgrade_database(engine)
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT id, mlflow_closed_at FROM dst_experiments")).all())
    assert rows["a"] is not None and rows["b"] is None


def test_a_trial_on_many_hosts_is_stored_with_all_of_them(engine: Engine) -> None:
    """A DDP trial's node names every host of its workers (16 long host names here)."""
    hosts = ",".join(f"ray-worker-gpu-{n:02d}.cluster.internal.example.org" for n in range(16))
    assert len(hosts) > 255
    with Session(engine) as session:
        experiment_id = add_experiment(session)
        crud.update_trial(session, experiment_id, 0, node=hosts)
        session.commit()
    with Session(engine) as session:
        row = crud.get_trial(session, experiment_id, 0)
        assert row is not None and row.node == hosts


def test_a_downgrade_below_the_wide_node_column_cuts_long_host_lists(engine: Engine) -> None:
    from alembic import command

    from service.db import alembic_config

    with Session(engine) as session:
        experiment_id = add_experiment(session)
        crud.update_trial(session, experiment_id, 0, node="h" * 300)
        crud.update_trial(session, experiment_id, 1, node="worker-a")
        session.commit()
    command.downgrade(alembic_config(engine.url.render_as_string(hide_password=False)), "0006")
    with engine.connect() as conn:
        rows = dict(conn.execute(text("SELECT trial_index, node FROM dst_trials")).all())
    assert rows == {0: "h" * 255, 1: "worker-a", 2: None}


def test_a_trial_keeps_its_node_when_the_column_widens(tmp_path: Path) -> None:
    from alembic import command

    from service.db import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0006")
    engine = make_engine(url)
    with engine.begin() as conn:  # rows as 0006 stores them (the models are today's)
        now = {"t": datetime.now(UTC)}
        conn.execute(
            text(
                "INSERT INTO dst_experiments (id, name, status, spec_json, n_trials, created_at, "
                "updated_at) VALUES ('e1', 'db', 'running', '{}', 2, :t, :t)"
            ),
            now,
        )
        for index, node, gpus in [(0, None, None), (1, "worker-a", "0")]:
            conn.execute(
                text(
                    "INSERT INTO dst_trials (experiment_id, trial_index, label, spec_json, state, "
                    "epoch, node, gpus, updated_at) "
                    "VALUES ('e1', :index, 'l', '{}', 'running', 0, :node, :gpus, :t)"
                ),
                now | {"index": index, "node": node, "gpus": gpus},
            )
    upgrade_database(engine)
    with Session(engine) as session:
        rows = {t.index: (t.node, t.gpus) for t in crud.list_trials(session, "e1")}
    assert rows == {0: (None, None), 1: ("worker-a", "0")}


def test_epochs_form_each_trials_history_and_a_repeated_epoch_replaces_its_row(
    engine: Engine,
) -> None:
    with Session(engine) as session:
        experiment_id = add_experiment(session)
        for index, epoch, loss in [(0, 1, 0.9), (0, 2, 0.5), (1, 1, 0.8), (0, 2, 0.4)]:
            crud.record_epoch(session, experiment_id, index, {"epoch": epoch, "loss": loss})
        session.commit()
    with Session(engine) as session:
        histories = crud.trial_histories(session, experiment_id)
        assert histories == {
            0: [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.4}],
            1: [{"epoch": 1, "loss": 0.8}],
        }
        assert crud.trial_histories(session, experiment_id, [1]) == {1: histories[1]}
        assert crud.trial_histories(session, "unknown") == {}


def test_experiment_with_trials_round_trips(engine: Engine) -> None:
    with Session(engine) as session:
        experiment_id = add_experiment(session)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        assert experiment is not None and experiment.status == "queued" and experiment.n_trials == 3
        assert [t.index for t in crud.list_trials(session, experiment_id)] == [0, 1, 2]
        assert crud.trial_counts_by_state(session, experiment_id) == {"pending": 3}


def test_idempotency_key_is_unique(engine: Engine) -> None:
    with Session(engine) as session:
        first = add_experiment(session, key="k1")
        assert crud.get_by_idempotency_key(session, "k1").id == first  # type: ignore[union-attr]
        with pytest.raises(IntegrityError):
            add_experiment(session, key="k1")


def test_status_moves_only_along_the_lifecycle(engine: Engine) -> None:
    with Session(engine) as session:
        eid = add_experiment(session)
        assert not crud.set_experiment_status(session, eid, "cancelling")  # queued: not yet
        assert crud.set_experiment_status(session, eid, "submitted")
        assert crud.set_experiment_status(session, eid, "running")
        assert not crud.set_experiment_status(session, eid, "running", only_from=("queued",))
        assert crud.set_experiment_status(session, eid, "cancelling")
        assert not crud.set_experiment_status(session, eid, "succeeded")  # cancelling wins
        assert crud.set_experiment_status(session, eid, "cancelled")
        assert not crud.set_experiment_status(session, eid, "running")  # terminal stays
        session.commit()
        experiment = crud.get_experiment(session, eid)
        assert experiment is not None and experiment.status == "cancelled"
        assert experiment.finished_at is not None


def test_terminal_trials_ignore_late_reports(engine: Engine) -> None:
    with Session(engine) as session:
        eid = add_experiment(session)
        assert crud.update_trial(
            session, eid, 0, state="running", epoch=1, metrics={"test_acc": 0.5}
        )
        assert crud.finish_unfinished_trials(session, eid, "cancelled") == 3
        assert not crud.update_trial(session, eid, 0, state="running")
        assert crud.update_trial(session, eid, 0, epoch=2)  # progress without state is kept
        session.commit()
        trial = crud.list_trials(session, eid)[0]
        assert (trial.state, trial.epoch) == ("cancelled", 2)
        assert crud.trial_metrics(trial) == {"test_acc": 0.5}
        with pytest.raises(ValueError, match="unknown trial fields"):
            crud.update_trial(session, eid, 0, colour="red")


def test_list_filters_and_pages(engine: Engine) -> None:
    with Session(engine) as session:
        ids = [add_experiment(session, trials=1) for _ in range(5)]
        crud.set_experiment_status(session, ids[0], "submitted")
        session.commit()
        items, total = crud.list_experiments(session, offset=1, limit=2)
        assert total == 5 and len(items) == 2
        items, total = crud.list_experiments(session, status="submitted")
        assert total == 1 and items[0].id == ids[0]
        assert {e.id for e in crud.live_experiments(session)} == set(ids)


def test_a_live_experiments_notice_is_kept_until_it_ends(engine: Engine) -> None:
    with Session(engine) as session:
        experiment_id = add_experiment(session)
        for status in (ExperimentStatus.SUBMITTED, ExperimentStatus.RUNNING):
            crud.set_experiment_status(session, experiment_id, status)
        crud.set_experiment_notice(session, experiment_id, "2 trials wait for a node")
        session.commit()
    with Session(engine) as session:
        assert crud.get_experiment(session, experiment_id).notice == "2 trials wait for a node"  # type: ignore[union-attr]
        crud.set_experiment_status(session, experiment_id, ExperimentStatus.FAILED, error="x")
        crud.set_experiment_notice(session, experiment_id, "too late")  # ended: none kept
        session.commit()
    with Session(engine) as session:
        assert crud.get_experiment(session, experiment_id).notice is None  # type: ignore[union-attr]


def test_a_status_move_replaces_the_launchs_retry_error(engine: Engine) -> None:
    """The launch's "retrying" is written only while the experiment is queued, and the move
    that follows (its job's driver started, or a cancel) leaves no stale error behind."""
    retrying = "launch failed, retrying: no answer"
    queued = [ExperimentStatus.QUEUED]
    with Session(engine) as session:
        eid = add_experiment(session)
        assert crud.set_error(session, eid, retrying, only_in=queued)
        assert crud.set_experiment_status(session, eid, ExperimentStatus.RUNNING)
        assert not crud.set_error(session, eid, retrying, only_in=queued)  # too late
        session.commit()
        assert crud.get_experiment(session, eid).error is None  # type: ignore[union-attr]
        assert crud.set_experiment_status(session, eid, ExperimentStatus.FAILED, error="x")
        assert not crud.set_experiment_status(session, eid, ExperimentStatus.CANCELLED)
        session.commit()
        assert crud.get_experiment(session, eid).error == "x"  # type: ignore[union-attr]
