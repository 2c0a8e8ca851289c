"""Models of the paper (Appendix A.1, Table 2), in a registry.

Each :class:`ModelEntry` knows how to build a fresh network for a dataset's static shape
(:class:`~dst.datasets.DataInfo`), which sparse initialization and training regime the paper
uses for it (Appendix A.2), and which inputs it can take, so a spec pairing a model with an
incompatible dataset is rejected before any data is loaded. The registry imports no torch:
the networks live in :mod:`dst.networks`, imported when a model is built, so whoever only
names and checks models (the spec, the REST API, the job driver) starts in a fraction of the
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dst.datasets import DataInfo
from dst.registry import Registry

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TrainingDefaults:
    """Per-model training hyperparameters of Appendix A.2."""

    batch_size: int
    lr: float
    weight_decay: float
    epochs: int
    lr_decay: float = 0.1  # multiplicative LR decay applied at 50% and 75% of the epochs


@dataclass(frozen=True)
class ModelOptions:
    """Per-run choices about a model's architecture (the spec's ``training.dropout``)."""

    dropout: float = 0.0  # rate for the MLPs' input and hidden layers (Figure 4); 0 = none

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.dropout}")


class IncompatibleModelError(ValueError):
    """A model that cannot be built for a dataset; the message names both and says why."""

    def __init__(self, model: str, dataset: str, reason: str) -> None:
        self.model, self.dataset, self.reason = model, dataset, reason
        super().__init__(f"model {model!r} {reason}")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, paper defaults (Appendix A.2) and input requirements."""

    name: str
    builder: str  # the function of :mod:`dst.networks` that builds it, (info, options) -> module
    default_init: Literal["er", "erk"]
    defaults: TrainingDefaults
    requires_image: bool
    min_size: int
    description: str
    has_dropout: bool = False  # takes ModelOptions.dropout (the MLPs, Figure 4)

    def build(self, info: DataInfo, options: ModelOptions) -> nn.Module:
        """A fresh network for ``info`` (imports :mod:`dst.networks`, hence torch)."""
        from dst import networks

        return getattr(networks, self.builder)(info, options)

    def check(self, info: DataInfo) -> None:
        """Raise :class:`IncompatibleModelError` if this model cannot be built for ``info``.

        Checked before building so that a bad model/dataset pair in a spec fails fast, with a
        message naming the model, the dataset and the reason.
        """
        reason = self.incompatibility(info)
        if reason is not None:
            raise IncompatibleModelError(self.name, info.name, reason)

    def incompatibility(self, info: DataInfo) -> str | None:
        """Why this model cannot take ``info``'s inputs (``None`` when it can)."""
        if not self.requires_image:
            return None
        shape = info.input_shape
        if info.kind != "image" or len(shape) != 3:
            return (
                f"needs (C, H, W) image input but dataset {info.name!r} is {info.kind} "
                f"with shape {shape}"
            )
        height, width = shape[1], shape[2]
        if min(height, width) < self.min_size:
            return (
                f"needs images of at least {self.min_size}x{self.min_size} but dataset "
                f"{info.name!r} has {height}x{width} images (shape {shape})"
            )
        return None


# --- registry ---------------------------------------------------------------------------------

MODELS: Registry[ModelEntry] = Registry("model")


def _small_net_defaults() -> TrainingDefaults:
    """Appendix A.2 regime shared by the MLPs, small-CNN and LeNet-5-Caffe."""
    return TrainingDefaults(batch_size=128, lr=0.01, weight_decay=5e-4, epochs=100)


def _mlp_entries() -> list[ModelEntry]:
    """The two MLPs of Table 2: ER sparse init, any (flattened) input (Appendix A.2)."""
    return [
        ModelEntry(
            name="small-mlp",
            builder="build_small_mlp",
            default_init="er",
            defaults=_small_net_defaults(),
            requires_image=False,
            min_size=0,
            description="MLP 256-256, ReLU (Table 2; paper: Higgs)",
            has_dropout=True,
        ),
        ModelEntry(
            name="large-mlp",
            builder="build_large_mlp",
            default_init="er",
            defaults=_small_net_defaults(),
            requires_image=False,
            min_size=0,
            description="MLP 1024-512, ReLU (Table 2; paper: CIFAR-10)",
            has_dropout=True,
        ),
    ]


