"""The run spec: everything that defines one training run, validated before anything runs.

Names are checked against the registries (the same ones the REST API's enums come from), so
an unknown model, dataset, criterion, growth, init or schedule is rejected with the list of
valid names, and an incompatible model/dataset pair is rejected before data is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from dst.criteria import CRITERIA
from dst.datasets import DATASETS, get_dataset
from dst.distributions import DISTRIBUTIONS
from dst.growth import GROWTH
from dst.models import MODELS, ModelOptions, check_options, get_model
from dst.schedules import SCHEDULES


def _names(registry_names: list[str]) -> Any:
    """A ``Literal`` type over a registry's names, so pydantic lists them on bad input."""
    return Literal[tuple(registry_names)]


if TYPE_CHECKING:  # static checkers see plain strings; pydantic sees the registries' names
    ModelName: TypeAlias = str
    DatasetName: TypeAlias = str
    CriterionName: TypeAlias = str
    GrowthName: TypeAlias = str
    InitName: TypeAlias = str
    ScheduleName: TypeAlias = str
else:
    ModelName = _names(MODELS.names())
    DatasetName = _names(DATASETS.names())
    CriterionName = _names(CRITERIA.names())
    GrowthName = _names(GROWTH.names())
    InitName = _names(DISTRIBUTIONS.names())
    ScheduleName = _names(SCHEDULES.names())
Mode = Literal["dense", "static", "dst"]
# how the masked SGD update runs (:mod:`dst.kernels`)
OptimizerKernel = Literal["auto", "native", "fused", "compiled", "foreach", "eager"]
DataPath = Literal["loader", "tensor"]
Precision = Literal["fp32", "bf16"]
Scope = Literal["local", "global"]

_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d{1,3})?)$")


MAX_STEPS = 2**31 - 1  # step counts fit a 32-bit integer everywhere (databases, C kernels)
MAX_SEED = 2**31 - 1  # numpy seeds below 2**32; seed + 1 seeds the mask generator
MAX_NAME = 200  # characters of the name a person gives a run or a study
# A study names each of its trials "<study name>/<index>" (fewer than 10**6 trials, see
# service.study.MAX_TRIALS): a run's name has room for that suffix after a study's full name.
MAX_RUN_NAME = MAX_NAME + len("/999999")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainingSpec(_Strict):
    """Optimization settings (Appendix A.2). ``None`` takes the model's A.2 default."""

    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int | None = Field(None, ge=1, le=1_048_576)
    lr: float | None = Field(None, gt=0, le=1e6)
    weight_decay: float | None = Field(None, ge=0, le=1e6)
    lr_decay: float | None = Field(None, gt=0, le=1, description="LR factor at 50% and 75%")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    max_steps_per_epoch: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="cap on training batches per epoch (quick runs)"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="dropout rate on the input and hidden layers of the MLPs (Figure 4 uses "
        "0.05 for its dense + dropout baseline); 0 = no dropout",
    )
    eval_batch_size: int = Field(1024, ge=1, le=1_048_576)
    data_path: DataPath = Field(
        "loader",
        description="loader: per-sample transforms in a DataLoader; tensor: the whole split "
        "as one tensor on the device, batches augmented with tensor ops (in-memory datasets; "
        "same augmentation distribution, another random stream)",
    )
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes")
    pin_memory: bool | None = Field(
        None, description="page-locked loader batches (fast host-to-GPU copies); None: on CUDA"
    )
    precision: Precision = Field(
        "fp32",
        description="fp32, or bf16: forward pass and loss under bfloat16 autocast; weights, "
        "gradients, masks, criteria and the optimizer stay float32 (changes numerics)",
    )
    channels_last: bool = Field(
        False,
        description="image batches in channels-last layout, so convolutions run NHWC (faster "
        "on tensor cores); weights, masks and optimizer state keep the standard layout",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model (the first steps compile; changes numerics slightly)",
    )
    sync_batchnorm: bool = Field(
        False,
        description="trials of several workers on GPUs: BatchNorm normalizes over the global "
        "batch (SyncBatchNorm), as one worker would, at an all-reduce per BatchNorm layer per "
        "step; off: over each worker's share (plain DDP). CUDA only (PyTorch's SyncBatchNorm)",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="also checkpoint every N optimizer steps inside an epoch (long ImageNet "
        "epochs); None: at the end of each epoch only",
    )
    optimizer_kernel: OptimizerKernel = Field(
        "auto",
        description="how the masked SGD update runs: native (a C loop built for this CPU; "
        "float32 on the CPU), fused (one Triton kernel over all masked tensors; CUDA), compiled "
        "(torch.compile: C++ on the CPU, Triton on CUDA, a kernel per tensor), foreach (two "
        "multi-tensor passes, no compiler), eager (op by op, no compiler needed), auto (the "
        "fastest of these that works here)",
    )

    @model_validator(mode="after")
    def _check_nesterov(self) -> TrainingSpec:
        if self.nesterov and self.momentum == 0:
            raise field_error(
                ("nesterov",), "nesterov needs momentum > 0: set training.nesterov to false", True
            )
        return self


