"""Experiment endpoints: submit, list, inspect, the stored spec, trials, cancel, results, the
driver's log, analysis and figures."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi import Path as FastApiPath
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dst.spec import flatten
from service import crud, lifecycle
from service.analysis import AnalysisCache, StudyAnalysis, experiment_masks_dir
from service.api.deps import AnalysesDep, DispatcherDep, ServicesDep, SessionDep, SettingsDep
from service.core.config import Settings
from service.db import Experiment, Trial
from service.dispatcher import Dispatcher
from service.figures import PNG_DPI, build_figure, figure_names, render
from service.schemas import (
    LOG_LENGTH_HEADER,
    AnalysisOut,
    ExperimentOut,
    ExperimentPage,
    FigureRef,
    MlflowLinks,
    Problem,
    ResultsOut,
    TrialOut,
)
from service.states import UNFINISHED_TRIAL, ExperimentStatus, TrialState
from service.study import StudySpec, TrialPlan, expand

router = APIRouter(
    prefix="/experiments",
    tags=["experiments"],
    responses={
        401: {"model": Problem, "description": "missing or wrong bearer token"},
        503: {"model": Problem, "description": "the database is unreachable; retry later"},
    },
)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such experiment"}
}


def experiment_out(
    session: SessionDep,
    services: ServicesDep,
    e: Experiment,
    counts: dict[TrialState, int] | None = None,
) -> ExperimentOut:
    """The API's view of ``e`` (``counts``: trials by state, when the caller knows them)."""
    study = json.loads(e.spec_json)
    links = services.tracker.links(e.mlflow_experiment_id, e.mlflow_parent_run_id)
    return ExperimentOut(
        id=e.id,
        name=e.name,
        status=e.status,
        n_trials=e.n_trials,
        trial_counts=counts if counts is not None else crud.trial_counts_by_state(session, e.id),
        tags=study.get("tags", {}),
        error=e.error,
        notice=e.notice,
        created_at=crud.as_aware(e.created_at),
        updated_at=crud.as_aware(e.updated_at),
        finished_at=crud.as_aware(e.finished_at),
        mlflow=MlflowLinks(
            experiment_id=e.mlflow_experiment_id,
            parent_run_id=e.mlflow_parent_run_id,
            parent_closed_at=crud.as_aware(e.mlflow_closed_at),
            **links,
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
        node=t.node,
        gpus=t.gpus,
        started_at=crud.as_aware(t.started_at),
        finished_at=crud.as_aware(t.finished_at),
    )


HEX_DIGITS = frozenset("0123456789abcdef")  # an experiment id is uuid4().hex


def _get(session: SessionDep, experiment_id: str) -> Experiment:
    """The experiment, or 404. An id that is not one the API gives out (32 hex digits) is not
    looked up: the database need not take whatever a path holds (PostgreSQL refuses NUL)."""
    known_form = len(experiment_id) == 32 and all(c in HEX_DIGITS for c in experiment_id)
    experiment = crud.get_experiment(session, experiment_id) if known_form else None
    if experiment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no experiment {experiment_id!r}")
    return experiment


def _unprocessable(loc: list[str], msg: str, kind: str) -> HTTPException:
    """A 422 shaped like pydantic's, naming the field."""
    detail = [{"loc": loc, "msg": msg, "type": kind}]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def _plans(study: StudySpec, settings: Settings, where: list[str]) -> list[TrialPlan]:
    """The study's trials, refused before expanding when the grid alone is over the limit;
    ``where`` is the study's place in the request (errors name fields below it)."""
    limit, size = settings.max_trials, study.grid_size()
    too_many = "the study expands to {} trials; the limit is {} (DST_MAX_TRIALS)"
    if size > limit:
        raise _unprocessable([*where, "grid"], too_many.format(size, limit), "too_many_trials")
    try:
        plans = expand(study)  # every combination must be a valid run (e.g. model x dataset)
    except ValidationError as error:
        [problem] = error.errors()
        loc = [*where, *map(str, problem["loc"])]
        raise _unprocessable(loc, problem["msg"], "value_error") from None
    if len(plans) > limit:
        raise _unprocessable(
            [*where, "grid"], too_many.format(len(plans), limit), "too_many_trials"
        )
    return plans


def _check_data_roots(plans: list[TrialPlan], settings: Settings, where: list[str]) -> None:
    """Over REST a ``data.root`` must lie inside the operator's data directories."""
    allowed = [Path(os.path.normpath(p)) for p in settings.allowed_data_roots()]
    for plan in plans:
        root = plan.spec.data.root
        if root is None:
            continue
        path = Path(os.path.normpath(root))
        if path.is_absolute() and any(path.is_relative_to(a) for a in allowed):
            continue
        dirs = ", ".join(str(a) for a in allowed) or "none: set DST_DATA_DIR to allow data.root"
        raise _unprocessable(
            [*where, "data", "root"],
            f"data.root {root!r} is not inside an allowed data directory ({dirs})",
            "data_root_not_allowed",
        )


def _replay(
    session: SessionDep, services: ServicesDep, key: str, study: StudySpec, response: Response
) -> ExperimentOut | None:
    """The experiment stored under idempotency ``key`` (200), None if there is none; 409 if
    it was stored from another body."""
    existing = crud.get_by_idempotency_key(session, key)
    if existing is None:
        return None
    if existing.spec_json != study.model_dump_json():
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"Idempotency-Key {key!r} was used for another study (experiment {existing.id}); "
            f"use a new key for a different body",
        )
    response.status_code = status.HTTP_200_OK
    return experiment_out(session, services, existing)


SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ExperimentOut, "description": "a replay of an Idempotency-Key"},
    400: {"model": Problem, "description": "the body cannot be read as UTF-8 JSON"},
    409: {"model": Problem, "description": "the Idempotency-Key was used for another body"},
    413: {"model": Problem, "description": "the body is larger than DST_MAX_BODY_BYTES"},
}


@router.post("", status_code=status.HTTP_201_CREATED, responses=SUBMIT_RESPONSES)
def submit_experiment(
    study: StudySpec,
    session: SessionDep,
    services: ServicesDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="a retried submission with the same key returns the same experiment",
        ),
    ] = None,
) -> ExperimentOut:
    """Validate a study and store it, with its trials, as ``queued``; launching on Ray (and
    creating its MLflow parent run) happens in the background. Answers 201 for a new
    experiment, 200 for a replay of an idempotency key with the same body."""
    return store_study(
        study, session, services, settings, dispatcher, response, idempotency_key, ["body"]
    )


def store_study(
    study: StudySpec,
    session: Session,
    services: lifecycle.Services,
    settings: Settings,
    dispatcher: Dispatcher,
    response: Response,
    idempotency_key: str | None,
    where: list[str],
) -> ExperimentOut:
    """What a submission does once its study is valid; ``where`` is the study's place in the
    request, so a 422 names the field the client sent (``body.overrides`` for a preset)."""
    if idempotency_key is not None:
        replay = _replay(session, services, idempotency_key, study, response)
        if replay is not None:
            return replay
    plans = _plans(study, settings, where)
    _check_data_roots(plans, settings, where)
    experiment_id = uuid.uuid4().hex  # 32 of HEX_DIGITS
    try:
        experiment = crud.create_experiment(
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
        replay = _replay(session, services, idempotency_key or "", study, response)
        if replay is None:
            raise
        return replay
    dispatcher.request(experiment_id)
    return experiment_out(session, services, experiment, {TrialState.PENDING: len(plans)})


@router.get("")
def list_experiments(
    session: SessionDep,
    services: ServicesDep,
    status_filter: Annotated[ExperimentStatus | None, Query(alias="status")] = None,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
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


@router.get("/{experiment_id}", responses=NOT_FOUND)
def get_experiment(experiment_id: str, session: SessionDep, services: ServicesDep) -> ExperimentOut:
    """Status, trial counts by state and MLflow links of one experiment."""
    return experiment_out(session, services, _get(session, experiment_id))


@router.get("/{experiment_id}/spec", responses=NOT_FOUND)
def get_spec(experiment_id: str, session: SessionDep) -> dict[str, Any]:
    """The study spec as stored: what was submitted, with every default filled in and grid
    fields named by their full path. Submitting it again runs the same trials."""
    return dict(json.loads(_get(session, experiment_id).spec_json))


@router.get("/{experiment_id}/trials", responses=NOT_FOUND)
def list_trials(experiment_id: str, session: SessionDep) -> list[TrialOut]:
    """Every trial's parameters, state, current epoch and latest metrics."""
    _get(session, experiment_id)
    return [trial_out(t) for t in crud.list_trials(session, experiment_id)]


@router.get("/{experiment_id}/trials/{index}/history", responses=NOT_FOUND)
def get_trial_history(
    experiment_id: str,
    index: Annotated[int, FastApiPath(ge=0, le=2**31 - 1)],
    session: SessionDep,
) -> list[dict[str, float]]:
    """One trial's metrics per epoch, in epoch order (what its learning curves show); empty
    before its first epoch."""
    _get(session, experiment_id)
    if crud.get_trial(session, experiment_id, index) is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"experiment {experiment_id!r} has no trial {index}"
        )
    return crud.trial_histories(session, experiment_id, [index]).get(index, [])


@router.post(
    "/{experiment_id}/cancel",
    responses=NOT_FOUND | {409: {"model": Problem, "description": "the experiment has ended"}},
)
def cancel_experiment(
    experiment_id: str, session: SessionDep, services: ServicesDep, dispatcher: DispatcherDep
) -> ExperimentOut:
    """Stop a live experiment: it becomes ``cancelling`` at once, its Ray job is stopped in
    the background, and its unfinished trials become ``cancelled`` once they have stopped (then
    the experiment is ``cancelled``). Cancelling a cancelled experiment is a no-op; a finished
    one answers 409, as does one whose job ended while it was being cancelled."""
    ended = (ExperimentStatus.SUCCEEDED, ExperimentStatus.FAILED)
    if _get(session, experiment_id).status not in ended and lifecycle.cancel(
        services, experiment_id
    ):
        dispatcher.request(experiment_id)
    session.expire_all()
    experiment = _get(session, experiment_id)  # what the move found, read after it
    if experiment.status in ended:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"experiment {experiment_id} already {experiment.status}"
        )
    return experiment_out(session, services, experiment)


