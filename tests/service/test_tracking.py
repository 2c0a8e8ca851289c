"""MLflow writes from the job driver: in order, retried through an outage, never blocking."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.tracking import MlflowClient
from sqlalchemy import exc

from dst.masks import load_masks, save_masks
from dst.spec import RunSpec
from service.local import LocalServices, free_port
from service.study import StudySpec, expand
from service.tracking import (
    PARENT_TAG,
    TAG_RESUMED,
    ChildRuns,
    MlflowTracker,
    Opening,
    Outbox,
    TrialRun,
    without_credentials,
)


def opened(
    label: str, spec: RunSpec, run_id: str | None, resumed: int | None
) -> Callable[[], Opening]:
    """What the recorder answers once it has read a trial's row."""
    return lambda: Opening(label, spec, run_id, resumed)


def test_writes_run_in_order_and_outages_are_retried() -> None:
    done: list[int] = []
    failures = {"left": 2}

    def flaky() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("MLflow is down")  # an OSError: an outage
        done.append(1)

    outbox = Outbox(retry_s=0.01)
    outbox.put("first", lambda: done.append(0))
    outbox.put("flaky", flaky)
    outbox.put("third", lambda: done.append(2))
    assert outbox.close(timeout=5)
    assert done == [0, 1, 2] and failures["left"] == 0


def test_a_bug_is_skipped_not_retried() -> None:
    done: list[str] = []
    outbox = Outbox(retry_s=0.01)
    outbox.put("buggy", lambda: done.append(str(1 / 0)))
    outbox.put("after", lambda: done.append("after"))
    assert outbox.close(timeout=5) and done == ["after"]


def test_putting_never_waits_and_closing_is_bounded() -> None:
    outbox = Outbox(retry_s=0.05)

    def down() -> None:
        raise OSError("unreachable")

    started = time.monotonic()
    for _ in range(100):
        outbox.put("down", down)
    assert time.monotonic() - started < 0.5
    assert not outbox.close(timeout=0.3)
    assert time.monotonic() - started < 3


def test_metrics_arrive_once_mlflow_is_back(tmp_path: Path) -> None:
    """The tracking server is down while a trial reports; everything lands once it is up."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with LocalServices() as services:
        services.start_mlflow(tmp_path / "first", port=port)  # for the parent run
        study = StudySpec.model_validate({"name": "s", "model": "small-mlp", "dataset": "digits"})
        _, parent = MlflowTracker(uri).create_parent("exp-1", study, expand(study))
    # MLflow is down now
    run_ids: dict[int, str] = {}
    runs = ChildRuns(uri, parent, "exp-1", run_ids.__setitem__, Outbox(retry_s=0.2))
    spec = RunSpec.model_validate({"model": "small-mlp", "dataset": "digits"})
    masks_file = tmp_path / "m.npz"
    save_masks({"fc1.weight": torch.eye(3, dtype=torch.bool)}, masks_file)
    started = time.monotonic()
    runs.start(0, opened("trial 0", spec, None, None))
    runs.start(0, opened("trial 0", spec, None, 1))  # retried before the first run's id was stored
    for epoch in (1, 2):
        runs.log_epoch(0, {"epoch": epoch, "test_acc": 0.25 * epoch})
    runs.log_masks(0, masks_file, "final")
    runs.finish(0, "succeeded")
    assert time.monotonic() - started < 1.0  # the recorder never waited
    masks_file.unlink()  # the checkpoint it came from is gone: a copy was taken
    with LocalServices() as services:
        closed: dict[str, bool] = {}
        waiter = threading.Thread(target=lambda: closed.update(ok=runs.close(timeout=180)))
        waiter.start()
        time.sleep(1.0)
        services.start_mlflow(tmp_path / "first", port=port)  # back, same store
        waiter.join(200)
        assert closed == {"ok": True}
        client = MlflowClient(uri)
        run = client.get_run(run_ids[0])
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_RESUMED] == "1"  # the retry continued the same run
        children = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
        assert [c.info.run_id for c in children] == [run_ids[0]]
        history = client.get_metric_history(run_ids[0], "test_acc")
        assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
        final = load_masks(client.download_artifacts(run_ids[0], "masks/final.npz"))
        assert torch.equal(final["fc1.weight"], torch.eye(3, dtype=torch.bool))


# MLflow's own SQL store, used in process here, still asks SQLAlchemy for a deprecated loader
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_a_parent_run_left_half_made_is_completed_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow fails after the parent run was created: the launch's retry finds that run and
    gives it its params, study and trial list, instead of leaving them out."""
    monkeypatch.chdir(tmp_path)  # the store's artifacts go under the working directory
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = StudySpec.model_validate(
        {"name": "s", "model": "small-mlp", "dataset": "digits", "grid": {"seed": [0, 1]}}
    )
    real, failures = tracker.client.log_dict, [ConnectionError("MLflow went away")]

    def flaky(run_id: str, data: Any, path: str) -> None:
        if failures:
            raise failures.pop()
        real(run_id, data, path)

    monkeypatch.setattr(tracker.client, "log_dict", flaky)
    with pytest.raises(ConnectionError):
        tracker.create_parent("exp-1", study, expand(study))
    experiment, parent = tracker.create_parent("exp-1", study, expand(study))
    assert tracker.create_parent("exp-1", study, expand(study)) == (experiment, parent)
    runs = tracker.client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [parent]  # one parent run, made once
    assert runs[0].data.params["model"] == "small-mlp"
    files = {a.path for a in tracker.client.list_artifacts(parent)}
    assert files == {"study.json", "trials.json"}


