"""The study spec: a run spec plus a grid, expanded into trials (one run spec each).

A study is what a researcher submits: the base run (model, dataset, training, sparsity, seed,
device), a ``grid`` of lists over run fields expanded as a cartesian product, optional dense
and static baselines added once per density and seed (as in the paper's figures), and the
resources each trial gets on the cluster.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dst.spec import MAX_NAME, RunSpec, SparsitySpec, field_error, set_path

# Sparsity fields that only matter for DST; baselines reset them so duplicates collapse.
DST_ONLY_FIELDS = (
    "criterion",
    "growth",
    "prune_fraction",
    "schedule",
    "schedule_interval",
    "schedule_factor",
    "update_period",
    "stop_step",
    "scope",
    "mest_lambda",
)
RUN_FIELDS = ("model", "dataset", "seed", "device")
SECTIONS = {"training", "sparsity", "data"}
MAX_GRID = 100_000  # hard cap, counted before expansion; the API's DST_MAX_TRIALS is lower
# every grid run plus its static, dense and dense + dropout baselines: trial indices stay below
# 10**6, which the name "<study name>/<index>" of a trial's run spec has room for
MAX_TRIALS = 4 * MAX_GRID
MAX_GRID_VALUES = 10_000  # values of one grid field
MAX_TAGS = 50


def grid_fields() -> list[str]:
    """Every field path a grid may range over (``seed``, ``sparsity.density``, ...)."""
    fields = list(RUN_FIELDS)
    for section in sorted(SECTIONS):
        model = RunSpec.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        fields += [f"{section}.{name}" for name in model.model_fields]
    return fields


def canonical_path(key: str) -> str:
    """``criterion`` -> ``sparsity.criterion``: sparsity fields may be named without section."""
    if "." not in key and key in SparsitySpec.model_fields:
        return f"sparsity.{key}"
    return key


class Resources(BaseModel):
    """What each trial gets on the Ray cluster.

    A one-worker trial is one Ray task with ``cpus_per_trial`` CPUs and ``gpus_per_trial``
    GPUs (a fraction below 1 lets several small trials share a GPU). A multi-worker trial is a
    Ray Train DDP trainer: each of its workers gets an equal share of the CPUs and exactly one
    GPU when it has GPUs (NCCL gives each rank its own device).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    cpus_per_trial: float = Field(1.0, gt=0, le=1024, description="fractional CPUs allowed")
    gpus_per_trial: float = Field(
        0.0, ge=0, le=1024, description="fractional (< 1) GPUs share a GPU between trials"
    )
    workers_per_trial: int = Field(1, ge=1, le=1024, description=">1 runs a Ray Train DDP trainer")
    max_concurrent_trials: int | None = Field(None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _check_gpus(self) -> Resources:
        gpus, workers = self.gpus_per_trial, self.workers_per_trial
        if workers == 1 and gpus > 1:
            raise ValueError(
                f"resources.gpus_per_trial = {gpus:g}: a one-worker trial uses one GPU (or a "
                f"fraction of one); to train on {gpus:g} GPUs set resources.workers_per_trial "
                f"to {gpus:g}"
            )
        if workers > 1 and gpus not in (0, workers):
            raise ValueError(
                f"resources.gpus_per_trial = {gpus:g} with workers_per_trial = {workers}: a "
                f"multi-worker trial has one GPU per worker, so use {workers} (or 0 for CPU "
                f"workers)"
            )
        return self

    def bundles(self) -> list[dict[str, float]]:
        """What one trial asks Ray for, one dict per process; each must fit on one node."""
        if self.workers_per_trial == 1:
            return [{"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial}]
        return [TRAINER_PROCESS] + [self.per_worker()] * self.workers_per_trial

    def per_worker(self) -> dict[str, float]:
        """One DDP worker's share of a multi-worker trial."""
        share = {"CPU": max(self.cpus_per_trial / self.workers_per_trial, 0.01)}
        if self.gpus_per_trial > 0:
            share["GPU"] = 1.0
        return share


# the Tune process that drives a multi-worker trial's TorchTrainer (it only waits)
TRAINER_PROCESS = {"CPU": 0.01, "GPU": 0.0}


class Baselines(BaseModel):
    """Baselines added once per density and seed (static) or per seed (dense, dense + dropout).

    Each baseline copies the study's DST runs with the DST-only fields reset, so it shares
    their model, dataset, training settings and seeds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dense: bool = False
    static: bool = False
    dense_dropout: StrictFloat | None = Field(
        None,
        gt=0,
        lt=1,
        description="add a dense run per seed trained with this dropout rate (the dense + "
        "dropout baseline of Figure 4 uses 0.05; MLP models only)",
    )


RankingMetric = Literal["test_acc", "test_acc_at_best_val"]


class Ranking(BaseModel):
    """What the analysis ranks the criteria by (Section 5.2, Figure 3).

    The paper ranks by test accuracy without saying of which epoch; its code reports the test
    accuracy of the epoch with the best validation accuracy. The default is the last epoch's,
    the results table's headline; ``test_acc_at_best_val`` ranks as the paper's code does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: RankingMetric = Field(
        "test_acc",
        description="test_acc: the last epoch's test accuracy; test_acc_at_best_val: the test "
        "accuracy of the epoch with the best validation accuracy (the paper's code)",
    )


def stored_ranking(spec_json: str) -> Ranking:
    """The ranking options of a stored study spec, read without validating its grid again
    (a spec stored before the study had the option ranks by the default)."""
    return Ranking.model_validate(json.loads(spec_json).get("ranking") or {})


RESERVED_TAG_PREFIXES = ("mlflow.", "dst.")  # the tracking server's and the service's tags
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=250)]
TagValue = Annotated[str, StringConstraints(max_length=1000)]
GridValues = Annotated[list[Any], Field(max_length=MAX_GRID_VALUES)]


class StudySpec(RunSpec):
    """A run spec plus grid, baselines, tags and resources.

    Validating a study checks every field and every grid value, and counts the grid's trials
    without expanding it; :func:`expand` then builds (and checks) each combination.
    """

    name: str = Field(..., min_length=1, max_length=MAX_NAME)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=MAX_TAGS)
    resources: Resources = Resources()
    baselines: Baselines = Baselines()
    ranking: Ranking = Ranking()
    grid: dict[str, GridValues] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        reserved = [key for key in tags if key.startswith(RESERVED_TAG_PREFIXES)]
        if reserved:
            raise ValueError(
                f"tag {reserved[0]!r}: keys starting with "
                f"{' or '.join(repr(p) for p in RESERVED_TAG_PREFIXES)} are MLflow's and DST "
                f"Lab's own; choose another key"
            )
        return tags

    @model_validator(mode="before")
    @classmethod
    def _check_text(cls, data: Any) -> Any:
        """Every string, keys included, must be text that can be stored and sent: valid
        Unicode (a lone surrogate cannot be encoded) without NUL (PostgreSQL's text refuses
        it). The error shows the path and the text escaped, so it can itself be sent."""
        for path, text in _strings(data, ()):
            problem = _unstorable(text)
            if problem is not None:
                where = ".".join(_escaped(str(p)) for p in path) or "spec"
                raise ValueError(f"{where}: {text!r} {problem}")
        return data

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        listed = math.prod(len(_distinct_json(values)) for values in grid.values())
        if listed > MAX_GRID:  # before any value is checked: that costs per value
            raise ValueError(f"the grid expands to {listed} trials; at most {MAX_GRID} are allowed")
        allowed = grid_fields()
        base = {k: v for k, v in info.data.items() if k in RunSpec.model_fields}
        base_json = _dump(base)
        base_valid = _is_valid_run(base_json)  # else the base's own errors say why
        out: dict[str, list[Any]] = {}
        for key, values in grid.items():
            path = canonical_path(key)
            if path not in allowed:
                raise ValueError(
                    f"unknown grid field {key!r}; allowed fields: {', '.join(allowed)}"
                )
            if path in out:
                raise ValueError(f"grid field {path!r} is given twice")
            if not values:
                raise ValueError(f"grid field {key!r} has an empty list of values")
            out[path] = _distinct_values(base_json, path, values) if base_valid else values
        return out

    @model_validator(mode="after")
    def _check_combinations(self) -> StudySpec:
        """Checks across fields; each error names the field to change."""
        gpus = self.resources.gpus_per_trial
        devices = [str(d) for d in self.grid.get("device", [self.device])]
        if any(d.startswith("cuda") for d in devices) and gpus == 0:
            raise field_error(
                ("resources", "gpus_per_trial"),
                "device 'cuda' needs resources.gpus_per_trial > 0 (else Ray gives the trial "
                "no GPU)",
                gpus,
            )
        if gpus == 0 and (option := self._cuda_only_option()):
            raise field_error(
                ("resources", "gpus_per_trial"),
                f"{option} runs on CUDA only, and with resources.gpus_per_trial = 0 Ray gives "
                f"each trial no GPU (device 'auto' is then the CPU): set gpus_per_trial > 0",
                gpus,
            )
        numbered = [d for d in devices if d.startswith("cuda:") and d != "cuda:0"]
        if numbered and gpus > 0:
            raise field_error(
                self._device_loc(),
                f"device {numbered[0]!r}: Ray shows a trial only the GPUs it was given, "
                f"starting at cuda:0, so use 'cuda' (or 'auto')",
                numbered[0],
            )
        smallest, workers = self._smallest_batch(), self.resources.workers_per_trial
        if smallest < workers:
            raise field_error(
                ("resources", "workers_per_trial"),
                f"training.batch_size = {smallest} with resources.workers_per_trial = {workers}: "
                f"the global batch is split between the workers, so it needs at least {workers}",
                workers,
            )
        if "cpu" in devices and gpus > 0:
            raise field_error(
                self._device_loc(),
                f"resources.gpus_per_trial = {gpus:g} but device is 'cpu', which would leave "
                f"the trial's GPU idle: set device to 'cuda' or 'auto'",
                "cpu",
            )
        return self

    def _device_loc(self) -> tuple[str, ...]:
        """Where the study sets its trials' device: the grid's list, or the spec's field."""
        return ("grid", "device") if "device" in self.grid else ("device",)

    def _smallest_batch(self) -> int:
        """The smallest global batch any trial of the study trains with (a model's Appendix
        A.2 default where the spec sets none)."""
        from dst.models import get_model

        sizes = self.grid.get("training.batch_size", [self.training.batch_size])
        found = [int(size) for size in sizes if size is not None]
        if None in sizes:
            models = self.grid.get("model", [self.model])
            found += [get_model(str(model)).defaults.batch_size for model in models]
        return min(found)

    def _cuda_only_option(self) -> str | None:
        """The first CUDA-only training option some trial of the study asks for, if any."""
        kernels = self.grid.get("training.optimizer_kernel", [self.training.optimizer_kernel])
        if "fused" in kernels:
            return "training.optimizer_kernel 'fused'"
        syncs = self.grid.get("training.sync_batchnorm", [self.training.sync_batchnorm])
        if any(TypeAdapter(bool).validate_python(v) for v in syncs):
            return "training.sync_batchnorm"
        return None

    def grid_size(self) -> int:
        """The number of grid combinations (DST runs before baselines), without expanding;
        a value repeated in a grid list was dropped on validation, so it is not counted."""
        return math.prod(len(v) for v in self.grid.values())

    def base_run(self) -> dict[str, Any]:
        """The run-spec part of this study as plain JSON data."""
        return _dump({k: getattr(self, k) for k in RunSpec.model_fields})


