"""The job driver's recorder: Tune events become trial rows (real SQLite) and MLflow writes
(an in-memory fake of the child-run writer, which has its own tests)."""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dst.masks import load_masks, save_masks
from dst.spec import RunSpec
from service import crud
from service.analysis import FINAL, FIRST_REMOVAL, INITIAL
from service.db import make_engine, upgrade_database
from service.recorder import TrialRecorder, checkpoint_dir, recorder_for
from service.states import TrialState
from service.study import StudySpec, expand
from service.tracking import Opening
from service.trial import GPUS, INITIAL_MASKS, MASKS, METRICS, NODE, REMOVAL_LAYERS, RESUMED

EXPERIMENT = "e" * 32


@dataclass
class FakeTrial:
    """The parts of a Tune trial the recorder reads."""

    config: dict[str, Any]
    path: str
    error_file: str | None = None


@dataclass
class FakeRuns:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def start(self, index: int, opening: Callable[[], Opening | None]) -> None:
        found = opening()  # (the real one waits for it on its outbox thread)
        if found is None:
            self.calls.append(("no run", index))  # its row could not be read
        else:
            self.calls.append(("start", index, found.run_id, found.resumed))

    def mark_resumed(self, index: int, epoch: int) -> None:
        self.calls.append(("resumed", index, epoch))

    def mark_placement(self, index: int, node: str, gpus: str) -> None:
        self.calls.append(("placement", index, node, gpus))

    def log_epoch(self, index: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch", index, int(metrics["epoch"])))

    def log_masks(self, index: int, source: Path, name: str) -> None:
        assert source.exists()
        self.calls.append(("masks", index, name, source.name))

    def log_figures(self, index: int, builders: dict[str, Any]) -> None:
        for name, build in builders.items():
            assert build().axes  # a drawn figure
            self.calls.append(("figure", index, name))

    def finish(self, index: int, status: str) -> None:
        self.calls.append(("finish", index, str(status)))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(eng)
    study = StudySpec.model_validate(
        {
            "name": "s",
            "model": "small-mlp",
            "dataset": "digits",
            "training": {"epochs": 2},
            "grid": {"seed": [0, 1]},
        }
    )
    with Session(eng) as session:
        crud.create_experiment(
            session,
            experiment_id=EXPERIMENT,
            name="s",
            spec_json=study.model_dump_json(),
            plans=expand(study),
        )
        session.commit()
    return eng


def tune_trial(tmp_path: Path, index: int = 0) -> FakeTrial:
    with Session(make_engine(f"sqlite:///{tmp_path / 'svc.db'}")) as session:
        row = crud.get_trial(session, EXPERIMENT, index)
        assert row is not None
        spec = row.spec_json
    return FakeTrial({"trial": {"index": index, "spec": json.loads(spec)}}, str(tmp_path))


def checkpoint(tmp_path: Path, name: str) -> None:
    directory = tmp_path / name
    directory.mkdir()
    masks = {"fc1.weight": torch.ones(2, 2, dtype=torch.bool)}
    save_masks(masks, directory / INITIAL_MASKS)
    save_masks(masks, directory / MASKS)
    (directory / REMOVAL_LAYERS).write_text('{"set": {"fc1.weight": 0.5}}')


def row(engine: Engine, index: int = 0) -> Any:
    with Session(engine) as session:
        found = crud.get_trial(session, EXPERIMENT, index)
        assert found is not None
        session.expunge(found)
        return found


def settle(recorder: TrialRecorder) -> None:
    """Wait for the database writes the recorder queued."""
    assert recorder.wait(timeout=10), "the recorder's database writes did not end"


def result(epoch: int, directory: str) -> dict[str, Any]:
    metrics = {"epoch": epoch, "test_acc": 0.5, "val_acc": 0.4, "train_loss": 1.0 / epoch}
    return {METRICS: metrics, "checkpoint_dir_name": directory}


def test_a_trial_from_start_to_success(engine: Engine, tmp_path: Path) -> None:
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).state == TrialState.RUNNING and row(engine).started_at is not None
    checkpoint(tmp_path, "checkpoint_000000")
    recorder.on_trial_result(0, [], trial, result(1, "checkpoint_000000"))  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).epoch == 1 and crud.trial_metrics(row(engine))["test_acc"] == 0.5  # type: ignore[index]
    checkpoint(tmp_path, "checkpoint_000001")
    recorder.on_trial_result(0, [], trial, result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    done = row(engine)
    assert done.state == TrialState.SUCCEEDED and done.finished_at is not None
    assert done.resumed_from_epoch is None
    assert runs.calls == [
        ("start", 0, None, None),
        ("epoch", 0, 1),
        ("masks", 0, "initial", INITIAL_MASKS),
        ("epoch", 0, 2),
        ("masks", 0, "final", MASKS),  # epoch 2 is the last
        ("figure", 0, "learning_curves"),  # from the history the recorder stored
        ("finish", 0, "succeeded"),
    ]


def test_a_resumed_trial_continues_its_run_and_says_so(engine: Engine, tmp_path: Path) -> None:
    with Session(engine) as session:
        crud.update_trial(session, EXPERIMENT, 1, epoch=1, mlflow_run_id="run-1", error="boom")
        session.commit()
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    recorder.on_trial_start(0, [], tune_trial(tmp_path, 1))  # type: ignore[arg-type]
    settle(recorder)
    resumed = row(engine, 1)
    assert resumed.resumed_from_epoch == 1 and resumed.error is None
    assert runs.calls == [("start", 1, "run-1", 1)]


def test_retry_keeps_the_error_visible_and_a_final_error_fails(
    engine: Engine, tmp_path: Path
) -> None:
    (tmp_path / "error.txt").write_text("Traceback ...\nValueError: worker died")
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    trial.error_file = str(tmp_path / "error.txt")
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_recover(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).state == TrialState.RUNNING
    assert "retrying after" in row(engine).error and "worker died" in row(engine).error
    recorder.on_trial_error(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).state == TrialState.FAILED and "worker died" in row(engine).error
    assert runs.calls[-1] == ("finish", 0, "failed")


def test_a_late_report_never_undoes_a_terminal_state(engine: Engine, tmp_path: Path) -> None:
    recorder = TrialRecorder(engine, EXPERIMENT, None)
    trial = tune_trial(tmp_path)
    with Session(engine) as session:
        crud.finish_unfinished_trials(session, EXPERIMENT, TrialState.CANCELLED)
        session.commit()
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).state == TrialState.CANCELLED


