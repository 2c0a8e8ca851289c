"""Every branch of launch, cancel, reconcile and finalize, over a real SQLite database with
in-memory fakes of Ray (the executor) and MLflow (the tracker)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from service import crud, lifecycle
from service.analysis import StudyAnalysis
from service.db import make_engine, upgrade_database
from service.lifecycle import Services
from service.states import ExperimentStatus, JobStatus, TrialState
from service.study import StudySpec, expand

STUDY = StudySpec.model_validate(
    {"name": "s", "model": "small-mlp", "dataset": "digits", "grid": {"seed": [0, 1]}}
)


@dataclass
class FakeRay:
    jobs: dict[str, JobStatus] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    on_submit: Any = None

    def submit(self, experiment_id: str) -> None:
        if self.on_submit is not None:
            self.on_submit(experiment_id)
        self.jobs.setdefault(experiment_id, JobStatus.PENDING)

    def status(self, experiment_id: str) -> JobStatus | None:
        return self.jobs.get(experiment_id)

    def stop(self, experiment_id: str) -> None:
        self.stopped.append(experiment_id)

    def logs(self, experiment_id: str) -> str:
        return "...\nRuntimeError: the driver crashed"

    def ping(self) -> bool:
        return True

    def release(self, experiment_id: str) -> None:
        self.released.append(experiment_id)


@dataclass
class FakeMlflow:
    tracking_uri: str = "http://mlflow"
    down: bool = False
    finished: list[tuple[str, str, int]] = field(default_factory=list)
    trial_runs: dict[str, str] = field(default_factory=dict)  # as the last close was given

    def create_parent(self, experiment_id: str, study: Any, plans: Any) -> tuple[str, str]:
        if self.down:
            raise ConnectionError("MLflow is down")
        return "1", f"parent-{experiment_id}"

    def finish_parent(
        self,
        parent: str,
        status: ExperimentStatus,
        analysis: StudyAnalysis,
        trial_runs: Mapping[str, str] | None = None,
    ) -> None:
        if self.down:
            raise ConnectionError("MLflow is down")
        assert analysis.results is not None
        self.finished.append((parent, str(status), len(analysis.results.rows)))
        self.trial_runs = dict(trial_runs or {})

    def links(self, *ids: Any) -> dict[str, str | None]:
        return {}

    def ping(self) -> bool:
        return not self.down


@pytest.fixture
def services(tmp_path: Path) -> Services:
    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    return Services(engine=engine, executor=FakeRay(), tracker=FakeMlflow())  # type: ignore[arg-type]


def add(services: Services, experiment_id: str = "e1") -> str:
    with Session(services.engine) as session:
        crud.create_experiment(
            session,
            experiment_id=experiment_id,
            name="s",
            spec_json=STUDY.model_dump_json(),
            plans=expand(STUDY),
        )
        session.commit()
    return experiment_id


def status(services: Services, experiment_id: str = "e1") -> tuple[str, str | None]:
    with Session(services.engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        assert experiment is not None
        return experiment.status, experiment.error


def trial_states(services: Services, experiment_id: str = "e1") -> list[str]:
    with Session(services.engine) as session:
        return [t.state for t in crud.list_trials(session, experiment_id)]


def set_trials(services: Services, *states: TrialState) -> None:
    with Session(services.engine) as session:
        for index, state in enumerate(states):
            metrics = {"test_acc": 0.5, "test_loss": 1.0} if state == TrialState.SUCCEEDED else None
            crud.update_trial(session, "e1", index, state=state, metrics=metrics)
        session.commit()


def test_a_queued_experiment_is_launched(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    assert status(services) == (ExperimentStatus.SUBMITTED, None)
    assert services.executor.status("e1") == JobStatus.PENDING


def test_a_failed_launch_stays_queued_with_the_reason(services: Services) -> None:
    services.tracker.down = True  # type: ignore[attr-defined]
    add(services)
    lifecycle.reconcile(services)
    state, error = status(services)
    assert state == ExperimentStatus.QUEUED and "MLflow is down" in (error or "")
    services.tracker.down = False  # type: ignore[attr-defined]
    lifecycle.reconcile(services)  # the next pass retries
    assert status(services) == (ExperimentStatus.SUBMITTED, None)


def test_a_launch_mlflow_or_ray_refuses_fails_the_experiment_with_their_answer(
    services: Services,
) -> None:
    """Sending a request they refused again cannot help: the experiment fails at once,
    every trial with it, instead of staying queued forever; an outage is retried."""
    from mlflow.exceptions import RestException  # what the client raises on an error answer

    refusal = RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "tag 'x'"})

    def refuse(*args: Any) -> tuple[str, str]:
        raise refusal

    services.tracker.create_parent = refuse  # type: ignore[method-assign]
    add(services)
    lifecycle.reconcile(services)
    state, error = status(services)
    assert state == ExperimentStatus.FAILED and "launch refused:" in (error or "")
    assert "tag 'x'" in (error or "")
    assert set(trial_states(services)) == {TrialState.FAILED}
    assert services.executor.released == ["e1"]  # type: ignore[attr-defined]


def test_a_cancel_during_submit_stops_the_job(services: Services) -> None:
    add(services)

    def cancel_meanwhile(experiment_id: str) -> None:
        lifecycle.cancel(services, experiment_id)  # queued -> cancelled at once

    services.executor.on_submit = cancel_meanwhile  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert services.executor.stopped == ["e1"]  # type: ignore[attr-defined]
    assert set(trial_states(services)) == {TrialState.CANCELLED}
    lifecycle.advance(services, "e1")  # what the cancel asks the dispatcher for
    assert services.tracker.finished == [("parent-e1", "cancelled", 0)]  # type: ignore[attr-defined]


def test_a_driver_that_starts_before_the_launch_records_it_is_left_running(
    services: Services,
) -> None:
    """The job's driver may mark the experiment running before the launch marks it
    submitted: that is no cancel, and the job goes on."""
    add(services)

    def driver_starts_first(experiment_id: str) -> None:
        with Session(services.engine) as session:
            crud.set_experiment_status(session, experiment_id, ExperimentStatus.RUNNING)
            session.commit()

    services.executor.on_submit = driver_starts_first  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services) == (ExperimentStatus.RUNNING, None)
    assert services.executor.stopped == []  # type: ignore[attr-defined]


def test_cancel_of_a_live_experiment_asks_ray_to_stop(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    lifecycle.cancel(services, "e1")
    assert status(services)[0] == ExperimentStatus.CANCELLING
    assert services.executor.stopped == []  # type: ignore[attr-defined]  # a request never waits on Ray
    lifecycle.advance(services, "e1")
    assert services.executor.stopped == ["e1"]  # type: ignore[attr-defined]
    assert set(trial_states(services)) == {TrialState.PENDING}  # not before they stopped
    services.executor.jobs["e1"] = JobStatus.STOPPED  # type: ignore[attr-defined]
    lifecycle.advance(services, "e1")
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert set(trial_states(services)) == {TrialState.CANCELLED}
    assert services.tracker.finished == [("parent-e1", "cancelled", 0)]  # type: ignore[attr-defined]


def test_cancelling_an_experiment_ray_never_got_cancels_it(services: Services) -> None:
    add(services)
    services.tracker.down = True  # type: ignore[attr-defined]  # the launch keeps failing
    lifecycle.reconcile(services)
    with Session(services.engine) as session:  # as if a launch had got as far as running
        crud.set_experiment_status(session, "e1", ExperimentStatus.SUBMITTED)
        session.commit()
    lifecycle.cancel(services, "e1")
    lifecycle.advance(services, "e1")  # Ray has no job
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert set(trial_states(services)) == {TrialState.CANCELLED}


def test_a_running_job_is_left_alone(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    services.executor.jobs["e1"] = JobStatus.RUNNING  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services)[0] == ExperimentStatus.SUBMITTED


def test_a_succeeded_job_with_every_trial_done_succeeds(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services) == (ExperimentStatus.SUCCEEDED, None)
    # the seeds of the one configuration average into one results row
    assert services.tracker.finished == [("parent-e1", "succeeded", 1)]  # type: ignore[attr-defined]


def test_a_cancel_just_before_the_end_is_recorded_wins_and_the_parent_waits(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job succeeded, but a cancel lands between reading the experiment and recording
    its end: the end is not recorded over it, the parent run is not closed as succeeded;
    the next pass records the cancel and closes the run so."""
    add(services)
    lifecycle.reconcile(services)
    with Session(services.engine) as session:
        crud.set_experiment_status(session, "e1", ExperimentStatus.RUNNING)
        session.commit()
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    real = crud.set_experiment_status

    def cancelled_first(session: Session, experiment_id: str, status: Any, **kw: Any) -> bool:
        if status == ExperimentStatus.SUCCEEDED:  # the user's cancel, a moment earlier
            real(session, experiment_id, ExperimentStatus.CANCELLING)
        return real(session, experiment_id, status, **kw)

    monkeypatch.setattr(crud, "set_experiment_status", cancelled_first)
    lifecycle.reconcile(services)
    assert status(services)[0] == ExperimentStatus.CANCELLING
    assert services.tracker.finished == []  # type: ignore[attr-defined]
    monkeypatch.setattr(crud, "set_experiment_status", real)
    lifecycle.reconcile(services)
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert services.tracker.finished == [("parent-e1", "cancelled", 1)]  # type: ignore[attr-defined]