def test_links_point_at_the_ui_address_users_open() -> None:
    inside = MlflowTracker("http://mlflow:5000")  # the address the cluster's services use
    public = MlflowTracker("http://mlflow:5000", ui_url="https://mlflow.lab.example/")
    assert inside.links("7", "r1")["parent_run_url"] == "http://mlflow:5000/#/experiments/7/runs/r1"
    links = public.links("7", "r1")
    assert links["experiment_url"] == "https://mlflow.lab.example/#/experiments/7/runs"
    assert links["parent_run_url"] == "https://mlflow.lab.example/#/experiments/7/runs/r1"
    assert links["tracking_uri"] == "http://mlflow:5000"


def test_links_never_show_credentials_in_the_tracking_uri() -> None:
    tracker = MlflowTracker("https://ml-user:s3cret@mlflow.lab.example:8443/base")
    links = tracker.links("7", "r1")
    assert links["tracking_uri"] == "https://mlflow.lab.example:8443/base"
    assert links["parent_run_url"] == "https://mlflow.lab.example:8443/base/#/experiments/7/runs/r1"
    assert without_credentials("http://mlflow:5000") == "http://mlflow:5000"
    assert without_credentials("databricks") == "databricks"
    assert without_credentials("http://u:p@[::1]:5000/x") == "http://[::1]:5000/x"


def test_epochs_queued_behind_other_writes_go_out_in_one_request_in_order() -> None:
    class Run:
        def log_epochs(self, epochs: list[dict[str, float]]) -> None:
            calls.append(("epochs", [int(e["epoch"]) for e in epochs]))

        def finish(self, status: str) -> None:
            calls.append(("finish", status))

    calls: list[tuple[str, object]] = []
    runs = ChildRuns("http://127.0.0.1:9", "parent", "exp-1", lambda i, r: None, Outbox(0.01))
    runs._runs[0] = Run()  # type: ignore[assignment]
    gate = threading.Event()
    runs.outbox.put("a slow write", lambda: gate.wait(10) and None)
    for epoch in (1, 2, 3):  # the outbox is behind: they wait together
        runs.log_epoch(0, {"epoch": epoch, "test_acc": 0.1 * epoch})
    gate.set()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    runs.log_epoch(0, {"epoch": 4, "test_acc": 0.4})  # after that send: a request of its own
    runs.finish(0, "succeeded")
    assert runs.close(timeout=10)
    assert calls == [("epochs", [1, 2, 3]), ("epochs", [4]), ("finish", "succeeded")]