class SparsitySpec(_Strict):
    """How the model is sparsified (Sections 3-5)."""

    mode: Mode = "dst"
    density: float = Field(0.1, gt=0, le=1, description="overall density D of prunable weights")
    init: InitName | None = Field(None, description="None: ER for MLPs, ERK for conv nets")
    criterion: CriterionName = "magnitude"
    growth: GrowthName = "random"
    prune_fraction: float = Field(0.5, gt=0, lt=1, description="initial prune fraction ρ")
    schedule: ScheduleName = "cosine"
    schedule_interval: int = Field(
        600,
        ge=1,
        le=MAX_STEPS,
        description="linear schedule: steps between multiplications (Appendix J)",
    )
    schedule_factor: float = Field(
        0.99, gt=0, le=1, description="linear schedule: factor applied every interval (App. J)"
    )
    update_period: int = Field(
        800, ge=1, le=MAX_STEPS, description="Δt, optimizer steps between updates"
    )
    stop_step: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="T; None: the end of training"
    )
    scope: Scope = "local"
    mest_lambda: float = Field(1.0, ge=0, le=1e6, description="λ of the MEST criterion")


class AnalysisSpec(_Strict):
    """Extra measurements a run can make while it trains."""

    removal_sets: bool = Field(
        False,
        description="at every topology update, the Jaccard index of the set this run prunes "
        "with the set every other criterion would prune from the same state (Section 5.4, "
        "Figures 6a and 18); one extra scoring per criterion per update",
    )


class DataSpec(_Strict):
    """Where the data lives and whether it may be downloaded."""

    root: str | None = Field(
        None, max_length=4096, description="None: $DST_DATA_DIR or ~/.cache/dst/data"
    )
    download: bool = True
    augment: bool = True


def field_error(loc: tuple[str, ...], message: str, value: Any) -> ValidationError:
    """A validation error of the field at ``loc`` (a check across fields, in a model
    validator, names the field to change, so a 422 points at it and not at the whole body)."""
    detail = InitErrorDetails(
        type=PydanticCustomError("value_error", message), loc=loc, input=value
    )  # fmt: skip
    return ValidationError.from_exception_data("spec", [detail])