@router.get("/{experiment_id}/results", responses=NOT_FOUND)
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


MAX_LOG_LINES, DEFAULT_LOG_LINES = 100_000, 200
LOG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/plain": {}},
        "description": "the last lines of the log, or what follows `since`",
        "headers": {
            LOG_LENGTH_HEADER: {
                "description": "the whole log's length in characters: the `since` that reads "
                "on from the end of this answer",
                "schema": {"type": "integer"},
            }
        },
    },
    404: {"model": Problem, "description": "no such experiment, or Ray has no job for it"},
    502: {"model": Problem, "description": "Ray's Jobs API answered with an error"},
    503: {"model": Problem, "description": "the database or Ray's Jobs API is unreachable"},
}


@router.get("/{experiment_id}/log", response_class=Response, responses=LOG_RESPONSES)
def get_log(
    experiment_id: str,
    session: SessionDep,
    services: ServicesDep,
    tail: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_LOG_LINES,
            description="at most this many lines, from the end (default: 200; with `since`, "
            "all that follows it)",
        ),
    ] = None,
    since: Annotated[
        int | None,
        Query(
            ge=0,
            le=2**63 - 1,
            description="characters already read (the X-Log-Length of an earlier answer): "
            "only what the log has gained since; the whole log if it is now shorter (a new job)",
        ),
    ] = None,
) -> Response:
    """The last ``tail`` lines of the experiment's job driver output on Ray: what the driver
    and Tune say, such as trials that wait for resources no node has, or why a study failed.
    With ``since``, what was added after an earlier answer (how ``dst logs --follow`` reads
    on). Asked of Ray at each call, within the service's call timeout (503 if Ray does not
    answer)."""
    experiment = _get(session, experiment_id)
    queued = experiment.status == ExperimentStatus.QUEUED
    session.close()  # no database connection is held while Ray answers
    try:
        text = services.executor.logs(experiment_id)
    except LookupError:
        never = "it was never submitted, or Ray no longer keeps its job"
        why = "it has not been submitted yet" if queued else never
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} has no log on Ray: {why}"
        ) from None
    except RuntimeError as error:  # the Jobs API answered, with an error
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY, f"Ray's Jobs API answered with an error: {error}"
        ) from None
    except OSError as error:  # unreachable, refused, timed out (requests' errors included)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"Ray's Jobs API did not answer ({type(error).__name__}); retry later",
            headers={"Retry-After": "5"},
        ) from None
    part = log_part(text, tail, since)
    return PlainTextResponse(part, headers={LOG_LENGTH_HEADER: str(len(text))})


