"""The lifecycle of an experiment: launch on Ray, reconcile with Ray, cancel, finalize.

The API owns experiment states; Ray owns whether the job runs. :func:`reconcile` brings the
two together and is run by the API in a background loop (and once at start-up), so a job that
ended while the API was down is recorded as ended when the API comes back.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from service import crud
from service.db import Experiment
from service.results import Results
from service.states import ExperimentStatus, JobStatus, TrialState
from service.study import StudySpec, TrialPlan, expand

log = logging.getLogger(__name__)


class Executor(Protocol):
    def submit(self, experiment_id: str) -> None: ...
    def status(self, experiment_id: str) -> JobStatus | None: ...
    def stop(self, experiment_id: str) -> None: ...
    def logs(self, experiment_id: str) -> str: ...
    def ping(self) -> bool: ...


class Tracker(Protocol):
    tracking_uri: str

    def create_parent(
        self, experiment_id: str, study: StudySpec, plans: list[TrialPlan]
    ) -> tuple[str, str]: ...
    def finish_parent(
        self, parent_run_id: str, status: ExperimentStatus, results: Results
    ) -> None: ...
    def links(
        self, mlflow_experiment_id: str | None, parent_run_id: str | None
    ) -> dict[str, str | None]: ...
    def ping(self) -> bool: ...


@dataclass(frozen=True)
class Services:
    """What the lifecycle talks to."""

    engine: Engine
    executor: Executor
    tracker: Tracker
    launching: threading.Lock = field(default_factory=threading.Lock)  # one launch at a time


def launch(services: Services, experiment_id: str) -> None:
    """Create the MLflow parent run (if missing) and submit the Ray job of a queued experiment.

    Safe to repeat: the parent run is found by tag and the job by its submission id. A failure
    leaves the experiment queued with the error recorded; the reconciler tries again.
    """
    with services.launching:
        _launch(services, experiment_id)


def _launch(services: Services, experiment_id: str) -> None:
    with Session(services.engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is None or experiment.status != ExperimentStatus.QUEUED:
            return
        try:
            if experiment.mlflow_parent_run_id is None:
                study = StudySpec.model_validate_json(experiment.spec_json)
                mlflow_experiment, parent = services.tracker.create_parent(
                    experiment_id, study, expand(study)
                )
                crud.set_mlflow_ids(session, experiment_id, mlflow_experiment, parent)
                session.commit()
            services.executor.submit(experiment_id)
        except Exception as error:
            log.warning("launching %s failed (will retry): %s", experiment_id, error)
            session.rollback()
            crud.set_error(session, experiment_id, f"launch failed, retrying: {error}")
            session.commit()
            return
        moved = crud.set_experiment_status(session, experiment_id, ExperimentStatus.SUBMITTED)
        crud.set_error(session, experiment_id, None)
        session.commit()
    if not moved:  # cancelled while we were submitting: do not leave the job running
        services.executor.stop(experiment_id)


def cancel(services: Services, experiment_id: str) -> None:
    """Stop the experiment: a queued one is cancelled at once, a live one asks Ray to stop."""
    with Session(services.engine) as session:
        if crud.set_experiment_status(
            session, experiment_id, ExperimentStatus.CANCELLED, only_from=[ExperimentStatus.QUEUED]
        ):
            crud.finish_unfinished_trials(session, experiment_id, TrialState.CANCELLED)
            session.commit()
            experiment = crud.get_experiment(session, experiment_id)
            if experiment is not None:
                _finish_parent(services, session, experiment, ExperimentStatus.CANCELLED)
            return
        moved = crud.set_experiment_status(session, experiment_id, ExperimentStatus.CANCELLING)
        session.commit()
    if moved:
        services.executor.stop(experiment_id)


def finalize(
    services: Services, session: Session, experiment: Experiment, job_status: JobStatus
) -> None:
    """Record the end of an experiment whose Ray job ended with ``job_status``."""
    exp_id = experiment.id
    status: ExperimentStatus
    error: str | None = None
    if job_status == JobStatus.STOPPED or experiment.status == ExperimentStatus.CANCELLING:
        crud.finish_unfinished_trials(session, exp_id, TrialState.CANCELLED)
        status = ExperimentStatus.CANCELLED
    else:
        left = crud.finish_unfinished_trials(
            session,
            exp_id,
            TrialState.FAILED,
            error=f"the Ray job ended ({job_status}) before this trial",
        )
        counts = crud.trial_counts_by_state(session, exp_id)
        failed = counts.get(TrialState.FAILED, 0)
        if job_status == JobStatus.SUCCEEDED and failed == 0:
            status = ExperimentStatus.SUCCEEDED
        else:
            status = ExperimentStatus.FAILED
            error = f"{failed} of {experiment.n_trials} trials failed"
            if job_status == JobStatus.FAILED:
                error += f"; the Ray job failed: {_log_tail(services, exp_id)}"
            elif left:
                error += f"; {left} never finished"
    if crud.set_experiment_status(session, exp_id, status, error=error):
        session.commit()
        log.info("experiment %s %s", exp_id, status)
        _finish_parent(services, session, experiment, status)
    else:
        session.commit()


def _finish_parent(
    services: Services, session: Session, experiment: Experiment, status: ExperimentStatus
) -> None:
    if experiment.mlflow_parent_run_id is None:
        return
    results = crud.study_results(session, experiment.id)
    try:
        services.tracker.finish_parent(experiment.mlflow_parent_run_id, status, results)
    except Exception as error:
        log.warning("could not finish MLflow parent run of %s: %s", experiment.id, error)


def _log_tail(services: Services, experiment_id: str, chars: int = 2000) -> str:
    try:
        return services.executor.logs(experiment_id)[-chars:]
    except Exception as error:
        return f"(no logs: {error})"


def reconcile(services: Services) -> None:
    """One pass over live experiments: launch queued ones, record those whose job ended."""
    with Session(services.engine) as session:
        live = [(e.id, e.status) for e in crud.live_experiments(session)]
    for experiment_id, status in live:
        if status == ExperimentStatus.QUEUED:
            launch(services, experiment_id)
            continue
        job = services.executor.status(experiment_id)
        if job is not None and job.live:
            continue
        with Session(services.engine) as session:
            experiment = crud.get_experiment(session, experiment_id)
            if experiment is None:
                continue
            if job is None:
                crud.finish_unfinished_trials(session, experiment_id, TrialState.FAILED)
                crud.set_experiment_status(
                    session,
                    experiment_id,
                    ExperimentStatus.FAILED,
                    error="Ray has no job for this experiment",
                )
                session.commit()
                continue
            finalize(services, session, experiment, job)