class RunSpec(_Strict):
    """One training run."""

    name: str | None = Field(
        None,
        max_length=MAX_RUN_NAME,
        description="a study's trial is named '<study name>/<index>'",
    )
    model: ModelName
    dataset: DatasetName
    training: TrainingSpec = TrainingSpec()
    sparsity: SparsitySpec = SparsitySpec()
    data: DataSpec = DataSpec()
    analysis: AnalysisSpec = AnalysisSpec()
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("cpu", max_length=16, description="cpu, cuda, cuda:N, mps or auto")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_kernel_device(self) -> RunSpec:
        kernel = self.training.optimizer_kernel
        if kernel == "native" and self.device != "cpu":
            raise field_error(
                ("training", "optimizer_kernel"),
                f"training.optimizer_kernel 'native' runs on the CPU only, but device is "
                f"{self.device!r}: use 'auto' or 'compiled'",
                kernel,
            )
        if self.training.sync_batchnorm and not self.device.startswith(("cuda", "auto")):
            raise field_error(
                ("training", "sync_batchnorm"),
                f"training.sync_batchnorm runs on CUDA only (PyTorch's SyncBatchNorm), but "
                f"device is {self.device!r}: set it to false, or use 'cuda' or 'auto'",
                True,
            )
        if kernel == "fused" and not self.device.startswith(("cuda", "auto")):
            raise field_error(
                ("training", "optimizer_kernel"),
                f"training.optimizer_kernel 'fused' runs on CUDA only, but device is "
                f"{self.device!r}: use 'auto' or 'compiled'",
                kernel,
            )
        return self

    @model_validator(mode="after")
    def _check_compatible(self) -> RunSpec:
        try:
            get_model(self.model).check(get_dataset(self.dataset).info)
        except ValueError as error:  # named at the dataset: what a grid usually varies
            raise field_error(("dataset",), str(error), self.dataset) from None
        if self.training.channels_last and get_dataset(self.dataset).info.kind != "image":
            raise field_error(
                ("training", "channels_last"),
                f"training.channels_last applies to image datasets, and {self.dataset!r} is "
                f"{get_dataset(self.dataset).info.kind}: set it to false",
                True,
            )
        if self.training.data_path == "tensor" and not get_dataset(self.dataset).in_memory:
            in_memory = [n for n in DATASETS if DATASETS.get(n).in_memory]
            raise field_error(
                ("training", "data_path"),
                f"training.data_path 'tensor' needs a dataset held in memory, not "
                f"{self.dataset!r}: use 'loader', or one of {', '.join(in_memory)}",
                "tensor",
            )
        try:
            check_options(self.model, resolve_model_options(self))
        except ValueError as error:
            raise field_error(
                ("training", "dropout"), f"training.dropout: {error}", self.training.dropout
            ) from None
        return self


@dataclass(frozen=True)
class TrainingConfig:
    """Concrete optimization settings: the spec with the model's A.2 defaults filled in."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_decay: float
    momentum: float
    nesterov: bool
    max_steps_per_epoch: int | None
    eval_batch_size: int
    num_workers: int
    optimizer_kernel: OptimizerKernel
    dropout: float
    data_path: DataPath
    pin_memory: bool | None = None
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    checkpoint_every_steps: int | None = None
    sync_batchnorm: bool = False


def resolve_training(spec: RunSpec) -> TrainingConfig:
    """Fill unset training fields from the model's Appendix A.2 defaults."""
    d, t = get_model(spec.model).defaults, spec.training
    return TrainingConfig(
        epochs=t.epochs if t.epochs is not None else d.epochs,
        batch_size=t.batch_size if t.batch_size is not None else d.batch_size,
        lr=t.lr if t.lr is not None else d.lr,
        weight_decay=t.weight_decay if t.weight_decay is not None else d.weight_decay,
        lr_decay=t.lr_decay if t.lr_decay is not None else d.lr_decay,
        momentum=t.momentum,
        nesterov=t.nesterov,
        max_steps_per_epoch=t.max_steps_per_epoch,
        eval_batch_size=t.eval_batch_size,
        num_workers=t.num_workers,
        optimizer_kernel=t.optimizer_kernel,
        dropout=t.dropout,
        data_path=t.data_path,
        pin_memory=t.pin_memory,
        precision=t.precision,
        channels_last=t.channels_last,
        compile=t.compile,
        checkpoint_every_steps=t.checkpoint_every_steps,
        sync_batchnorm=t.sync_batchnorm,
    )


def resolve_model_options(spec: RunSpec) -> ModelOptions:
    """The architecture choices a run makes (dropout)."""
    return ModelOptions(dropout=spec.training.dropout)


def resolve_init(spec: RunSpec) -> str:
    """The sparse-init distribution: the spec's, or ER for MLPs and ERK for conv nets (A.2)."""
    return spec.sparsity.init or get_model(spec.model).default_init


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted == "a.b"`` (creating dicts on the way)."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML: ``0.05``, ``true``, ``snip``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.path=value")
        set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON spec file into a plain dict."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a spec must be a mapping, got {type(data).__name__}")
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for logging parameters)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
