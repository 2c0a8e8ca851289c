"""Reads and writes of experiments and trials. Callers own the session and commit.

State changes are guarded: an experiment moves only along its lifecycle
(queued -> submitted -> running -> succeeded | failed, with cancelling -> cancelled from any
live state), and a trial in a terminal state never changes state again, so a late report from
a stopping trial cannot undo a cancellation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from dst.spec import RunSpec, resolve_training
from service.analysis import FinishedTrial, StudyAnalysis, analyze
from service.db import Experiment, Trial, TrialEpoch, utcnow
from service.results import Results, summarize
from service.states import (
    LIVE_EXPERIMENT,
    TERMINAL_EXPERIMENT,
    TERMINAL_TRIAL,
    TRANSITIONS,
    UNFINISHED_TRIAL,
    ExperimentStatus,
    TrialState,
)
from service.study import TrialPlan, stored_ranking

TRIAL_FIELDS = frozenset(
    {
        "state",
        "epoch",
        "epochs",
        "mlflow_run_id",
        "error",
        "resumed_from_epoch",
        "node",
        "gpus",
        "started_at",
        "finished_at",
    }
)


def create_experiment(
    session: Session,
    *,
    experiment_id: str,
    name: str,
    spec_json: str,
    plans: Sequence[TrialPlan],
    idempotency_key: str | None = None,
) -> Experiment:
    """A queued experiment with one pending trial per plan (flushed, not committed)."""
    experiment = Experiment(
        id=experiment_id,
        name=name,
        status=ExperimentStatus.QUEUED,
        spec_json=spec_json,
        idempotency_key=idempotency_key,
        n_trials=len(plans),
    )
    experiment.trials = [
        Trial(
            index=plan.index,
            label=plan.label,
            spec_json=plan.spec.model_dump_json(),
            state=TrialState.PENDING,
            epoch=0,
            epochs=resolve_training(plan.spec).epochs,
        )
        for plan in plans
    ]
    session.add(experiment)
    session.flush()
    return experiment


def get_experiment(session: Session, experiment_id: str) -> Experiment | None:
    return session.get(Experiment, experiment_id)


def get_by_idempotency_key(session: Session, key: str) -> Experiment | None:
    return session.scalar(select(Experiment).where(Experiment.idempotency_key == key))


def list_experiments(
    session: Session, *, status: str | None = None, offset: int = 0, limit: int = 50
) -> tuple[list[Experiment], int]:
    """A page of experiments, newest first, and the total matching ``status``."""
    query = select(Experiment)
    count = select(func.count()).select_from(Experiment)
    if status is not None:
        query = query.where(Experiment.status == status)
        count = count.where(Experiment.status == status)
    query = query.order_by(Experiment.created_at.desc(), Experiment.id).offset(offset).limit(limit)
    return list(session.scalars(query)), int(session.scalar(count) or 0)


def live_experiments(session: Session) -> list[Experiment]:
    """Experiments that are not finished (what the reconciler looks after)."""
    query = select(Experiment).where(Experiment.status.in_(LIVE_EXPERIMENT))
    return list(session.scalars(query.order_by(Experiment.created_at)))


def unclosed_parents(session: Session) -> list[str]:
    """Ended experiments whose MLflow parent run is still to be closed (MLflow was down)."""
    query = select(Experiment.id).where(
        Experiment.status.in_(TERMINAL_EXPERIMENT),
        Experiment.mlflow_parent_run_id.is_not(None),
        Experiment.mlflow_closed_at.is_(None),
    )
    return list(session.scalars(query.order_by(Experiment.created_at)))


def mark_parent_closed(session: Session, experiment_id: str) -> None:
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id)
        .values(mlflow_closed_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )


def set_experiment_status(
    session: Session,
    experiment_id: str,
    status: ExperimentStatus,
    *,
    error: str | None = None,
    only_from: Sequence[ExperimentStatus] | None = None,
) -> bool:
    """Move an experiment to ``status`` if its lifecycle allows it; True if it moved.

    The update is one conditional statement, so concurrent writers (the API, the job driver)
    cannot both move it. A move writes ``error`` whatever it is (None clears it): an error is
    the state's, and the only one a moving experiment can have is its launch's "retrying",
    which a job that now runs (or an end) has answered.
    """
    allowed_from = [s for s, targets in TRANSITIONS.items() if status in targets]
    if only_from is not None:
        allowed_from = [s for s in allowed_from if s in only_from]
    values: dict[str, Any] = {"status": status, "updated_at": utcnow(), "error": error}
    if status in TERMINAL_EXPERIMENT:
        values["finished_at"] = utcnow()
        values["notice"] = None  # an ended experiment waits for nothing
    result = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.in_(allowed_from))
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    return bool(getattr(result, "rowcount", 0))


def set_error(
    session: Session,
    experiment_id: str,
    error: str | None,
    *,
    only_in: Sequence[ExperimentStatus] | None = None,
) -> bool:
    """Record (or clear) the experiment's ``error``; with ``only_in``, only while it is in one
    of those states (a writer racing with a status move then leaves it alone). True if
    written."""
    query = update(Experiment).where(Experiment.id == experiment_id)
    if only_in is not None:
        query = query.where(Experiment.status.in_(only_in))
    result = session.execute(query.values(error=error))
    return bool(getattr(result, "rowcount", 0))


def set_experiment_notice(session: Session, experiment_id: str, notice: str | None) -> None:
    """What a live experiment waits for (None: nothing); an ended one keeps none."""
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status.not_in(TERMINAL_EXPERIMENT))
        .values(notice=notice)
    )


def set_mlflow_ids(
    session: Session, experiment_id: str, mlflow_experiment_id: str, parent_run_id: str
) -> None:
    session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id)
        .values(mlflow_experiment_id=mlflow_experiment_id, mlflow_parent_run_id=parent_run_id)
    )


def get_trial(session: Session, experiment_id: str, index: int) -> Trial | None:
    query = select(Trial).where(Trial.experiment_id == experiment_id, Trial.index == index)
    return session.scalar(query)


def list_trials(session: Session, experiment_id: str) -> list[Trial]:
    query = select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.index)
    return list(session.scalars(query))


def trial_counts_by_state(session: Session, experiment_id: str) -> dict[str, int]:
    query = (
        select(Trial.state, func.count())
        .where(Trial.experiment_id == experiment_id)
        .group_by(Trial.state)
    )
    return {state: int(n) for state, n in session.execute(query)}


def update_trial(
    session: Session,
    experiment_id: str,
    index: int,
    *,
    metrics: dict[str, float] | None = None,
    **fields: Any,
) -> bool:
    """Update one trial's columns (and its latest ``metrics``); True if a row changed.

    A trial in a terminal state keeps its state, whatever a late report says.
    """
    unknown = set(fields) - TRIAL_FIELDS
    if unknown:
        raise ValueError(f"unknown trial fields {sorted(unknown)}; allowed: {sorted(TRIAL_FIELDS)}")
    values: dict[str, Any] = dict(fields, updated_at=utcnow())
    if metrics is not None:
        values["metrics_json"] = json.dumps(metrics)
    query = update(Trial).where(Trial.experiment_id == experiment_id, Trial.index == index)
    if "state" in fields:
        query = query.where(Trial.state.not_in(TERMINAL_TRIAL))
    result = session.execute(query.values(**values).execution_options(synchronize_session=False))
    session.expire_all()
    return bool(getattr(result, "rowcount", 0))


def finish_unfinished_trials(
    session: Session, experiment_id: str, state: TrialState, error: str | None = None
) -> int:
    """Move every pending or running trial to ``state``; the number moved."""
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "updated_at": utcnow()}
    if error is not None:
        values["error"] = error
    result = session.execute(
        update(Trial)
        .where(Trial.experiment_id == experiment_id, Trial.state.in_(UNFINISHED_TRIAL))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return int(getattr(result, "rowcount", 0))


def record_epoch(
    session: Session, experiment_id: str, index: int, metrics: dict[str, float]
) -> None:
    """Add trial ``index``'s epoch ``metrics["epoch"]`` to its history (replacing that epoch's
    row if a trial restored from a checkpoint reports it again)."""
    epoch = int(metrics["epoch"])
    session.execute(
        delete(TrialEpoch).where(
            TrialEpoch.experiment_id == experiment_id,
            TrialEpoch.index == index,
            TrialEpoch.epoch == epoch,
        )
    )
    session.add(
        TrialEpoch(
            experiment_id=experiment_id, index=index, epoch=epoch, metrics_json=json.dumps(metrics)
        )
    )


def trial_histories(
    session: Session, experiment_id: str, indices: Sequence[int] | None = None
) -> dict[int, list[dict[str, float]]]:
    """Per trial index, its per-epoch metrics in epoch order (only ``indices``, if given)."""
    query = select(TrialEpoch.index, TrialEpoch.metrics_json).where(
        TrialEpoch.experiment_id == experiment_id
    )
    if indices is not None:
        query = query.where(TrialEpoch.index.in_(list(indices)))
    histories: dict[int, list[dict[str, float]]] = {}
    for index, metrics_json in session.execute(query.order_by(TrialEpoch.index, TrialEpoch.epoch)):
        histories.setdefault(index, []).append(json.loads(metrics_json))
    return histories


def trial_metrics(trial: Trial) -> dict[str, float] | None:
    return json.loads(trial.metrics_json) if trial.metrics_json else None


def study_results(session: Session, experiment_id: str) -> Results:
    """The results table: grouped by what the trials vary, from every succeeded trial."""
    specs, finished = [], []
    for trial in list_trials(session, experiment_id):
        spec = RunSpec.model_validate_json(trial.spec_json)
        specs.append(spec)
        metrics = trial_metrics(trial)
        if trial.state == TrialState.SUCCEEDED and metrics is not None:
            finished.append((spec, metrics))
    return summarize(specs, finished)


def trials_version(session: Session, experiment_id: str) -> str:
    """What changes whenever one of the experiment's trials changes (a report, a state): the
    number of its trials in each state and their latest update."""
    latest = session.scalar(
        select(func.max(Trial.updated_at)).where(Trial.experiment_id == experiment_id)
    )
    states = sorted(trial_counts_by_state(session, experiment_id).items())
    return f"{latest}|{states}"


def study_analysis(
    session: Session, experiment_id: str, mask_dir: Path | None = None
) -> StudyAnalysis:
    """Rankings (by the study's ``ranking.metric``), learning curves, structure (masks in
    ``mask_dir``) and figure data over every succeeded trial (``partial`` while some run)."""
    experiment = get_experiment(session, experiment_id)
    metric = "test_acc" if experiment is None else stored_ranking(experiment.spec_json).metric
    specs, finished, unfinished = [], [], 0
    histories = trial_histories(session, experiment_id)
    for trial in list_trials(session, experiment_id):
        spec = RunSpec.model_validate_json(trial.spec_json)
        specs.append(spec)
        metrics = trial_metrics(trial)
        if trial.state == TrialState.SUCCEEDED and metrics is not None:
            history = histories.get(trial.index, [])
            finished.append(FinishedTrial(spec, metrics, trial.index, history))
        unfinished += trial.state in UNFINISHED_TRIAL
    return analyze(specs, finished, partial=unfinished > 0, mask_dir=mask_dir, metric=metric)


def as_aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything we store is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