class FlakyMlflow:
    """An in-memory MLflow client whose writes named in ``failing`` each fail once, as a
    server outage would (an OSError), after which they succeed."""

    def __init__(self, *failing: str) -> None:
        self.failing = set(failing)
        self.created: list[str] = []
        self.params: dict[str, dict[str, str]] = {}
        self.files: dict[str, set[str]] = {}
        self.status: dict[str, str] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.steps: dict[str, list[int]] = {}  # by run: the epochs of its metrics, as sent

    def _maybe_fail(self, call: str) -> None:
        if call in self.failing:
            self.failing.discard(call)
            raise ConnectionError(f"MLflow went away during {call}")

    def get_run(self, run_id: str) -> Any:
        return type("Run", (), {"info": type("Info", (), {"experiment_id": "7"})})()

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
        run_id = f"run{len(self.created)}"
        self.created.append(run_id)
        self.status[run_id], self.tags[run_id] = "RUNNING", dict(tags)
        return type("Run", (), {"info": type("Info", (), {"run_id": run_id})})()

    def log_batch(self, run_id: str, params: Any = (), metrics: Any = ()) -> None:
        self._maybe_fail("log_batch")
        self.params.setdefault(run_id, {}).update({p.key: p.value for p in params})
        self.steps.setdefault(run_id, []).extend(sorted({m.step for m in metrics}))

    def log_dict(self, run_id: str, data: Any, path: str) -> None:
        self._maybe_fail("log_dict")
        self.files.setdefault(run_id, set()).add(path)

    def update_run(self, run_id: str, status: str) -> None:
        self.status[run_id] = status

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._maybe_fail("set_tag")
        self.tags[run_id][key] = value

    def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
        self._maybe_fail("log_artifact")
        assert Path(path).exists()
        self.files.setdefault(run_id, set()).add(f"{artifact_path}/{Path(path).name}")

    def set_terminated(self, run_id: str, status: str) -> None:
        self.status[run_id] = status


@pytest.mark.parametrize(
    "failing", ["log_batch", "log_dict", "on_run", "on_run_database", "set_tag"]
)
def test_a_trial_run_half_made_is_completed_by_the_retry_not_made_twice(failing: str) -> None:
    """MLflow (or the database) fails after the trial's child run was created: the retry
    goes on with that run, gives it its params and spec, and stores its id once."""
    fake = FlakyMlflow(failing)
    stored: list[tuple[int, str]] = []

    def on_run(index: int, run_id: str) -> None:
        if failing.startswith("on_run") and not stored:
            stored.append((-1, ""))  # the first try fails after being called
            if failing == "on_run_database":  # SQLAlchemy's errors are no OSErrors
                raise exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))
            raise ConnectionError("the database went away")
        stored.append((index, run_id))

    runs = ChildRuns("http://127.0.0.1:9", "parent", "exp-1", on_run, Outbox(retry_s=0.01))
    runs._client = fake  # type: ignore[assignment]
    spec = RunSpec.model_validate({"model": "small-mlp", "dataset": "digits"})
    runs.start(3, opened("trial 3", spec, None, 2))
    assert runs.close(timeout=10)
    assert fake.created == ["run0"]  # one child run, whatever failed
    assert fake.params["run0"]["model"] == "small-mlp"
    assert fake.files["run0"] == {"spec.json"}
    assert stored[-1] == (3, "run0")
    assert fake.tags["run0"][TAG_RESUMED] == "2"


# MLflow's own SQL store, used in process here, still asks SQLAlchemy for a deprecated loader
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_child_runs_a_killed_driver_left_running_end_with_their_trials_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = StudySpec.model_validate({"name": "s", "model": "small-mlp", "dataset": "digits"})
    _, parent = tracker.create_parent("exp-1", study, expand(study))
    done, failed, unknown = (
        TrialRun.create(tracker.client, parent, "exp-1", i, f"trial {i}").run_id for i in range(3)
    )
    tracker.client.set_terminated(done, "FINISHED")  # its driver ended it
    _, elsewhere = tracker.create_parent("exp-2", study, expand(study))
    other = TrialRun.create(tracker.client, elsewhere, "exp-2", 0, "trial 0").run_id
    more = [TrialRun.create(tracker.client, parent, "exp-1", i, "t").run_id for i in (3, 4)]
    mapping = {done: "succeeded", failed: "failed"}
    tracker.end_running_children(parent, "cancelled", mapping, page=1)  # a page per run
    assert {tracker.client.get_run(r).info.status for r in more} == {"KILLED"}
    statuses = {r: tracker.client.get_run(r).info.status for r in (done, failed, unknown, other)}
    assert statuses == {done: "FINISHED", failed: "FAILED", unknown: "KILLED", other: "RUNNING"}