def test_the_end_is_recorded_before_the_parent_run_is_closed(services: Services) -> None:
    """Closing the parent run computes and uploads the study's analysis (seconds): whoever
    waits on the experiment sees its end first."""
    seen: list[ExperimentStatus] = []
    close = services.tracker.finish_parent

    def finish_parent(
        parent: str, outcome: ExperimentStatus, analysis: StudyAnalysis, **more: Any
    ) -> None:
        seen.append(ExperimentStatus(status(services)[0]))  # the stored status at this moment
        close(parent, outcome, analysis, **more)

    services.tracker.finish_parent = finish_parent  # type: ignore[method-assign]
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert seen == [ExperimentStatus.SUCCEEDED]
    with Session(services.engine) as session:
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None and experiment.mlflow_closed_at is not None


def test_the_parent_run_and_the_api_share_one_analysis(services: Services) -> None:
    """The analysis computed to close the parent run is the one the API's routes then serve
    (a report asked for while the parent run closes waits for it instead of computing it
    again)."""
    from dataclasses import replace

    from service.analysis import AnalysisCache

    shared = replace(services, analyses=AnalysisCache())
    add(shared)
    lifecycle.reconcile(shared)
    set_trials(shared, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    shared.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    lifecycle.reconcile(shared)
    assert shared.tracker.finished == [("parent-e1", "succeeded", 1)]  # type: ignore[attr-defined]
    assert shared.analyses is not None
    with Session(shared.engine) as session:
        version = crud.trials_version(session, "e1")

    def again() -> StudyAnalysis:
        raise AssertionError("computed a second time")

    assert shared.analyses.get("e1", version, again).results is not None


def test_a_parent_run_mlflow_could_not_close_is_closed_once_mlflow_is_back(
    services: Services,
) -> None:
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    services.tracker.down = True  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services) == (ExperimentStatus.SUCCEEDED, None)  # ends all the same
    with Session(services.engine) as session:
        assert crud.unclosed_parents(session) == ["e1"]
        assert lifecycle.to_advance(session) == ["e1"]  # the passes keep looking after it
    lifecycle.reconcile(services)  # still down: nothing is tried
    assert services.tracker.finished == []  # type: ignore[attr-defined]
    services.tracker.down = False  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    lifecycle.reconcile(services)
    assert services.tracker.finished == [("parent-e1", "succeeded", 1)]  # type: ignore[attr-defined]
    with Session(services.engine) as session:
        assert crud.unclosed_parents(session) == [] and lifecycle.to_advance(session) == []
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None and experiment.mlflow_closed_at is not None