def _strings(data: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string in plain JSON data (keys included), with its path."""
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str):
                yield (*path, key), key
            yield from _strings(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _strings(value, (*path, i))


def _unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored or sent, or None if it can."""
    if "\x00" in text:
        return "contains a NUL character (\\x00), which cannot be stored; remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate); send UTF-8 text"
    return None


def _escaped(text: str) -> str:
    """``text`` with unprintable characters (a lone surrogate, NUL) escaped as Python writes
    them, so an error message that quotes a key can be encoded and sent."""
    return repr(text)[1:-1]


def _dump(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in fields.items()
    }


def _distinct_json(values: list[Any]) -> set[str]:
    """``values`` without repeats as written (``0`` and ``0.0`` stay two): a cheap upper bound
    on the distinct runs they make, taken before any value is checked."""
    return {json.dumps(v, sort_keys=True, default=str) for v in values}


def _distinct_values(base: dict[str, Any], path: str, values: list[Any]) -> list[Any]:
    """Grid field ``path``'s ``values``, each checked on the base run, without repeats (the
    first kept, in order): a value that makes the same run as an earlier one (``0`` twice, or
    ``0`` and ``0.0`` as a seed) adds no trial, so the grid's size counts distinct values."""
    by_run: dict[str, Any] = {}
    for i, value in enumerate(values):
        by_run.setdefault(_check_value(base, path, i, value).model_dump_json(), value)
    return list(by_run.values())


def _check_value(base: dict[str, Any], path: str, index: int, value: Any) -> RunSpec:
    """The base run with grid field ``path`` set to ``value``; ValueError naming the grid
    entry if that is not a valid run."""
    data = json.loads(json.dumps(base))
    set_path(data, path, value)
    try:
        return RunSpec.model_validate(data)
    except ValidationError as error:
        raise ValueError(
            f"grid.{path}[{index}] = {value!r} is invalid: {_problems(error)}"
        ) from None


def _is_valid_run(data: dict[str, Any]) -> bool:
    try:
        RunSpec.model_validate(data)
    except ValidationError:
        return False
    return True


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
    )