def mlflow_error(code: str) -> MlflowException:
    """What the MLflow client raises when the server answers with error ``code``."""
    return MlflowException(f"answered {code}", getattr(databricks_pb2, code))


@pytest.mark.parametrize(
    "code",
    [
        "INVALID_PARAMETER_VALUE",  # 400: e.g. the run was deleted (it "must be 'active'")
        "RESOURCE_DOES_NOT_EXIST",  # 404: the run or experiment is gone
    ],
)
def test_a_refused_write_is_skipped_and_later_writes_go_on(
    code: str, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[str] = []

    def refused() -> None:
        attempts.append(code)
        raise mlflow_error(code)

    done: list[str] = []
    outbox = Outbox(retry_s=0.01)
    outbox.put("epoch 3 of trial 0", refused)
    outbox.put("epoch 1 of trial 1", lambda: done.append("after"))
    assert outbox.close(timeout=5)
    assert attempts == [code] and done == ["after"]
    assert "MLflow refused epoch 3 of trial 0" in caplog.text


@pytest.mark.parametrize(
    "code", ["TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"]
)
def test_a_server_error_or_a_rate_limit_is_retried(code: str) -> None:
    attempts: list[str] = []

    def flaky() -> None:
        attempts.append(code)
        if len(attempts) < 3:
            raise mlflow_error(code)

    outbox = Outbox(retry_s=0.01)
    outbox.put("flaky", flaky)
    assert outbox.close(timeout=5) and len(attempts) == 3


def test_epochs_go_on_after_a_write_of_their_trial_was_skipped() -> None:
    """The trial's run could not be made at first (an answer the client did not expect): its
    epoch is skipped, and once Tune's retry of the trial makes the run, every later epoch is
    logged."""

    class Unexpected(FlakyMlflow):
        def create_run(self, *args: Any, **kwargs: Any) -> Any:
            if not hasattr(self, "answered"):
                self.answered = True
                raise TypeError("an unexpected answer")
            return super().create_run(*args, **kwargs)

    fake = Unexpected()
    runs = ChildRuns("http://127.0.0.1:9", "parent", "exp-1", lambda i, r: None, Outbox(0.01))
    runs._client = fake  # type: ignore[assignment]
    spec = RunSpec.model_validate({"model": "small-mlp", "dataset": "digits"})
    runs.start(0, opened("trial 0", spec, None, None))  # skipped
    runs.log_epoch(0, {"epoch": 1, "test_acc": 0.1})  # skipped: the trial has no run
    runs.start(0, opened("trial 0", spec, None, 1))  # the trial's retry
    for epoch in (2, 3, 4):
        runs.log_epoch(0, {"epoch": epoch, "test_acc": 0.1 * epoch})
    runs.finish(0, "succeeded")
    assert runs.close(timeout=10)
    assert fake.created == ["run0"] and fake.status["run0"] == "FINISHED"
    assert [s for s in fake.steps["run0"] if s] == [2, 3, 4]  # (step 0: the params' batch)


def copies(folder: Path) -> list[Path]:
    return sorted(folder.glob("dst-masks-*"))


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own temporary folder (where mask copies wait for MLflow)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def with_run(fake: FlakyMlflow) -> ChildRuns:
    runs = ChildRuns("http://127.0.0.1:9", "parent", "exp-1", lambda i, r: None, Outbox(0.01))
    runs._client = fake  # type: ignore[assignment]
    runs._runs[0] = TrialRun(fake, "run0")  # type: ignore[arg-type]
    return runs


def test_mask_copies_are_removed_once_sent_or_skipped(tmp_path: Path, temp_dir: Path) -> None:
    class Refusing(FlakyMlflow):
        def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
            if Path(path).name == "refused.npz":
                raise mlflow_error("INVALID_PARAMETER_VALUE")
            super().log_artifact(run_id, path, artifact_path)

    fake = Refusing("log_artifact")  # the first upload meets an outage and is retried
    runs = with_run(fake)
    source = tmp_path / "masks.npz"
    source.write_bytes(b"packed bits")
    gate = threading.Event()
    runs.outbox.put("a slow write", lambda: gate.wait(10) and None)
    runs.log_masks(0, source, "final")
    runs.log_masks(0, source, "refused")
    assert len(copies(temp_dir)) == 2  # copied at once: the checkpoint may be rotated
    gate.set()
    assert runs.close(timeout=10)
    assert fake.files["run0"] == {"masks/final.npz"}
    assert copies(temp_dir) == []


def test_mask_copies_are_removed_when_closing_gives_up(tmp_path: Path, temp_dir: Path) -> None:
    class Down(FlakyMlflow):
        def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
            raise ConnectionError("MLflow is down")

    runs = with_run(Down())
    source = tmp_path / "masks.npz"
    source.write_bytes(b"packed bits")
    for name in ("initial", "final", "other"):
        runs.log_masks(0, source, name)
    assert not runs.close(timeout=0.2)
    assert copies(temp_dir) == []


def test_a_mask_copy_that_fails_is_a_warning(
    tmp_path: Path, temp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FlakyMlflow()
    runs = with_run(fake)
    with caplog.at_level(logging.WARNING):
        runs.log_masks(0, tmp_path / "rotated-away.npz", "final")  # the checkpoint is gone
    assert runs.close(timeout=5)
    assert "run0" not in fake.files and copies(temp_dir) == []
    assert "could not copy the final masks of trial 0" in caplog.text


def test_a_trial_whose_row_could_not_be_read_gets_no_run(caplog: pytest.LogCaptureFixture) -> None:
    """Without its stored row (the database stayed down) a trial's run is not made: its
    label, spec and earlier run are unknown. Its later writes are skipped."""
    fake = FlakyMlflow()
    runs = ChildRuns("http://127.0.0.1:9", "parent", "exp-1", lambda i, r: None, Outbox(0.01))
    runs._client = fake  # type: ignore[assignment]
    runs.start(0, lambda: None)
    runs.log_epoch(0, {"epoch": 1, "test_acc": 0.1})
    assert runs.close(timeout=10)
    assert fake.created == [] and "trial 0 gets no MLflow run" in caplog.text


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_a_diverged_seed_leaves_the_parent_runs_results_strict_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed whose loss is NaN or infinite: results.json stays strict JSON (null, as the
    REST API answers) and results.txt shows "-", as the CLI's table does."""
    import json
    import math

    from service.analysis import FinishedTrial, analyze

    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = StudySpec.model_validate(
        {"name": "s", "model": "small-mlp", "dataset": "digits", "grid": {"seed": [0, 1]}}
    )
    plans = expand(study)
    _, parent = tracker.create_parent("exp-1", study, plans)
    losses = (math.nan, math.inf)
    finished = [
        FinishedTrial(p.spec, {"test_acc": 0.9, "test_loss": loss})
        for p, loss in zip(plans, losses, strict=True)
    ]
    analysis = analyze([p.spec for p in plans], finished, partial=False)
    tracker.finish_parent(parent, "succeeded", analysis)
    results = Path(tracker.client.download_artifacts(parent, "results.json", str(tmp_path)))
    [row] = json.loads(results.read_text(), parse_constant=lambda c: pytest.fail(c))["rows"]
    assert (row["test_loss_mean"], row["test_loss_std"]) == (None, None)
    assert row["test_acc_mean"] == 0.9
    table = Path(tracker.client.download_artifacts(parent, "results.txt", str(tmp_path)))
    assert "nan" not in table.read_text() and "inf" not in table.read_text()
