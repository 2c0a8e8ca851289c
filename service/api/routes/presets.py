"""The paper's experiments by name: list them, submit one with overrides."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.deps import DispatcherDep, ServicesDep, SessionDep, SettingsDep
from service.api.routes import experiments
from service.api.routes.experiments import SUBMIT_RESPONSES, store_study
from service.presets import preset_study, presets
from service.schemas import ExperimentOut
from service.study import StudySpec

router = APIRouter(prefix="/presets", tags=["presets"], responses=experiments.router.responses)
# the names are resolved here, at the boundary: an unknown one is a 422 listing the known ones
PresetName = Enum("PresetName", {name: name for name in presets()}, type=str)  # type: ignore[misc]


class PresetOut(BaseModel):
    name: str
    description: str
    n_grid: int = Field(description="DST runs of its grid (baselines come on top)")
    study: dict[str, Any] = Field(description="the study it submits, before overrides")


class PresetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is a 422, not the bare preset

    overrides: dict[str, Any] = Field(
        default_factory=dict,
        max_length=100,
        description="dotted field -> value, e.g. {'grid.seed': [0, 1], 'training.epochs': 5}",
    )


@router.get("")
def list_presets() -> list[PresetOut]:
    """Every preset: the paper's figure it reproduces and the study it submits."""
    out = []
    for preset in presets().values():
        grid = preset.study.get("grid", {})
        n_grid = 1
        for values in grid.values():
            n_grid *= len(values)
        out.append(PresetOut(name=preset.name, description=preset.description, n_grid=n_grid,
                             study=preset.study))  # fmt: skip
    return out


@router.post("/{name}/experiments", status_code=status.HTTP_201_CREATED, responses=SUBMIT_RESPONSES)
def submit_preset(
    name: PresetName,
    request: Annotated[PresetRequest | None, Body()] = None,
    *,
    session: SessionDep,
    services: ServicesDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> ExperimentOut:
    """Submit preset ``name`` as a study, with ``overrides`` applied (no body: as it is);
    validated like any study (422 names the field, under ``body.overrides``)."""
    overrides = request.overrides if request is not None else {}
    try:
        data = preset_study(name.value, overrides)
        study = StudySpec.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", "overrides", *e["loc"])} for e in error.errors()]
        ) from None
    except ValueError as error:
        raise RequestValidationError(
            [{"loc": ("body", "overrides"), "msg": str(error), "type": "value_error"}]
        ) from None
    where = ["body", "overrides"]
    return store_study(
        study, session, services, settings, dispatcher, response, idempotency_key, where
    )