def test_reports_without_metrics_or_masks_are_fine(engine: Engine, tmp_path: Path) -> None:
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    recorder.on_trial_result(0, [], trial, {"done": True})  # type: ignore[arg-type]
    settle(recorder)
    (tmp_path / "dense").mkdir()  # a dense run's checkpoint has no masks
    recorder.on_trial_result(0, [], trial, result(1, "dense"))  # type: ignore[arg-type]
    settle(recorder)
    assert runs.calls == [("epoch", 0, 1)]


def test_checkpoint_dir_of_single_and_multi_worker_reports(tmp_path: Path) -> None:
    trial = FakeTrial({}, str(tmp_path))
    assert checkpoint_dir(trial, {"checkpoint_dir_name": "c1"}) == tmp_path / "c1"  # type: ignore[arg-type]
    train = {"checkpoint_path": "/shared/ddp/checkpoint_2", "checkpoint_dir_name": None}
    assert checkpoint_dir(trial, train) == Path("/shared/ddp/checkpoint_2")  # type: ignore[arg-type]
    assert checkpoint_dir(trial, {}) is None  # type: ignore[arg-type]


def test_tune_saves_the_recorder_without_the_database_url(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    monkeypatch.setenv("DST_DATABASE_URL", url)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recorder_for.cache_clear()
    recorder = recorder_for(EXPERIMENT)
    saved = pickle.dumps(recorder)
    assert url.encode() not in saved and b"svc.db" not in saved
    assert pickle.loads(saved) is recorder  # restored Tune state gets the live recorder
    recorder_for.cache_clear()


def test_a_restored_trial_reports_its_resume_and_epochs_are_logged_once(
    engine: Engine, tmp_path: Path
) -> None:
    """A multi-worker trial's group restarts inside Tune's trial: it says from which epoch;
    an epoch computed again after the restore is not logged twice."""
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    for epoch in (1, 2):
        recorder.on_trial_result(0, [], trial, result(epoch, "none"))  # type: ignore[arg-type]
    again = result(2, "none") | {RESUMED: 1}
    recorder.on_trial_result(0, [], trial, again)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).resumed_from_epoch == 1 and row(engine).epoch == 2
    assert runs.calls == [("epoch", 0, 1), ("epoch", 0, 2), ("resumed", 0, 1)]
    with Session(engine) as session:  # the history holds each epoch once
        history = crud.trial_histories(session, EXPERIMENT)[0]
    assert [m["epoch"] for m in history] == [1, 2]