@dataclass(frozen=True)
class TrialPlan:
    """One trial of a study: its index, a short label and its full run spec."""

    index: int
    label: str
    spec: RunSpec


LINEAR_ONLY_FIELDS = ("schedule_interval", "schedule_factor")


def normalize(spec: RunSpec) -> RunSpec:
    """Reset fields that do not affect a run of its mode (so equivalent runs collapse)."""
    defaults = SparsitySpec()
    if spec.sparsity.mode == "dst":
        if spec.sparsity.schedule == "linear":
            return spec
        unused = {f: getattr(defaults, f) for f in LINEAR_ONLY_FIELDS}
        return spec.model_copy(update={"sparsity": spec.sparsity.model_copy(update=unused)})
    changes: dict[str, Any] = {f: getattr(defaults, f) for f in DST_ONLY_FIELDS}
    if spec.sparsity.mode == "dense":
        changes |= {"density": 1.0, "init": None}
    return spec.model_copy(update={"sparsity": spec.sparsity.model_copy(update=changes)})


def _label(spec: RunSpec) -> str:
    s = spec.sparsity
    if s.mode == "dense":
        dropout = f" dropout={spec.training.dropout:g}" if spec.training.dropout else ""
        return f"dense{dropout} seed={spec.seed}"
    if s.mode == "static":
        return f"static density={s.density:g} seed={spec.seed}"
    return f"{s.criterion}/{s.growth} density={s.density:g} Δt={s.update_period} seed={spec.seed}"


