"""The job driver's pure parts: trial configs from stored trials, the scrubbed environment."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from service import crud
from service.core.config import Settings
from service.db import make_engine, upgrade_database
from service.driver import (
    preflight,
    scrub_worker_environment,
    secrets_exposed,
    start,
    trial_config,
    version_mismatches,
)
from service.execution import (
    DRIVER_ONLY_ENV,
    HEAD_SECRETS_ENV,
    SECRETS_FILE_ENV,
    RayExecutor,
    driver_env,
    take_secrets,
    write_secrets,
)
from service.states import TERMINAL_EXPERIMENT, ExperimentStatus, JobStatus
from service.study import Resources, StudySpec, expand


def test_trial_configs_are_the_stored_trials_and_carry_no_secret(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    study = StudySpec.model_validate(
        {
            "name": "s",
            "model": "small-mlp",
            "dataset": "digits",
            "grid": {"seed": [0, 1]},
            "resources": {"cpus_per_trial": 0.5, "workers_per_trial": 2},
        }
    )
    with Session(engine) as session:
        crud.create_experiment(
            session, experiment_id="e1", name="s", spec_json="{}", plans=expand(study)
        )
        # the stored spec is the truth, even where re-expanding the study would differ
        crud.list_trials(session, "e1")[1].spec_json = json.dumps(
            expand(study)[1].spec.model_dump(mode="json") | {"seed": 7}
        )
        session.commit()
        configs = [
            trial_config(t, study.resources, "/shared/ray_results")
            for t in crud.list_trials(session, "e1")
        ]
    assert [c["index"] for c in configs] == [0, 1]
    assert [c["spec"]["seed"] for c in configs] == [0, 7]
    assert configs[0]["workers"] == 2 and configs[0]["cpus"] == 0.5
    assert "sqlite" not in json.dumps(configs)


def stored_experiment(tmp_path: Path) -> Engine:
    """A database holding one queued experiment, ``e1``, of one trial."""
    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    study = StudySpec.model_validate({"name": "s", "model": "small-mlp", "dataset": "digits"})
    with Session(engine) as session:
        crud.create_experiment(
            session, experiment_id="e1", name="s", spec_json="{}", plans=expand(study)
        )
        session.commit()
    return engine


@pytest.mark.parametrize(
    ("before", "trains", "after"),
    [
        (ExperimentStatus.QUEUED, True, ExperimentStatus.RUNNING),  # the job started first
        (ExperimentStatus.SUBMITTED, True, ExperimentStatus.RUNNING),
        (ExperimentStatus.RUNNING, True, ExperimentStatus.RUNNING),  # a restarted driver
        (ExperimentStatus.CANCELLED, False, ExperimentStatus.CANCELLED),  # cancelled in time
        (ExperimentStatus.CANCELLING, False, ExperimentStatus.CANCELLING),
        (ExperimentStatus.FAILED, False, ExperimentStatus.FAILED),
    ],
)
def test_a_driver_trains_only_an_experiment_that_is_still_wanted(
    tmp_path: Path, before: ExperimentStatus, trains: bool, after: ExperimentStatus
) -> None:
    engine = stored_experiment(tmp_path)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None
        experiment.status = before
        if before not in TERMINAL_EXPERIMENT:  # (an ended experiment never keeps one)
            experiment.notice = "1 trial waits"  # an earlier driver's word: not this one's
        session.commit()
        assert start(session, "e1") is trains
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None and experiment.status == after
        assert experiment.notice is None


def test_the_driver_environment_is_built_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    settings = Settings(
        database_url="postgresql+psycopg://dst:s3cret@db/dst", mlflow_tracking_uri="http://ml"
    )
    env = driver_env(settings)
    assert env["DST_DATABASE_URL"].endswith("s3cret@db/dst")
    assert env["MLFLOW_TRACKING_URI"] == "http://ml" and env["MLFLOW_TRACKING_TOKEN"] == "tok"
    assert set(env) <= set(DRIVER_ONLY_ENV)  # so the driver scrubs all of it from workers


def test_with_secrets_on_the_head_the_job_names_them_and_the_driver_checks_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``driver_secrets: head``: no secret in the job nor on the storage; the job names the
    variables the driver must find in the head's environment, and a driver on a head that
    lacks one fails saying which (before it could fall back to a database of its own)."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlpass")
    settings = Settings(
        database_url="postgresql+psycopg://dst:s3cret@db/dst",
        mlflow_tracking_uri="http://ml",
        storage_path=tmp_path,
        driver_secrets="head",
    )
    executor = RayExecutor.for_settings(settings, "http://ray:8265", "python")
    jobs = FakeJobs()
    executor._client = jobs  # type: ignore[assignment]
    executor.submit("e1")
    listed = json.dumps(jobs.jobs["e1"])
    assert "s3cret" not in listed and "mlpass" not in listed and "http://ml" not in listed
    env = jobs.jobs["e1"]["runtime_env"]["env_vars"]
    assert SECRETS_FILE_ENV not in env and not (tmp_path / "secrets").exists()
    assert env[HEAD_SECRETS_ENV] == (
        "DST_DATABASE_URL,DST_MLFLOW_TRACKING_URI,MLFLOW_TRACKING_PASSWORD,MLFLOW_TRACKING_URI"
    )
    head = {  # the head node's environment, as a deployment sets it
        "DST_DATABASE_URL": "postgresql+psycopg://dst:s3cret@postgres/dst",
        "DST_MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "mlpass",
    }
    driver = head | env
    assert take_secrets(driver) is True  # from the head
    assert driver == head | {k: v for k, v in env.items() if k != HEAD_SECRETS_ENV}
    lacking = {k: v for k, v in head.items() if k != "DST_DATABASE_URL"} | env
    with pytest.raises(RuntimeError, match=r"head's environment lacks DST_DATABASE_URL:"):
        take_secrets(lacking)
    executor.release("e1")  # nothing was written: nothing to remove
    none_named = {HEAD_SECRETS_ENV: ""}
    assert take_secrets(none_named) is True  # nothing to find, and no file to look for
    assert none_named == {}
    # a file left by a job submitted before the switch to the head: removed at its end
    left = write_secrets(executor.secrets_file("before"), {"DST_DATABASE_URL": "x"})
    executor.release("before")
    assert not left.exists()
    assert HEAD_SECRETS_ENV in DRIVER_ONLY_ENV  # scrubbed from the workers like the rest
    with pytest.raises(ValueError, match="driver_secrets"):
        Settings(driver_secrets="env")  # type: ignore[arg-type]


class FakeJobs:
    """The parts of Ray's Jobs client that submitting uses; Ray keeps what it is given."""

    def __init__(self, fail: bool = False) -> None:
        self.jobs: dict[str, dict] = {}
        self.fail = fail

    def get_job_status(self, job_id: str) -> Any:
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} not found.")
        return JobStatus.PENDING

    def submit_job(self, **job: Any) -> str:
        if self.fail:
            raise ConnectionError("the head did not answer")
        self.jobs[job["submission_id"]] = job
        return str(job["submission_id"])