def test_a_restore_that_replays_several_epochs_logs_none_twice(
    engine: Engine, tmp_path: Path
) -> None:
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    for epoch in (1, 2, 3):
        recorder.on_trial_result(0, [], trial, result(epoch, "none"))  # type: ignore[arg-type]
    replay = [result(2, "none") | {RESUMED: 1}, result(3, "none"), result(4, "none")]
    for again in replay:  # back to the checkpoint after epoch 1, then on past epoch 3
        recorder.on_trial_result(0, [], trial, again)  # type: ignore[arg-type]
    epochs = [call[2] for call in runs.calls if call[0] == "epoch"]
    assert epochs == [1, 2, 3, 4]


def test_initial_masks_come_from_the_first_checkpoint_still_on_storage(
    engine: Engine, tmp_path: Path
) -> None:
    """A multi-worker trial's reports arrive late: epoch 1's checkpoint may already be gone
    (only the newest are kept); every checkpoint holds the initial masks."""
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    recorder.on_trial_result(0, [], trial, result(1, "deleted"))  # type: ignore[arg-type]
    checkpoint(tmp_path, "checkpoint_000001")
    recorder.on_trial_result(0, [], trial, result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    settle(recorder)
    assert [c for c in runs.calls if c[0] == "masks"] == [
        ("masks", 0, "initial", INITIAL_MASKS),
        ("masks", 0, "final", MASKS),  # epoch 2 is the last
    ]


def test_the_trial_row_says_where_it_runs_from_its_first_report_after_each_start(
    engine: Engine, tmp_path: Path
) -> None:
    """A trial's placement report (before any epoch) names its hosts and GPUs; epochs leave
    them; a retry makes them unknown until its own placement report, which may name another
    host; a CPU trial's empty GPU list is None. The child run is tagged once per start."""
    runs = FakeRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    assert (row(engine).node, row(engine).gpus) == (None, None)
    recorder.on_trial_result(0, [], trial, {NODE: "a", GPUS: "0", "hostname": "tune"})  # type: ignore[arg-type]
    settle(recorder)
    assert (row(engine).node, row(engine).gpus, row(engine).epoch) == ("a", "0", 0)
    recorder.on_trial_result(0, [], trial, result(1, "none") | {"hostname": "tune"})  # type: ignore[arg-type]
    settle(recorder)
    assert (row(engine).node, row(engine).gpus, row(engine).epoch) == ("a", "0", 1)
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]  # a retry: unknown again
    settle(recorder)
    assert (row(engine).node, row(engine).gpus) == (None, None)
    recorder.on_trial_result(0, [], trial, {NODE: "a,b", GPUS: "a:1,b:0"})  # type: ignore[arg-type]
    settle(recorder)
    assert (row(engine).node, row(engine).gpus) == ("a,b", "a:1,b:0")
    recorder.on_trial_result(0, [], trial, result(2, "none") | {RESUMED: 1})  # type: ignore[arg-type]
    settle(recorder)
    assert (row(engine).node, row(engine).resumed_from_epoch) == ("a,b", 1)
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, {NODE: "c", GPUS: ""})  # type: ignore[arg-type]
    settle(recorder)
    assert (row(engine).node, row(engine).gpus) == ("c", None)
    assert [c for c in runs.calls if c[0] == "placement"] == [
        ("placement", 0, "a", "0"),
        ("placement", 0, "a,b", "a:1,b:0"),
        ("placement", 0, "c", ""),
    ]