def expand(study: StudySpec) -> list[TrialPlan]:
    """The study's trials: the grid's cartesian product, then baselines, duplicates removed.
    A combination or baseline that is not a valid run is a ``ValidationError`` at ``grid``
    or at ``baselines.<mode>``."""
    base = study.base_run()
    keys = list(study.grid)
    runs: list[RunSpec] = []
    for combo in itertools.product(*(study.grid[k] for k in keys)):
        data = json.loads(json.dumps(base))
        for key, value in zip(keys, combo, strict=True):
            set_path(data, key, value)
        try:
            runs.append(normalize(RunSpec.model_validate(data)))
        except ValidationError as error:
            chosen = dict(zip(keys, combo, strict=True))
            message = f"grid combination {chosen} is invalid: {_problems(error)}"
            raise field_error(("grid",), message, chosen) from None
    dst_runs = [r for r in runs if r.sparsity.mode == "dst"]
    b = study.baselines
    if b.static:
        runs += [_as_mode(r, "static") for r in dst_runs]
    if b.dense:
        runs += [_as_mode(r, "dense") for r in dst_runs]
    if b.dense_dropout is not None:
        runs += [_as_mode(r, "dense", dropout=b.dense_dropout) for r in dst_runs]
    unique: dict[str, RunSpec] = {}
    for run in runs:
        unique.setdefault(run.model_dump_json(), run)
    return [
        TrialPlan(i, _label(spec), spec.model_copy(update={"name": f"{study.name}/{i}"}))
        for i, spec in enumerate(unique.values())
    ]


def _as_mode(spec: RunSpec, mode: str, dropout: float = 0.0) -> RunSpec:
    """``spec`` as a baseline run of ``mode`` (with ``dropout`` for dense + dropout),
    validated like any run so a baseline the model cannot run is refused up front."""
    data = spec.model_dump(mode="json")
    data["sparsity"]["mode"], data["training"]["dropout"] = mode, dropout
    field = "dense_dropout" if dropout else mode
    try:
        return normalize(RunSpec.model_validate(data))
    except ValidationError as error:
        message = f"the baseline of the {spec.model} runs is invalid: {_problems(error)}"
        raise field_error(("baselines", field), f"baselines.{field}: {message}", data) from None
