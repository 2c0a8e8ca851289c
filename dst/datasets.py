"""Datasets of the paper (Table 4) plus two offline datasets that ship with scikit-learn.

Each registered dataset knows its static shape (:class:`DataInfo`) without loading anything,
so specs can be validated (model/dataset compatibility) before any data is touched. The
registry imports no torch: how each dataset is read (or downloaded) lives in
:mod:`dst.loaders`, imported when a dataset is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dst.registry import Registry

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from dst.tensor_data import TensorSplit

DataKind = Literal["image", "tabular"]


@dataclass(frozen=True)
class DataInfo:
    """Static description of a dataset: what a model needs to know to be built for it."""

    name: str
    kind: DataKind
    input_shape: tuple[int, ...]  # (C, H, W) for images, (F,) for tabular data
    num_classes: int

    @property
    def num_outputs(self) -> int:
        """Binary tasks use one logit (BCE, as the paper's small-MLP on Higgs); others C logits."""
        return 1 if self.num_classes == 2 else self.num_classes


def default_data_root() -> Path:
    """``$DST_DATA_DIR``, else ``~/.cache/dst/data``."""
    return Path(os.environ.get("DST_DATA_DIR", "~/.cache/dst/data")).expanduser()


@dataclass(frozen=True)
class DataConfig:
    """Where data lives and how it is prepared."""

    root: Path = field(default_factory=default_data_root)
    download: bool = True
    augment: bool = True
    split_seed: int = 0  # the random hold-outs are fixed so every run sees the same split


@dataclass
class DataSplits:
    """Train, validation and test sets of one dataset; ``tensors`` holds the same splits as
    in-memory tensors for the tensor data path (None when the data is not held in memory)."""

    train: Dataset
    val: Dataset
    test: Dataset
    info: DataInfo
    tensors: tuple[TensorSplit, TensorSplit, TensorSplit] | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset."""

    name: str
    info: DataInfo
    loader: str  # the function of :mod:`dst.loaders` that reads it, (config) -> splits
    description: str
    in_memory: bool = True  # its splits come as tensors too (``training.data_path: tensor``)

    def load(self, config: DataConfig) -> DataSplits:
        """The dataset's splits (imports :mod:`dst.loaders`, hence torch)."""
        from dst import loaders

        return getattr(loaders, self.loader)(config)


class DatasetUnavailableError(RuntimeError):
    """The data is not on disk and cannot be downloaded; the message says how to get it."""


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def get_dataset(name: str) -> DatasetEntry:
    """The registered dataset ``name`` (unknown names list the valid ones)."""
    return DATASETS.get(name)


def load_dataset(name: str, config: DataConfig) -> DataSplits:
    """Load the splits of dataset ``name``."""
    return get_dataset(name).load(config)


DIGITS = DataInfo("digits", "image", (1, 8, 8), 10)
BREAST_CANCER = DataInfo("breast_cancer", "tabular", (30,), 2)
HIGGS = DataInfo("higgs", "tabular", (24,), 2)
CIFAR10 = DataInfo("cifar10", "image", (3, 32, 32), 10)
CIFAR100 = DataInfo("cifar100", "image", (3, 32, 32), 100)
FASHION = DataInfo("fashion-mnist", "image", (1, 28, 28), 10)
TINY = DataInfo("tiny-imagenet", "image", (3, 64, 64), 200)
IMAGENET = DataInfo("imagenet", "image", (3, 224, 224), 1000)


for _entry in (
    DatasetEntry("higgs", HIGGS, "load_higgs_splits", "Higgs (OpenML 44129), tabular, 70/15/15"),
    DatasetEntry("cifar10", CIFAR10, "load_cifar10", "CIFAR-10, 45k/5k/10k"),
    DatasetEntry("cifar100", CIFAR100, "load_cifar100", "CIFAR-100, 45k/5k/10k"),
    DatasetEntry("fashion-mnist", FASHION, "load_fashion_mnist", "FashionMNIST, 54k/6k/10k"),
    DatasetEntry(
        "tiny-imagenet",
        TINY,
        "load_tiny_imagenet",
        "Tiny-ImageNet 64x64, 100k/10k (val as val and test)",
        in_memory=False,
    ),
    DatasetEntry(
        "imagenet",
        IMAGENET,
        "load_imagenet",
        "ImageNet ImageFolder, val as validation and test",
        in_memory=False,
    ),
    DatasetEntry(
        "digits", DIGITS, "load_digits_splits", "scikit-learn digits 8x8 (offline), 70/15/15"
    ),
    DatasetEntry(
        "breast_cancer",
        BREAST_CANCER,
        "load_breast_cancer_splits",
        "scikit-learn breast cancer (offline), binary, 70/15/15",
    ),
):
    DATASETS.add(_entry.name, _entry)