def test_a_finished_trial_keeps_its_masks_for_the_analysis(engine: Engine, tmp_path: Path) -> None:
    """Without MLflow too: the masks go to the shared storage after the last epoch only."""
    store = tmp_path / "masks" / EXPERIMENT
    recorder = TrialRecorder(engine, EXPERIMENT, None, store)
    trial = tune_trial(tmp_path)
    checkpoint(tmp_path, "checkpoint_000000")
    recorder.on_trial_result(0, [], trial, result(1, "checkpoint_000000"))  # type: ignore[arg-type]
    settle(recorder)
    assert not (store / "0").exists()  # epoch 1 of 2
    checkpoint(tmp_path, "checkpoint_000001")
    recorder.on_trial_result(0, [], trial, result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    settle(recorder)
    kept = {p.name for p in (store / "0").iterdir()}
    assert kept == {INITIAL, FINAL, FIRST_REMOVAL}
    assert load_masks(store / "0" / FINAL)["fc1.weight"].all()


def database_error(statement: str = "UPDATE trials") -> exc.OperationalError:
    """What SQLAlchemy raises while the database restarts or stays locked."""
    return exc.OperationalError(statement, {}, sqlite3.OperationalError("database is locked"))


def fail_updates(monkeypatch: pytest.MonkeyPatch, error: Exception, times: int) -> list[dict]:
    """Make the recorder's row updates fail ``times`` times with ``error``, then work; returns
    the fields of every attempt."""
    real, attempts = crud.update_trial, []

    def update(session: Session, experiment_id: str, index: int, **fields: Any) -> bool:
        attempts.append(fields)
        if len(attempts) <= times:
            raise error
        return real(session, experiment_id, index, **fields)

    monkeypatch.setattr(crud, "update_trial", update)
    return attempts


def impatient(recorder: TrialRecorder, final: int, progress: int) -> TrialRecorder:
    """Retry a trial's lasting writes ``final`` times and its progress ``progress`` times,
    without pausing."""
    recorder.final_pauses_s = (0.0,) * final
    recorder.progress_pauses_s = (0.0,) * progress
    return recorder


def test_a_database_blip_is_retried_and_the_final_state_lands(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = impatient(TrialRecorder(engine, EXPERIMENT, None), final=3, progress=1)
    attempts = fail_updates(monkeypatch, database_error(), times=2)
    recorder.on_trial_complete(0, [], tune_trial(tmp_path))  # type: ignore[arg-type]
    settle(recorder)
    assert len(attempts) == 3 and row(engine).state == TrialState.SUCCEEDED


def test_an_epoch_gives_up_sooner_than_a_final_state(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later report supersedes an epoch's row: it is retried less than a trial's end."""
    recorder = impatient(TrialRecorder(engine, EXPERIMENT, None), final=3, progress=1)
    attempts = fail_updates(monkeypatch, database_error(), times=100)
    trial = tune_trial(tmp_path)
    recorder.on_trial_result(0, [], trial, result(1, "none"))  # type: ignore[arg-type]
    settle(recorder)
    assert len(attempts) == 2  # the first try and one retry
    recorder.on_trial_error(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert len(attempts) == 2 + 4
    assert row(engine).state == TrialState.PENDING  # skipped, and said so in the log


def test_a_write_that_cannot_work_is_skipped_at_once(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = impatient(TrialRecorder(engine, EXPERIMENT, None), final=3, progress=1)
    attempts = fail_updates(monkeypatch, ValueError("not a database outage"), times=100)
    recorder.on_trial_complete(0, [], tune_trial(tmp_path))  # type: ignore[arg-type]
    settle(recorder)
    assert len(attempts) == 1


def test_no_tune_callback_raises_while_the_database_is_gone(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tune fails the whole study when a callback raises: the recorder logs and goes on, and
    MLflow still gets the trial's epochs, masks and end."""
    trial = tune_trial(tmp_path)
    checkpoint(tmp_path, "checkpoint_000001")
    runs = FakeRuns()
    store = tmp_path / "masks-store"
    gone = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every query fails
    recorder = impatient(TrialRecorder(gone, EXPERIMENT, runs, store), final=1, progress=1)  # type: ignore[arg-type]
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, {NODE: "a", GPUS: ""})  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    recorder.on_trial_recover(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_error(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert runs.calls == [
        ("no run", 0),  # the trial's row (its spec, its run) could not be read
        ("placement", 0, "a", ""),
        ("epoch", 0, 2),
        ("masks", 0, "initial", INITIAL_MASKS),
        ("masks", 0, "final", MASKS),
        ("finish", 0, "failed"),
        ("finish", 0, "succeeded"),  # no figures: the history could not be read
    ]
    assert {p.name for p in (store / "0").iterdir()} == {INITIAL, FINAL, FIRST_REMOVAL}
    assert "the database is unreachable" in caplog.text


def test_no_tune_callback_raises_whatever_fails(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk for the kept masks, an MLflow writer that raises: logged, never raised."""

    class BrokenRuns(FakeRuns):
        def __getattribute__(self, name: str) -> Any:
            if name in {"start", "log_epoch", "log_masks", "finish", "mark_placement"}:
                raise RuntimeError(f"{name} broke")
            return super().__getattribute__(name)

    trial = tune_trial(tmp_path)
    checkpoint(tmp_path, "checkpoint_000001")
    not_a_dir = tmp_path / "full-disk"
    not_a_dir.write_text("")  # the masks cannot be kept under it
    recorder = TrialRecorder(engine, EXPERIMENT, BrokenRuns(), not_a_dir)  # type: ignore[arg-type]
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, {NODE: "a", GPUS: ""})  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).state == TrialState.SUCCEEDED and row(engine).epoch == 2
    assert "start broke" in caplog.text


def test_keeping_masks_is_best_effort(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy for the analysis fails (a full disk): the epoch and the MLflow masks still
    count, with a warning."""
    runs = FakeRuns()
    not_a_dir = tmp_path / "full-disk"
    not_a_dir.write_text("")
    recorder = TrialRecorder(engine, EXPERIMENT, runs, not_a_dir)  # type: ignore[arg-type]
    checkpoint(tmp_path, "checkpoint_000001")
    recorder.on_trial_result(0, [], tune_trial(tmp_path), result(2, "checkpoint_000001"))  # type: ignore[arg-type]
    settle(recorder)
    assert row(engine).epoch == 2 and ("masks", 0, "final", MASKS) in runs.calls
    assert "could not keep the masks of trial 0" in caplog.text


def test_storing_a_run_id_raises_for_the_outbox_to_retry(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run id is stored from MLflow's outbox, which retries it as long as it retries
    MLflow: the recorder does not swallow the error."""
    recorder = TrialRecorder(engine, EXPERIMENT, None)
    fail_updates(monkeypatch, database_error(), times=1)
    with pytest.raises(exc.OperationalError):
        recorder.store_run_id(0, "run-0")
    recorder.store_run_id(0, "run-0")
    assert row(engine).mlflow_run_id == "run-0"


class PatientRuns(FakeRuns):
    """Child runs that, like the real ones, read a trial's opening later, on their own
    thread (here: when the test asks)."""

    def __init__(self) -> None:
        super().__init__()
        self.openings: list[Callable[[], Opening | None]] = []

    def start(self, index: int, opening: Callable[[], Opening | None]) -> None:
        self.openings.append(opening)
        self.calls.append(("start", index))


def test_tune_never_waits_for_the_database(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune waits for its callbacks, and every trial's next report with them: a database
    that hangs (a lock held, a restart) holds the recorder's thread, never Tune's. The
    writes land in order once it answers; the run is opened with what the row says."""
    release, real = threading.Event(), crud.update_trial

    def hanging(session: Session, experiment_id: str, index: int, **fields: Any) -> bool:
        assert release.wait(timeout=20), "the test never released the database"
        return real(session, experiment_id, index, **fields)

    monkeypatch.setattr(crud, "update_trial", hanging)
    runs = PatientRuns()
    recorder = TrialRecorder(engine, EXPERIMENT, runs)  # type: ignore[arg-type]
    trial = tune_trial(tmp_path)
    started = time.monotonic()
    recorder.on_trial_start(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_result(0, [], trial, {NODE: "a", GPUS: ""})  # type: ignore[arg-type]
    for epoch in (1, 2):
        recorder.on_trial_result(0, [], trial, result(epoch, "none"))  # type: ignore[arg-type]
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5  # (each write would hang 20 s)
    assert row(engine).state == TrialState.PENDING  # nothing written yet
    assert runs.calls == [("start", 0), ("placement", 0, "a", ""), ("epoch", 0, 1), ("epoch", 0, 2)]
    release.set()
    settle(recorder)
    done = row(engine)
    assert (done.state, done.epoch, done.node) == (TrialState.SUCCEEDED, 2, "a")
    spec = RunSpec.model_validate_json(done.spec_json)
    assert runs.openings[0]() == Opening(done.label, spec, None, None)
    assert runs.calls[4:] == [("figure", 0, "learning_curves"), ("finish", 0, "succeeded")]


def test_closing_waits_a_bounded_time_for_a_database_that_stays_down(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The driver's end: writes queued behind an outage are tried until closing's time is up,
    then once more each, and the driver goes on."""
    attempts = fail_updates(monkeypatch, database_error(), times=10_000)
    recorder = TrialRecorder(engine, EXPERIMENT, None)
    recorder.final_pauses_s = (0.05,) * 10_000  # retried for minutes, were it not closed
    trial = tune_trial(tmp_path)
    recorder.on_trial_complete(0, [], trial)  # type: ignore[arg-type]
    recorder.on_trial_error(0, [], trial)  # type: ignore[arg-type]
    started = time.monotonic()
    assert recorder.close(timeout=0.5)  # (the waits end with the last pause)
    assert time.monotonic() - started < 5
    assert len(attempts) < 100 and caplog.text.count("the database is unreachable") == 2