def log_part(text: str, tail: int | None, since: int | None) -> str:
    """What a log read answers: the text after its first ``since`` characters (all of it if
    the text is shorter: a new log), cut to its last ``tail`` lines (200 without either)."""
    if since is not None and since <= len(text):
        text = text[since:]
    if tail is not None or since is None:
        text = last_lines(text, tail or DEFAULT_LOG_LINES)
    return text


def last_lines(text: str, n: int) -> str:
    """The last ``n`` lines of ``text`` (split at line feeds only, as ``tail -n`` does: a
    progress bar's carriage returns stay inside their line)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the text ends with a line feed: no empty line after it
        return "\n".join(lines[-n - 1 :])
    return "\n".join(lines[-n:])


FIGURE_TYPES = {"png": "image/png", "svg": "image/svg+xml"}
NOTHING_FINISHED: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "no trial has succeeded (yet): nothing to analyse"},
}


def _analysis(
    session: SessionDep, settings: Settings, analyses: AnalysisCache, experiment_id: str
) -> StudyAnalysis:
    experiment = _get(session, experiment_id)
    masks = experiment_masks_dir(settings.storage_path, experiment_id)
    analysis = analyses.get(
        experiment_id,
        crud.trials_version(session, experiment_id),
        lambda: crud.study_analysis(session, experiment_id, masks),
    )
    if analysis.n_finished == 0:
        status_ = ExperimentStatus(experiment.status)
        later = (
            f"it ended {status_.value} without one: nothing to analyse"
            if status_.terminal
            else "retry later"
        )
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"no trial of experiment {experiment_id!r} has succeeded yet; {later}",
        )
    return analysis


def _figure_refs(experiment_id: str, analysis: StudyAnalysis) -> list[FigureRef]:
    base = f"/experiments/{experiment_id}/figures"
    return [
        FigureRef(name=n, png=f"{base}/{n}.png", svg=f"{base}/{n}.svg")
        for n in figure_names(analysis)
    ]


@router.get("/{experiment_id}/analysis", responses=NOT_FOUND | NOTHING_FINISHED)
def get_analysis(
    experiment_id: str, session: SessionDep, settings: SettingsDep, analyses: AnalysesDep
) -> AnalysisOut:
    """The paper's answers for this study over its succeeded trials: criteria rankings with
    Friedman's test and the Nemenyi critical distance (Figure 3: all densities, ≤ 0.2, > 0.2)
    and the figures it has data for; ``partial`` while trials are still running."""
    analysis = _analysis(session, settings, analyses, experiment_id)
    experiment = _get(session, experiment_id)
    return AnalysisOut(
        experiment_id=experiment_id,
        status=experiment.status,
        figures=_figure_refs(experiment_id, analysis),
        **{k: v for k, v in analysis.to_dict().items()},
    )


@router.get("/{experiment_id}/figures", responses=NOT_FOUND | NOTHING_FINISHED)
def list_figures(
    experiment_id: str, session: SessionDep, settings: SettingsDep, analyses: AnalysesDep
) -> list[FigureRef]:
    """The figures this study has the data for (drawn over its succeeded trials)."""
    return _figure_refs(experiment_id, _analysis(session, settings, analyses, experiment_id))


@router.get(
    "/{experiment_id}/figures/{filename}",
    response_class=Response,
    responses=NOT_FOUND
    | NOTHING_FINISHED
    | {
        200: {
            "content": {t: {} for t in FIGURE_TYPES.values()},
            "description": "the figure",
        }
    },
)
def get_figure(
    experiment_id: str,
    filename: str,
    session: SessionDep,
    settings: SettingsDep,
    analyses: AnalysesDep,
    dpi: Annotated[int, Query(ge=50, le=300, description="a PNG's resolution")] = PNG_DPI,
) -> Response:
    """One figure as ``NAME.png`` or ``NAME.svg`` (names from the figure list)."""
    name, _, kind = filename.rpartition(".")
    if kind not in FIGURE_TYPES:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no figure {filename!r}: ask for NAME.png or NAME.svg"
        )
    analysis = _analysis(session, settings, analyses, experiment_id)
    if name not in figure_names(analysis):
        known = ", ".join(figure_names(analysis)) or "none"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no figure {name!r} for this study; it has: {known}"
        )
    image = render(build_figure(analysis, name), kind, dpi)
    return Response(content=image, media_type=FIGURE_TYPES[kind])