def test_the_drivers_secrets_never_reach_ray_and_reach_the_driver_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray keeps a job's runtime environment with the job and lists it to anyone who can
    list jobs: the secrets go in a file only this user can read, which the driver takes."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlpass")
    settings = Settings(
        database_url="postgresql+psycopg://dst:s3cret@db/dst",
        mlflow_tracking_uri="http://ml",
        storage_path=tmp_path,
    )
    executor = RayExecutor("http://ray:8265", env=driver_env(settings))
    jobs = FakeJobs()
    executor._client = jobs  # type: ignore[assignment]
    executor.submit("e1")
    listed = json.dumps(jobs.jobs["e1"])
    assert "s3cret" not in listed and "mlpass" not in listed
    env = jobs.jobs["e1"]["runtime_env"]["env_vars"]
    secrets = Path(env[SECRETS_FILE_ENV])
    assert secrets.parent == tmp_path / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets.parent.stat().st_mode) == 0o700
    driver = dict(env)  # the driver's environment, as Ray starts it
    assert take_secrets(driver) is False  # from the file
    assert driver["DST_DATABASE_URL"] == "postgresql+psycopg://dst:s3cret@db/dst"
    assert driver["MLFLOW_TRACKING_PASSWORD"] == "mlpass"
    assert driver["DST_STORAGE_PATH"] == str(tmp_path)
    assert not secrets.exists()  # taken once: nothing left on the storage
    assert SECRETS_FILE_ENV not in driver
    with pytest.raises(RuntimeError, match=r"secrets file .* is gone"):
        take_secrets(dict(env))  # the same job's driver started again: says so
    executor.release("e1")  # the experiment's end: nothing to remove
    failing = RayExecutor("http://ray:8265", env=driver_env(settings))
    failing._client = FakeJobs(fail=True)  # type: ignore[assignment]
    with pytest.raises(ConnectionError):
        failing.submit("e2")
    assert list((tmp_path / "secrets").iterdir()) == []  # no job will read it: removed

    class TimesOut(FakeJobs):
        """The head accepted the job, then stopped answering: maybe a job reads the file."""

        def get_job_status(self, job_id: str) -> Any:
            if self.jobs:
                raise ConnectionError("the head does not answer")
            return super().get_job_status(job_id)

        def submit_job(self, **job: Any) -> str:
            super().submit_job(**job)
            raise TimeoutError("no answer within 10 s")

    unsure = RayExecutor("http://ray:8265", env=driver_env(settings))
    unsure._client = TimesOut()  # type: ignore[assignment]
    with pytest.raises(TimeoutError):  # the submission's own error, not the status check's
        unsure.submit("e3")
    assert (tmp_path / "secrets" / "e3.json").exists()  # kept for the job that may start