def _small_conv_entries() -> list[ModelEntry]:
    """Small-CNN and LeNet-5-Caffe: ERK sparse init, small-net regime (Appendix A.2)."""
    return [
        ModelEntry(
            name="small-cnn",
            builder="build_small_cnn",
            default_init="erk",
            defaults=_small_net_defaults(),
            requires_image=True,
            min_size=4,
            description="3-conv ConvNet with global average pool (Table 2; paper: CIFAR-10)",
        ),
        ModelEntry(
            name="lenet5-caffe",
            builder="build_lenet5_caffe",
            default_init="erk",
            defaults=_small_net_defaults(),
            requires_image=True,
            min_size=16,
            description="LeNet-5-Caffe, conv 20-50, fc 500 (A.1; paper: FashionMNIST)",
        ),
    ]


def _large_conv_entries() -> list[ModelEntry]:
    """ResNet-56, VGG-16, EfficientNet-B0, ResNet-50: ERK init, own regimes (Appendix A.2)."""
    return [
        ModelEntry(
            name="resnet56",
            builder="build_resnet56",
            default_init="erk",
            defaults=TrainingDefaults(batch_size=128, lr=0.1, weight_decay=1e-4, epochs=200),
            requires_image=True,
            min_size=4,
            description="CIFAR ResNet-56, 855,770 params (He et al. 2016; paper: CIFAR-10)",
        ),
        ModelEntry(
            name="vgg16",
            builder="build_vgg16",
            default_init="erk",
            defaults=TrainingDefaults(batch_size=128, lr=0.01, weight_decay=1e-4, epochs=200),
            requires_image=True,
            min_size=32,
            description="VGG-16 with BatchNorm for CIFAR, 14.8M params (A.1; paper: CIFAR-100)",
        ),
        ModelEntry(
            name="efficientnet-b0",
            builder="build_efficientnet_b0",
            default_init="erk",
            defaults=TrainingDefaults(
                batch_size=128, lr=0.01, weight_decay=1e-4, epochs=100, lr_decay=0.001
            ),
            requires_image=True,
            min_size=32,
            description="torchvision EfficientNet-B0, untrained (A.1; paper: Tiny-ImageNet)",
        ),
        ModelEntry(
            name="resnet50",
            builder="build_resnet50",
            default_init="erk",
            defaults=TrainingDefaults(batch_size=256, lr=0.1, weight_decay=1e-4, epochs=90),
            requires_image=True,
            min_size=32,
            description="torchvision ResNet-50, untrained (He et al. 2016; paper: ImageNet)",
        ),
    ]


def _register_all(registry: Registry[ModelEntry]) -> None:
    """Register the paper's eight models, in the order of Appendix A.1/A.2."""
    for entry in _mlp_entries() + _small_conv_entries() + _large_conv_entries():
        registry.add(entry.name, entry)


_register_all(MODELS)


def get_model(name: str) -> ModelEntry:
    """The registered model ``name``, or :class:`~dst.registry.UnknownNameError`."""
    return MODELS.get(name)


def dropout_models() -> list[str]:
    """Names of the models that take a dropout rate."""
    return [name for name in MODELS if MODELS.get(name).has_dropout]


def check_options(name: str, options: ModelOptions) -> None:
    """Raise ``ValueError`` when model ``name`` cannot take ``options`` (e.g. dropout)."""
    if options.dropout > 0 and not get_model(name).has_dropout:
        raise ValueError(
            f"model {name!r} has no dropout; dropout is available for {', '.join(dropout_models())}"
        )


def build_model(name: str, info: DataInfo, options: ModelOptions | None = None) -> nn.Module:
    """A fresh ``name`` model for dataset ``info``, after checking they are compatible."""
    options = options or ModelOptions()
    entry = get_model(name)
    entry.check(info)
    check_options(name, options)
    return entry.build(info, options)
