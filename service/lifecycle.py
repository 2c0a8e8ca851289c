"""The lifecycle of an experiment: launch on Ray, reconcile with Ray, cancel, finalize.

The API owns experiment states; Ray owns whether the job runs. Requests only write the
database (:func:`cancel` marks an experiment ``cancelling``); :func:`advance` does the rest for
one experiment (launch a queued one, stop a cancelling one, record the end of a finished job),
talking to Ray and MLflow. The API runs it in the background (:mod:`service.dispatcher`), for
every live experiment periodically and at once after a submit or cancel, so a job that ended
while the API was down is recorded when the API comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from service import crud
from service.analysis import AnalysisCache, StudyAnalysis, experiment_masks_dir
from service.analysis import preload as preload_analysis
from service.db import Experiment
from service.refusal import refused, refused_for_good
from service.states import TRANSITIONS, ExperimentStatus, JobStatus, TrialState
from service.study import StudySpec, TrialPlan, expand

log = logging.getLogger(__name__)


class Executor(Protocol):
    def submit(self, experiment_id: str) -> None: ...
    def status(self, experiment_id: str) -> JobStatus | None: ...
    def stop(self, experiment_id: str) -> None: ...
    def logs(self, experiment_id: str) -> str: ...  # LookupError: no such job
    def ping(self) -> bool: ...
    def release(self, experiment_id: str) -> None: ...


class Tracker(Protocol):
    tracking_uri: str

    def create_parent(
        self, experiment_id: str, study: StudySpec, plans: list[TrialPlan]
    ) -> tuple[str, str]: ...
    def finish_parent(
        self,
        parent_run_id: str,
        status: ExperimentStatus,
        analysis: StudyAnalysis,
        trial_runs: Mapping[str, str] | None = None,
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
    storage_path: Path | None = None  # where the job drivers keep finished trials' masks
    analyses: AnalysisCache | None = None  # the API's: a parent run and a report share one


def launch(services: Services, experiment_id: str) -> None:
    """Create the MLflow parent run (if missing) and submit the Ray job of a queued experiment.

    Safe to repeat: the parent run is found by tag and the job by its submission id. A failure
    leaves the experiment queued with the error recorded; the next pass tries again, unless
    MLflow or Ray refused the request itself (:func:`refused`): then the experiment fails
    with their answer, since no retry could change it.
    """
    with Session(services.engine) as session:  # no session stays open across Ray or MLflow
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is None or experiment.status != ExperimentStatus.QUEUED:
            return
        parent, spec_json = experiment.mlflow_parent_run_id, experiment.spec_json
    try:
        if parent is None:
            study = StudySpec.model_validate_json(spec_json)
            mlflow_experiment, parent = services.tracker.create_parent(
                experiment_id, study, expand(study)
            )
            with Session(services.engine) as session:
                crud.set_mlflow_ids(session, experiment_id, mlflow_experiment, parent)
                session.commit()
        services.executor.submit(experiment_id)
    except Exception as error:
        if refused(error):
            _fail_launch(services, experiment_id, f"launch refused: {error}")
            return
        log.warning("launching %s failed (will retry): %s", experiment_id, error)
        with Session(services.engine) as session:  # (not over a driver that started since)
            queued = [ExperimentStatus.QUEUED]
            crud.set_error(
                session, experiment_id, f"launch failed, retrying: {error}", only_in=queued
            )
            session.commit()
        return
    with Session(services.engine) as session:  # (the move clears the last try's error)
        moved = crud.set_experiment_status(session, experiment_id, ExperimentStatus.SUBMITTED)
        session.commit()
        now = None if moved else crud.get_experiment(session, experiment_id)
        cancelled = not moved and (now is None or ExperimentStatus(now.status).wants_no_job)
    if cancelled:  # cancelled while we were submitting: stop the job it made
        services.executor.stop(experiment_id)  # (the driver also refuses to train it)
        services.executor.release(experiment_id)
        return
    preload_analysis()  # while the job starts: the first analysis then needs no imports


def _fail_launch(services: Services, experiment_id: str, error: str) -> None:
    log.error("%s: %s", experiment_id, error)
    with Session(services.engine) as session:
        crud.finish_unfinished_trials(session, experiment_id, TrialState.FAILED, error=error)
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is not None:
            _end(services, session, experiment, ExperimentStatus.FAILED, error)


def cancel(services: Services, experiment_id: str) -> bool:
    """Cancel in the database only; True if the experiment moved (then call :func:`advance`).

    A queued experiment is cancelled at once (a launch racing with this stops the job it
    submitted, and :func:`advance` closes the MLflow parent run). A live one becomes
    ``cancelling``: :func:`advance` stops its job, and its trials become ``cancelled`` once
    they have stopped.
    """
    with Session(services.engine) as session:
        queued = [ExperimentStatus.QUEUED]
        if crud.set_experiment_status(
            session, experiment_id, ExperimentStatus.CANCELLED, only_from=queued
        ):
            crud.finish_unfinished_trials(session, experiment_id, TrialState.CANCELLED)
            session.commit()
            return True
        moved = crud.set_experiment_status(session, experiment_id, ExperimentStatus.CANCELLING)
        session.commit()
    return moved


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
    _end(services, session, experiment, status, error)


def _finish_parent(
    services: Services, session: Session, experiment: Experiment, status: ExperimentStatus
) -> None:
    """Close the experiment's MLflow parent run with its results and analysis, and record
    that it is closed. If MLflow fails, it stays unclosed: the dispatcher's next passes
    retry (:func:`advance`) once MLflow answers again. If MLflow refuses for good (the user
    deleted the run), that is logged once and the run is recorded as closed: nothing is
    left to do for it."""
    parent, experiment_id = experiment.mlflow_parent_run_id, experiment.id
    if parent is None or experiment.mlflow_closed_at is not None:
        return
    masks = services.storage_path and experiment_masks_dir(services.storage_path, experiment_id)

    def compute() -> StudyAnalysis:
        return crud.study_analysis(session, experiment_id, masks or None)

    if services.analyses is None:
        analysis = compute()
    else:  # a report asked for at the same time waits for this computation, not a second one
        version = crud.trials_version(session, experiment_id)
        analysis = services.analyses.get(experiment_id, version, compute)
    trial_runs = {  # child run -> final state: runs a killed driver left running end so
        t.mlflow_run_id: str(t.state)
        for t in crud.list_trials(session, experiment_id)
        if t.mlflow_run_id is not None
    }
    session.commit()  # no transaction stays open across the MLflow calls
    try:
        services.tracker.finish_parent(parent, status, analysis, trial_runs=trial_runs)
    except Exception as error:
        if not refused_for_good(error):
            log.warning(
                "could not close the MLflow parent run of %s (retried later): %s",
                experiment_id,
                error,
            )
            return
        log.error(  # no retry can change the answer: said once, then left alone
            "MLflow refuses to close the parent run %s of %s (deleted?); not trying again: %s",
            parent,
            experiment_id,
            error,
        )
    crud.mark_parent_closed(session, experiment_id)
    session.commit()


def _close_parent_when_reachable(
    services: Services, session: Session, experiment: Experiment, status: ExperimentStatus
) -> None:
    """Close the parent run of an ended experiment if it is still open and MLflow answers
    (a quick check first: the analysis is not computed again while MLflow is down)."""
    if experiment.mlflow_closed_at is None and services.tracker.ping():
        _finish_parent(services, session, experiment, status)


def _log_tail(services: Services, experiment_id: str, chars: int = 2000) -> str:
    try:
        return services.executor.logs(experiment_id)[-chars:]
    except Exception as error:
        return f"(no logs: {error})"


def to_advance(session: Session) -> list[str]:
    """What a pass looks after: every live experiment, and every ended one whose MLflow parent
    run is still to be closed."""
    return [e.id for e in crud.live_experiments(session)] + crud.unclosed_parents(session)


def reconcile(services: Services) -> None:
    """One pass (what the dispatcher does in the background)."""
    with Session(services.engine) as session:
        experiment_ids = to_advance(session)
    for experiment_id in experiment_ids:
        advance(services, experiment_id)


def advance(services: Services, experiment_id: str) -> None:
    """Move one experiment on: launch it if queued, stop its job if cancelling, and record
    its end once its job has ended (or Ray has none); close the MLflow parent run of an
    ended one whose run is still open (cancelled while queued, or MLflow was down at its
    end), once MLflow answers."""
    with Session(services.engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        status = None if experiment is None else ExperimentStatus(experiment.status)
        if experiment is not None and status is not None and status.terminal:
            # its driver's secrets, if none took them: a cancel while queued ends it here
            services.executor.release(experiment_id)
            _close_parent_when_reachable(services, session, experiment, status)
    if status is None or status.terminal:
        return
    if status == ExperimentStatus.QUEUED:
        launch(services, experiment_id)
        return
    job = services.executor.status(experiment_id)
    if job is not None and job.live:
        if status == ExperimentStatus.CANCELLING:
            services.executor.stop(experiment_id)  # the next pass records the stop
        return
    with Session(services.engine) as session:
        experiment = crud.get_experiment(session, experiment_id)
        if experiment is None:
            return
        if job is not None:
            finalize(services, session, experiment, job)
        elif experiment.status == ExperimentStatus.CANCELLING:  # never launched: nothing runs
            crud.finish_unfinished_trials(session, experiment_id, TrialState.CANCELLED)
            _end(services, session, experiment, ExperimentStatus.CANCELLED)
        else:
            crud.finish_unfinished_trials(session, experiment_id, TrialState.FAILED)
            _end(services, session, experiment, ExperimentStatus.FAILED, "Ray has no job for it")


def _end(
    services: Services,
    session: Session,
    experiment: Experiment,
    status: ExperimentStatus,
    error: str | None = None,
) -> None:
    """Move ``experiment`` to a terminal ``status``, then close its MLflow parent run.

    The end is recorded first: the study's analysis and figures take seconds to compute and
    upload, and a user waiting on the experiment should not wait on MLflow. The parent run is
    closed right after (``mlflow_closed_at`` records when); if MLflow fails, the dispatcher's
    next passes close it once MLflow answers.
    """
    session.commit()  # the trials' final states, which the parent run's results table reads
    if status not in TRANSITIONS.get(ExperimentStatus(experiment.status), frozenset()):
        return
    if crud.set_experiment_status(session, experiment.id, status, error=error):
        log.info("experiment %s %s", experiment.id, status)
    session.commit()
    services.executor.release(experiment.id)  # its driver's secrets, if it never took them
    session.refresh(experiment)
    now = ExperimentStatus(experiment.status)  # a cancel may have come first
    if now.terminal:
        _finish_parent(services, session, experiment, now)
