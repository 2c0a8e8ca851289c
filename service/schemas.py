"""Response bodies and headers of the REST API (requests are :class:`service.study.StudySpec`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.results import ResultRow
from service.states import ExperimentStatus, TrialState

LOG_LENGTH_HEADER = "X-Log-Length"  # the whole log's length in characters: where to read on from


class MlflowLinks(BaseModel):
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    experiment_url: str | None = None
    parent_run_url: str | None = None
    parent_closed_at: datetime | None = Field(
        None,
        description="when the parent run was closed with the study's results, analysis and "
        "figures (a few seconds after the experiment ends; later if MLflow was down), or when "
        "MLflow refused to close it for good (a parent run deleted in the MLflow UI)",
    )


class ExperimentOut(BaseModel):
    id: str
    name: str
    status: ExperimentStatus
    n_trials: int
    trial_counts: dict[str, int] = Field(description="trials by state")
    tags: dict[str, str]
    error: str | None
    notice: str | None = Field(
        description="what the experiment waits for while it waits, e.g. trials that no node "
        "of the Ray cluster can hold since a node left (its job driver's word; None otherwise)"
    )
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    mlflow: MlflowLinks


class ExperimentPage(BaseModel):
    items: list[ExperimentOut]
    total: int
    offset: int
    limit: int


class TrialOut(BaseModel):
    index: int
    label: str
    state: TrialState
    epoch: int
    epochs: int | None
    params: dict[str, Any] = Field(description="the trial's run spec, flattened")
    metrics: dict[str, float] | None = Field(description="latest epoch's metrics")
    mlflow_run_id: str | None
    error: str | None
    resumed_from_epoch: int | None = Field(
        description="the epoch the trial last resumed from after a failure (None: never)"
    )
    node: str | None = Field(
        description="the hosts (Ray nodes) the trial's training processes ran on when it last "
        "started, comma-separated in rank order: after a worker is lost, where it resumed; "
        "None until the trial says"
    )
    gpus: str | None = Field(
        description="the ids of the GPUs Ray gave the trial when it last started, one per "
        "process in rank order ('host:id' when its processes span several hosts); trials "
        "sharing a GPU show the same id; None: no GPU"
    )
    started_at: datetime | None
    finished_at: datetime | None


class ResultsOut(BaseModel):
    experiment_id: str
    status: ExperimentStatus
    complete: bool = Field(description="every trial finished")
    group_by: list[str] = Field(
        description="the fields the study varies besides the seed: one row per combination"
    )
    rows: list[ResultRow]


class FigureRef(BaseModel):
    name: str
    png: str = Field(description="path of the PNG image")
    svg: str = Field(description="path of the SVG image")


class AnalysisOut(BaseModel):
    """The paper's analysis of a study, over its succeeded trials."""

    experiment_id: str
    status: ExperimentStatus
    partial: bool = Field(description="trials are still unfinished: computed over those done")
    n_finished: int
    group_by: list[str]
    ranked_within: list[str] = Field(
        description="fields that form one ranking group (besides the criterion and seed)"
    )
    rankings: dict[str, dict[str, Any]] = Field(
        description="Figure 3 by density split (all, low: ≤ 0.2, high: > 0.2): average ranks, "
        "Friedman test, Nemenyi critical distance and p-values, cliques"
    )
    skipped: dict[str, str] = Field(description="why a split has no ranking")
    structure: list[dict[str, Any]] = Field(
        description="Figure 6b per setting: Jaccard index of the end masks between criteria "
        "and with the initial mask (row init), mean and std over seeds, and J_init; Figure 19 "
        "(consensus): the share of weights every criterion keeps and every one removes"
    )
    removal: list[dict[str, Any]] = Field(
        description="Figure 6a per setting, from runs with analysis.removal_sets: Jaccard "
        "index of the sets each criterion would prune at the first update, mean/std over "
        "seeds, and J_r (random removal sets from the initial masks of different seeds)"
    )
    over_time: list[dict[str, Any]] = Field(
        description="Figure 18 per setting, from runs with analysis.removal_sets: for each "
        "criterion trained with and each other criterion, the removal-set Jaccard index "
        "against the training step (mean/std over seeds; null where an update removed "
        "nothing)"
    )
    curves: list[dict[str, Any]] = Field(
        description="Figures 2 and 4 per setting: per criterion and baseline, validation "
        "accuracy, training loss and loss gap per epoch (mean/std over seeds), final test "
        "accuracy"
    )
    itop: list[dict[str, Any]] = Field(
        description="final ITOP ratio per configuration, mean/std over seeds (Figure 11)"
    )
    figures: list[FigureRef]


class Problem(BaseModel):
    """An error answer (401, 404, 409, 413)."""

    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    database: bool
    ray: bool
    mlflow: bool