def test_a_submission_refused_because_the_job_exists_keeps_that_job(tmp_path: Path) -> None:
    """Ray took an earlier submission whose answer was lost, then refuses the repeat (400,
    the id is taken): the experiment's job exists, so submitting succeeded."""

    class Taken(FakeJobs):
        def __init__(self) -> None:
            super().__init__()
            self.looked = 0

        def get_job_status(self, job_id: str) -> Any:
            self.looked += 1
            if self.looked == 1:  # the first look, before the job became visible
                raise RuntimeError(f"Request failed with status code 404: Job {job_id} not found.")
            return JobStatus.RUNNING

        def submit_job(self, **job: Any) -> str:
            raise RuntimeError(
                "Request failed with status code 400: Job with submission_id e1 already exists."
            )

    settings = Settings(database_url="postgresql+psycopg://dst:s@db/dst", storage_path=tmp_path)
    executor = RayExecutor("http://ray:8265", env=driver_env(settings))
    executor._client = Taken()  # type: ignore[assignment]
    executor.submit("e1")  # no error: the job is there
    assert (tmp_path / "secrets" / "e1.json").exists()  # for that job's driver to take


class JobsApiAnswering:
    """Ray's Jobs API client answering every job request with ``text`` (an answer other than
    200, which the client raises)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def get_job_status(self, job_id: str) -> Any:
        raise RuntimeError(self.text)

    def get_job_logs(self, job_id: str) -> Any:
        raise RuntimeError(self.text)


def answering(text: str) -> RayExecutor:
    executor = RayExecutor("http://ray:8265")
    executor._client = JobsApiAnswering(text)  # type: ignore[assignment]
    return executor


def test_only_a_404_from_the_jobs_api_means_no_job() -> None:
    assert answering("Request failed with status code 404: not found.").status("e1") is None
    executor = answering("Request failed with status code 500: job 9f404c... could not be read.")
    with pytest.raises(RuntimeError, match="status code 500"):
        executor.status("9f404c")


def test_only_a_404_from_the_jobs_api_means_a_job_has_no_log() -> None:
    with pytest.raises(LookupError, match="Ray has no job e1"):
        answering("Request failed with status code 404: not found.").logs("e1")
    with pytest.raises(RuntimeError, match="status code 500"):
        answering("Request failed with status code 500: agent unreachable.").logs("9f404c")


def test_workers_do_not_inherit_the_driver_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    job = {
        "runtime_env": {"env_vars": {"DST_DATABASE_URL": "postgresql://x", "KEEP": "1"}},
        "metadata": {"a": "b"},
    }
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    scrub_worker_environment(DRIVER_ONLY_ENV)
    scrubbed = json.loads(os.environ[RAY_JOB_CONFIG_JSON_ENV_VAR])
    assert scrubbed["runtime_env"]["env_vars"] == {"KEEP": "1"}
    assert scrubbed["metadata"] == {"a": "b"}


def test_scrubbing_outside_a_ray_job_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    scrub_worker_environment(DRIVER_ONLY_ENV)
    assert RAY_JOB_CONFIG_JSON_ENV_VAR not in os.environ


@pytest.mark.parametrize(
    ("settings", "head", "from_head", "gpus", "refused"),
    [
        ({}, {"CPU": 0.0}, True, 0, None),  # a worker holds the trial: it runs
        ({}, {"CPU": 2.0}, False, 0, None),  # the head runs trials, but holds no secret
        ({}, {"CPU": 2.0}, True, 0, "would share the service's secrets"),
        ({}, {"CPU": 0.0, "GPU": 1.0}, True, 0, "would share the service's secrets"),
        ({"ray_nodes_wait_s": 0}, {"CPU": 0.0}, False, 2, "cannot run these trials"),
        ({"ray_autoscaling": True}, {"CPU": 0.0}, False, 2, None),  # nodes come on demand
    ],
)
def test_the_driver_refuses_a_cluster_before_any_trial_starts(
    settings: dict, head: dict, from_head: bool, gpus: int, refused: str | None
) -> None:
    """What ``preflight`` says of a head (the driver's node) and one worker of 2 CPUs, for
    trials of one CPU and ``gpus`` GPUs (one per worker)."""
    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": head},
        {"NodeID": "worker", "Alive": True, "Resources": {"CPU": 2.0}},
    ]
    answer = preflight(
        Settings(database_url="sqlite://", **settings),
        Resources(cpus_per_trial=1, gpus_per_trial=gpus, workers_per_trial=max(gpus, 1)),
        lambda: nodes,
        node_id="head",
        secrets_from_head=from_head,
        version=None,
    )
    if refused is None:
        assert answer is None
    else:
        assert answer is not None and refused in answer, answer
        assert "after waiting" not in answer  # these refusals come at once


def test_a_node_from_another_image_version_is_named() -> None:
    def node(address: str, version: str | None, alive: bool = True) -> dict:
        labels = {"ray.io/node-id": "ab" * 28} | ({"dst-lab-version": version} if version else {})
        return {
            "Alive": alive,
            "NodeManagerAddress": address,
            "NodeID": "ab" * 28,
            "Labels": labels,
        }

    nodes = [
        node("10.0.0.1", "1.4.0"),
        node("10.0.0.2", "1.3.9"),
        node("10.0.0.3", None),  # not started from the image: not compared
        node("10.0.0.4", "1.3.9", alive=False),  # gone
    ]
    lines = version_mismatches(nodes, "1.4.0")
    assert len(lines) == 1
    assert "10.0.0.2" in lines[0] and "1.3.9" in lines[0] and "1.4.0" in lines[0]
    assert version_mismatches(nodes, None) == []
    assert version_mismatches(nodes[:1], "1.4.0") == []


@pytest.mark.parametrize(
    ("resources", "warned"),
    [
        ({"CPU": 0.0, "memory": 1e9, "node:__internal_head__": 1.0}, None),  # schedules only
        ({}, None),
        ({"CPU": 2.0}, "{CPU: 2}"),
        ({"CPU": 0.0, "GPU": 1.0}, "{CPU: 0, GPU: 1}"),
    ],
)
def test_a_driver_with_secrets_from_its_node_says_when_trials_could_run_there(
    resources: dict[str, float], warned: str | None
) -> None:
    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": resources},
        {"NodeID": "worker", "Alive": True, "Resources": {"CPU": 8.0}},  # not the driver's
    ]
    line = secrets_exposed(nodes, "head")
    if warned is None:
        assert line is None
    else:
        assert line is not None and warned in line and "--num-cpus=0" in line


def test_the_driver_starts_without_what_its_trials_and_its_outbox_import() -> None:
    """The driver stands between a submitted study and its first trial: it imports Ray Tune
    and the database, but not torch (its trials train), not MLflow (its outbox thread
    connects while the trials start), not Alembic (the API migrates) and not the Jobs client."""
    import subprocess
    import sys

    heavy = ("torch", "mlflow", "alembic", "ray.job_submission")
    code = f"import sys, service.driver; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("before", "error_after"),
    [
        (ExperimentStatus.QUEUED, None),  # a launch whose answer was lost: now it runs
        (ExperimentStatus.CANCELLED, "launch failed, retrying: no answer"),  # ended: kept
    ],
)
def test_a_driver_that_starts_clears_the_launchs_retry_error(
    tmp_path: Path, before: ExperimentStatus, error_after: str | None
) -> None:
    engine = stored_experiment(tmp_path)
    with Session(engine) as session:
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None
        experiment.status = before
        experiment.error = "launch failed, retrying: no answer"
        session.commit()
        start(session, "e1")
        experiment = crud.get_experiment(session, "e1")
        assert experiment is not None and experiment.error == error_after


class ClosingRecorder:
    """The recorder's database backlog and MLflow outbox: what the driver asks of them at its
    end, in order."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, float]] = []
        self.runs = self

    def finish(self, index: int, state: str) -> None:
        raise AssertionError("no trial was running")

    def close(self, timeout: float) -> bool:
        self.closed.append(("database" if not self.closed else "mlflow", timeout))
        return True


def test_the_driver_drains_its_mlflow_writes_when_tune_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Tuner.fit`` raising (Tune's own error) still lets the queued database writes, then
    the queued MLflow writes out, each within its bound, before the job fails with that
    error."""
    import service.driver as driver

    engine = make_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    upgrade_database(engine)
    study = StudySpec.model_validate({"name": "s", "model": "small-mlp", "dataset": "digits"})
    with Session(engine) as session:
        crud.create_experiment(
            session,
            experiment_id="e1",
            name="s",
            spec_json=study.model_dump_json(),
            plans=expand(study),
        )
        session.commit()
    for name in (SECRETS_FILE_ENV, HEAD_SECRETS_ENV, RAY_JOB_CONFIG_JSON_ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    for name in (  # what main sets for itself: left as they were after this test
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S",
    ):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    monkeypatch.setenv("DST_DATABASE_URL", f"sqlite:///{tmp_path / 'svc.db'}")
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    recorder = ClosingRecorder()

    class FailingTuner:
        def fit(self) -> Any:
            raise RuntimeError("Tune failed")

    class Context:
        def get_node_id(self) -> str:
            return "head"

    monkeypatch.setattr(driver, "recorder_for", lambda experiment_id: recorder)
    monkeypatch.setattr(driver.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(driver.ray, "get_runtime_context", Context)
    monkeypatch.setattr(driver, "preflight", lambda *args, **kwargs: None)
    monkeypatch.setattr(driver, "capacity_watch_for", lambda *args: None)
    monkeypatch.setattr(driver, "make_tuner", lambda *args: FailingTuner())
    monkeypatch.setattr(driver.signal, "signal", lambda *args: None)
    with pytest.raises(RuntimeError, match="Tune failed"):
        driver.main(["--experiment-id", "e1"])
    assert recorder.closed == [("database", 60), ("mlflow", 60)]
