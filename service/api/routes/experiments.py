"""Experiment endpoints: submit, list, inspect, trials, cancel, results."""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from sqlalchemy.exc import IntegrityError

from dst.spec import flatten
from service import crud, lifecycle
from service.api.deps import ServicesDep, SessionDep, SettingsDep
from service.db import Experiment, Trial
from service.schemas import (
    ExperimentOut,
    ExperimentPage,
    MlflowLinks,
    ResultsOut,
    TrialOut,
)
from service.states import UNFINISHED_TRIAL, ExperimentStatus
from service.study import StudySpec, expand

router = APIRouter(prefix="/experiments", tags=["experiments"])


def experiment_out(session: SessionDep, services: ServicesDep, e: Experiment) -> ExperimentOut:
    study = json.loads(e.spec_json)
    links = services.tracker.links(e.mlflow_experiment_id, e.mlflow_parent_run_id)
    return ExperimentOut(
        id=e.id,
        name=e.name,
        status=e.status,
        n_trials=e.n_trials,
        trial_counts=crud.trial_counts_by_state(session, e.id),
        tags=study.get("tags", {}),
        error=e.error,
        created_at=crud.as_aware(e.created_at),
        updated_at=crud.as_aware(e.updated_at),
        finished_at=crud.as_aware(e.finished_at),
        mlflow=MlflowLinks(
            experiment_id=e.mlflow_experiment_id, parent_run_id=e.mlflow_parent_run_id, **links
        ),
    )


def trial_out(t: Trial) -> TrialOut:
    return TrialOut(
        index=t.index,
        label=t.label,
        state=t.state,
        epoch=t.epoch,
        epochs=t.epochs,
        params=flatten(json.loads(t.spec_json)),
        metrics=crud.trial_metrics(t),
        mlflow_run_id=t.mlflow_run_id,
        error=t.error,
        resumed_from_epoch=t.resumed_from_epoch,
        started_at=crud.as_aware(t.started_at),
        finished_at=crud.as_aware(t.finished_at),
    )


def _get(session: SessionDep, experiment_id: str) -> Experiment:
    experiment = crud.get_experiment(session, experiment_id)
    if experiment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no experiment {experiment_id!r}")
    return experiment


@router.post("", status_code=status.HTTP_201_CREATED)
def submit_experiment(
    study: StudySpec,
    session: SessionDep,
    services: ServicesDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="a retried submission with the same key returns the same experiment",
        ),
    ] = None,
) -> ExperimentOut:
    """Validate a study, store it with its trials, create its MLflow parent run and submit its
    Ray job. Answers 201 for a new experiment, 200 for a replay of an idempotency key."""
    if idempotency_key is not None:
        existing = crud.get_by_idempotency_key(session, idempotency_key)
        if existing is not None:
            response.status_code = status.HTTP_200_OK
            return experiment_out(session, services, existing)
    plans = expand(study)
    if len(plans) > settings.max_trials:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{
                "loc": ["body", "grid"],
                "msg": f"the study expands to {len(plans)} trials; the limit is "
                       f"{settings.max_trials} (DST_MAX_TRIALS)",
                "type": "too_many_trials",
            }],
        )  # fmt: skip
    experiment_id = uuid.uuid4().hex
    try:
        crud.create_experiment(
            session,
            experiment_id=experiment_id,
            name=study.name,
            spec_json=study.model_dump_json(),
            plans=plans,
            idempotency_key=idempotency_key,
        )
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = crud.get_by_idempotency_key(session, idempotency_key or "")
        if existing is None:
            raise
        response.status_code = status.HTTP_200_OK
        return experiment_out(session, services, existing)
    lifecycle.launch(services, experiment_id)
    session.expire_all()
    return experiment_out(session, services, _get(session, experiment_id))


@router.get("")
def list_experiments(
    session: SessionDep,
    services: ServicesDep,
    status_filter: Annotated[ExperimentStatus | None, Query(alias="status")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ExperimentPage:
    """Experiments, newest first, optionally only those in one status."""
    items, total = crud.list_experiments(session, status=status_filter, offset=offset, limit=limit)
    return ExperimentPage(
        items=[experiment_out(session, services, e) for e in items],
        total=total,
        offset=offset,
        limit=limit,
    )


@router.get("/{experiment_id}")
def get_experiment(experiment_id: str, session: SessionDep, services: ServicesDep) -> ExperimentOut:
    """Status, trial counts by state and MLflow links of one experiment."""
    return experiment_out(session, services, _get(session, experiment_id))


@router.get("/{experiment_id}/trials")
def list_trials(experiment_id: str, session: SessionDep) -> list[TrialOut]:
    """Every trial's parameters, state, current epoch and latest metrics."""
    _get(session, experiment_id)
    return [trial_out(t) for t in crud.list_trials(session, experiment_id)]


@router.post("/{experiment_id}/cancel")
def cancel_experiment(
    experiment_id: str, session: SessionDep, services: ServicesDep
) -> ExperimentOut:
    """Stop a live experiment (its Ray job stops gracefully; unfinished trials are cancelled).
    Cancelling a cancelled experiment is a no-op; a finished one answers 409."""
    experiment = _get(session, experiment_id)
    if experiment.status in (ExperimentStatus.SUCCEEDED, ExperimentStatus.FAILED):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"experiment {experiment_id} already {experiment.status}"
        )
    lifecycle.cancel(services, experiment_id)
    session.expire_all()
    return experiment_out(session, services, _get(session, experiment_id))


@router.get("/{experiment_id}/results")
def get_results(experiment_id: str, session: SessionDep) -> ResultsOut:
    """Final test accuracy (last epoch and at the best validation epoch) and loss, mean ± std
    over seeds, one row per combination of the fields the study varies (succeeded trials)."""
    experiment = _get(session, experiment_id)
    results = crud.study_results(session, experiment_id)
    counts = crud.trial_counts_by_state(session, experiment_id)
    unfinished = sum(counts.get(s, 0) for s in UNFINISHED_TRIAL)
    return ResultsOut(
        experiment_id=experiment_id,
        status=experiment.status,
        complete=unfinished == 0,
        group_by=results.group_by,
        rows=results.rows,
    )