def test_a_succeeded_job_with_unfinished_trials_fails(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    state, error = status(services)
    assert state == ExperimentStatus.FAILED and "1 never finished" in (error or "")
    assert trial_states(services) == [TrialState.SUCCEEDED, TrialState.FAILED]


def test_a_failed_job_fails_with_the_end_of_its_log(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    services.executor.jobs["e1"] = JobStatus.FAILED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    state, error = status(services)
    assert state == ExperimentStatus.FAILED and "the driver crashed" in (error or "")


def test_a_stopped_job_is_cancelled(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.STOPPED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert trial_states(services) == [TrialState.SUCCEEDED, TrialState.CANCELLED]
    assert services.tracker.finished == [("parent-e1", "cancelled", 1)]  # type: ignore[attr-defined]


def test_closing_the_parent_hands_on_each_child_runs_final_trial_state(
    services: Services,
) -> None:
    """A driver killed mid-trial leaves child runs running: the parent's close gets each
    run's trial state, final by then, to end them with."""
    add(services)
    lifecycle.reconcile(services)
    with Session(services.engine) as session:
        crud.update_trial(session, "e1", 0, state=TrialState.SUCCEEDED, mlflow_run_id="run-0")
        crud.update_trial(session, "e1", 1, state=TrialState.RUNNING, mlflow_run_id="run-1")
        session.commit()
    services.executor.jobs["e1"] = JobStatus.STOPPED  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert services.tracker.trial_runs == {"run-0": "succeeded", "run-1": "cancelled"}  # type: ignore[attr-defined]


def test_a_job_ray_does_not_know_fails_the_experiment(services: Services) -> None:
    add(services)
    lifecycle.reconcile(services)
    services.executor.jobs.clear()  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    state, error = status(services)
    assert state == ExperimentStatus.FAILED and "Ray has no job" in (error or "")
    assert set(trial_states(services)) == {TrialState.FAILED}


class UnsureJobs:
    """Ray's Jobs client when a submission's answer is lost and the check right after it
    times out too: whether Ray took the job (``takes``) nobody can tell at the launch."""

    def __init__(self, takes: bool) -> None:
        self.takes = takes
        self.jobs: set[str] = set()
        self.submitted = False

    def get_job_status(self, job_id: str) -> Any:
        if self.submitted:  # the head stopped answering with the submission
            raise ConnectionError("the head does not answer")
        raise RuntimeError(f"Request failed with status code 404: Job {job_id} not found.")

    def submit_job(self, **job: Any) -> str:
        self.submitted = True
        if self.takes:
            self.jobs.add(job["submission_id"])
        raise TimeoutError("no answer within 10 s")


@pytest.mark.parametrize("ray_took_it", [False, True])
def test_a_queued_experiment_cancelled_after_an_unsure_launch_leaves_no_secrets_file(
    tmp_path: Path, ray_took_it: bool
) -> None:
    """The launch keeps the driver's secrets file when Ray could not say whether it took the
    job; a cancel while queued ends the experiment at once, and no driver (if there is a
    job, it never started) takes the file: the end removes it."""
    from service.core.config import Settings
    from service.execution import RayExecutor, driver_env

    settings = Settings(
        database_url="postgresql+psycopg://dst:s3cret@db/dst",
        mlflow_tracking_uri="http://ml",
        storage_path=tmp_path,
    )
    executor = RayExecutor("http://ray:8265", env=driver_env(settings))
    executor._client = UnsureJobs(takes=ray_took_it)  # type: ignore[assignment]
    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    services = Services(engine=engine, executor=executor, tracker=FakeMlflow())
    add(services)
    secrets = tmp_path / "secrets" / "e1.json"
    lifecycle.advance(services, "e1")
    assert status(services)[0] == ExperimentStatus.QUEUED and secrets.exists()
    assert lifecycle.cancel(services, "e1")
    lifecycle.advance(services, "e1")  # what the cancel asks the dispatcher for
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert not secrets.exists()


def test_an_experiment_cancelled_while_queued_releases_its_driver_secrets(
    services: Services,
) -> None:
    add(services)
    lifecycle.cancel(services, "e1")
    lifecycle.advance(services, "e1")
    assert status(services)[0] == ExperimentStatus.CANCELLED
    assert services.executor.released == ["e1"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("job_end", [JobStatus.FAILED, JobStatus.STOPPED])
def test_a_job_whose_driver_never_started_releases_its_secrets_at_the_end(
    services: Services, job_end: JobStatus
) -> None:
    add(services)
    lifecycle.reconcile(services)  # submitted; the driver never marks it running
    services.executor.jobs["e1"] = job_end  # type: ignore[attr-defined]
    lifecycle.reconcile(services)
    assert ExperimentStatus(status(services)[0]).terminal
    assert services.executor.released == ["e1"]  # type: ignore[attr-defined]


def test_a_launch_error_does_not_outlive_the_drivers_start(services: Services) -> None:
    """Ray took the job but its answer was lost: the launch says it retries; then the job's
    driver starts and the study succeeds, with no error left from the launch."""

    def took_it_but_no_answer(experiment_id: str) -> None:
        services.executor.jobs[experiment_id] = JobStatus.RUNNING  # type: ignore[attr-defined]
        raise TimeoutError("no answer within 10 s")

    services.executor.on_submit = took_it_but_no_answer  # type: ignore[attr-defined]
    add(services)
    lifecycle.advance(services, "e1")
    assert status(services) == (
        ExperimentStatus.QUEUED,
        "launch failed, retrying: no answer within 10 s",
    )
    with Session(services.engine) as session:  # the driver starts (service.driver.start)
        crud.set_experiment_status(session, "e1", ExperimentStatus.RUNNING)
        session.commit()
    assert status(services) == (ExperimentStatus.RUNNING, None)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    lifecycle.advance(services, "e1")
    assert status(services) == (ExperimentStatus.SUCCEEDED, None)


def test_a_launch_error_is_not_written_over_a_driver_that_started_meanwhile(
    services: Services,
) -> None:
    """The driver marks the experiment running while the submission's answer is lost: the
    launch's "retrying" does not stick to a running experiment."""

    def driver_starts_then_no_answer(experiment_id: str) -> None:
        services.executor.jobs[experiment_id] = JobStatus.RUNNING  # type: ignore[attr-defined]
        with Session(services.engine) as session:
            crud.set_experiment_status(session, experiment_id, ExperimentStatus.RUNNING)
            session.commit()
        raise TimeoutError("no answer within 10 s")

    services.executor.on_submit = driver_starts_then_no_answer  # type: ignore[attr-defined]
    add(services)
    lifecycle.advance(services, "e1")
    assert status(services) == (ExperimentStatus.RUNNING, None)


def rest_error(code: str) -> Exception:
    from mlflow.exceptions import RestException

    return RestException({"error_code": code, "message": f"{code} (as MLflow answers)"})


@pytest.mark.parametrize("code", ["RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"])
def test_a_parent_run_mlflow_refuses_to_close_is_not_tried_again(
    services: Services, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The user deleted the parent run: MLflow answers 404 (or 400 for a run in the trash)
    every time; the service says so once and stops trying."""
    tries: list[str] = []

    def refuse(parent: str, *args: Any, **kwargs: Any) -> None:
        tries.append(parent)
        raise rest_error(code)

    services.tracker.finish_parent = refuse  # type: ignore[method-assign]
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="service.lifecycle"):
        for _ in range(3):
            lifecycle.reconcile(services)
    assert status(services) == (ExperimentStatus.SUCCEEDED, None)
    assert tries == ["parent-e1"]
    with Session(services.engine) as session:
        assert crud.unclosed_parents(session) == [] and lifecycle.to_advance(session) == []
    said = [r for r in caplog.records if "parent run" in r.getMessage()]
    assert [r.levelname for r in said] == ["ERROR"] and code in said[0].getMessage()


def test_a_parent_run_mlflow_cannot_close_for_now_is_tried_again(services: Services) -> None:
    """MLflow answers but is unavailable for the moment (503): the next passes retry."""
    tries: list[str] = []

    def unavailable(parent: str, *args: Any, **kwargs: Any) -> None:
        tries.append(parent)
        raise rest_error("TEMPORARILY_UNAVAILABLE")

    services.tracker.finish_parent = unavailable  # type: ignore[method-assign]
    add(services)
    lifecycle.reconcile(services)
    set_trials(services, TrialState.SUCCEEDED, TrialState.SUCCEEDED)
    services.executor.jobs["e1"] = JobStatus.SUCCEEDED  # type: ignore[attr-defined]
    for _ in range(3):
        lifecycle.reconcile(services)
    assert tries == ["parent-e1"] * 3
    with Session(services.engine) as session:
        assert crud.unclosed_parents(session) == ["e1"]
