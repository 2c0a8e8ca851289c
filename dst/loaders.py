"""How each registered dataset of :mod:`dst.datasets` is read from disk (or downloaded) into
train, validation and test splits (Table 4), in the real on-disk formats.
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from dst.datasets import (
    BREAST_CANCER,
    CIFAR10,
    CIFAR100,
    DIGITS,
    FASHION,
    HIGGS,
    IMAGENET,
    TINY,
    DataConfig,
    DataInfo,
    DatasetUnavailableError,
    DataSplits,
)
from dst.tensor_data import ImageNorm, PadMode, TensorSplit

log = logging.getLogger(__name__)


def _unavailable(name: str, missing: Path, how: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"dataset {name!r} is not available: {missing} is missing and downloading is "
        f"{'not possible' if 'image-net' in how else 'disabled (data.download: false)'}. {how}"
    )


def download_problem(error: BaseException) -> str:
    """Why a download failed, on one line: an HTTP status, or the network's reason (refused,
    no such host, timed out), or the last line of a library's message (torchvision lists the
    mirrors it tried, each with urllib's ``<urlopen error REASON>``)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", None) if isinstance(error, urllib.error.URLError) else None
    text = str(reason if reason is not None else error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]  # urllib's own form of a network error, as a library quotes it
    return last.removeprefix("<urlopen error ").removesuffix(">") if last.startswith("<") else last


@contextmanager
def downloading(
    name: str, url: str, root: Path, expected: str, partial: Path | None = None
) -> Iterator[None]:
    """Download dataset ``name`` from ``url`` in the block; a failure (the network, the
    server, the disk) is a :class:`DatasetUnavailableError` on one line, naming the URL and
    what to put where (``expected`` under the data ``root``) to run without downloading. A
    ``partial`` file the failed download leaves is removed: a later run would take it for
    the whole archive."""
    existed = partial is not None and partial.exists()
    try:
        yield
    except (OSError, RuntimeError, http.client.HTTPException) as error:  # a cut answer too
        log.debug("downloading %s failed", url, exc_info=True)
        if partial is not None and not existed:
            partial.unlink(missing_ok=True)
        raise DatasetUnavailableError(
            f"dataset {name!r}: downloading {url} failed ({download_problem(error)}). "
            f"To run without downloading, put {expected} under the data root {root} "
            f"(data.root, or $DST_DATA_DIR) and set data.download: false"
        ) from None


def lock_file(root: Path, name: str) -> Path:
    """The file whose lock one process holds while it downloads dataset ``name`` into
    ``root`` (left in place: removing a lock file others wait on would break the lock)."""
    return root / f".{name}.download.lock"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made if missing) for the block: the trials
    of a study start together and would otherwise download into the same place at once."""
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_once(
    name: str,
    target: Path,
    url: str,
    root: Path,
    expected: str,
    download: Callable[[], object],
    partial: Path | None = None,
) -> None:
    """Run ``download`` (dataset ``name`` from ``url`` into ``root``) unless ``target``
    exists, one process at a time: a process that waited finds what the first one
    downloaded. Failures are one line, as :func:`downloading` says."""
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(lock_file(root, name)):
        if target.exists():
            return
        with downloading(name, url, root, expected, partial):
            download()


# -- splitting helpers ------------------------------------------------------------------
def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (keep, held-out) index arrays with ``round(fraction * n)`` held out."""
    perm = np.random.default_rng(seed).permutation(n)
    k = round(fraction * n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class random split into train/val/test index arrays (e.g. 70/15/15)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_val = round(fractions[1] * len(idx))
        n_test = round(fractions[2] * len(idx))
        parts[1] += idx[:n_val].tolist()
        parts[2] += idx[n_val : n_val + n_test].tolist()
        parts[0] += idx[n_val + n_test :].tolist()
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


def _tensor_splits(
    x: np.ndarray,
    y: np.ndarray,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
    info: DataInfo,
    standardize: bool,
) -> DataSplits:
    """Tabular splits as tensors, standardized with the train set's mean and std if asked
    (no test leakage)."""
    mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if standardize:
        train = x[parts[0]]
        mean, std = train.mean(0), train.std(0)
        std[std == 0] = 1.0

    def make(idx: np.ndarray) -> TensorDataset:
        xs = torch.from_numpy(((x[idx] - mean) / std).astype(np.float32))
        return TensorDataset(xs.view(len(idx), *info.input_shape), torch.from_numpy(y[idx]).long())

    train, val, test = (make(p) for p in parts)

    def as_split(d: TensorDataset) -> TensorSplit:
        return TensorSplit(d.tensors[0], d.tensors[1])  # the same memory, no copy

    tensors = (as_split(train), as_split(val), as_split(test))
    return DataSplits(train, val, test, info, tensors=tensors)


# -- scikit-learn datasets (offline) ------------------------------------------------------


def sklearn_data_file(name: str) -> Path:
    """A data file scikit-learn ships (``sklearn/datasets/data/NAME``), found without importing
    scikit-learn: its import takes seconds, the file itself milliseconds to read."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-learn ships the digits and breast_cancer data: install it")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels [1797, 64] float64, labels [1797] int64)."""
    table = np.loadtxt(sklearn_data_file("digits.csv.gz"), delimiter=",")  # [1797, 65]
    return table[:, :-1], table[:, -1].astype(np.int64)


def breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's breast cancer as (features [569, 30] float64, labels [569] int64)."""
    # the first line is a header (counts and class names)
    table = np.loadtxt(sklearn_data_file("breast_cancer.csv"), delimiter=",", skiprows=1)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits_splits(config: DataConfig) -> DataSplits:
    """scikit-learn's 8x8 digits (1,797 images), stratified 70/15/15, standardized."""
    x, y = digits_arrays()
    x = x / 16.0  # pixel values 0..16
    parts = stratified_split(y, (0.7, 0.15, 0.15), config.split_seed)
    return _tensor_splits(x, y, parts, DIGITS, standardize=True)


def load_breast_cancer_splits(config: DataConfig) -> DataSplits:
    """scikit-learn's breast cancer (569 samples, 30 features, binary), stratified 70/15/15."""
    x, y = breast_cancer_arrays()
    parts = stratified_split(y, (0.7, 0.15, 0.15), config.split_seed)
    return _tensor_splits(x, y, parts, BREAST_CANCER, standardize=True)


# -- Higgs (OpenML 44129) -----------------------------------------------------------------
HIGGS_FILE = Path("higgs") / "higgs.npz"
HIGGS_URL = "https://www.openml.org/d/44129"


def fetch_higgs(root: Path) -> None:
    """Download OpenML dataset 44129 and cache it as ``higgs/higgs.npz`` (X, y)."""
    from sklearn.datasets import fetch_openml

    bunch = fetch_openml(
        data_id=44129, data_home=str(root / "openml"), as_frame=False, parser="auto"
    )
    labels = np.unique(bunch.target)
    y = np.searchsorted(labels, bunch.target).astype(np.int64)
    (root / HIGGS_FILE).parent.mkdir(parents=True, exist_ok=True)
    np.savez(root / HIGGS_FILE, X=np.asarray(bunch.data, dtype=np.float32), y=y)


def load_higgs_splits(config: DataConfig) -> DataSplits:
    """Higgs, 24 features, binary, stratified 70/15/15 split (Table 4), features as OpenML
    serves them: Table 4 names no preprocessing (and the paper's code does none)."""
    path = config.root / HIGGS_FILE
    if not path.exists():
        if not config.download:
            raise _unavailable("higgs", path, f"Get it from {HIGGS_URL}.")
        expected = f"{HIGGS_FILE} (arrays X and y)"
        fetch_once(
            "higgs", path, HIGGS_URL, config.root, expected,
            lambda: fetch_higgs(config.root), partial=path,
        )  # fmt: skip
    with np.load(path) as data:
        x, y = data["X"].astype(np.float64), data["y"].astype(np.int64)
    parts = stratified_split(y, (0.7, 0.15, 0.15), config.split_seed)
    return _tensor_splits(x, y, parts, HIGGS, standardize=False)


# -- image datasets ------------------------------------------------------------------------
class ArrayImages(Dataset):
    """uint8 HWC images in memory with a transform (CIFAR)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), torch.tensor(int(self.labels[i]))


class Transformed(Dataset):
    """A view of a dataset (or subset of it) with its own transform."""

    def __init__(self, base: Dataset, indices: np.ndarray | None, transform: Callable) -> None:
        self.base = base if indices is None else Subset(base, indices.tolist())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return self.transform(x), torch.tensor(int(y))


def _image_transforms(
    norm: ImageNorm, size: int, augment: bool, pad_mode: PadMode
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of an HWC uint8 array: random crop with padding 4 (filled as
    ``pad_mode``) + flip when augmenting. They work on the tensor, not a PIL image: the same
    draws and pixels (padding commutes with scaling to [0, 1]), and reflection padding costs
    a PIL image a round trip through numpy."""
    from torchvision import transforms as T

    crop = T.RandomCrop(size, padding=4, padding_mode=pad_mode)
    train = [crop, T.RandomHorizontalFlip()] if augment else []
    normalize = T.Normalize(norm.mean, norm.std)
    return T.Compose([T.ToTensor(), *train, normalize]), T.Compose([T.ToTensor(), normalize])


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/{}.tar.gz"
# The paper names no preprocessing; these are its code's: CIFAR-10 padded by reflection and
# normalized with its std constants, CIFAR-100 zero-padded, FashionMNIST scaled to [-1, 1].
CIFAR10_NORM = ImageNorm((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
CIFAR100_NORM = ImageNorm((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
FASHION_NORM = ImageNorm((0.5,), (0.5,))


def _read_cifar_batches(files: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read python-pickle CIFAR batches into (N, 32, 32, 3) uint8 images and labels."""
    images, labels = [], []
    for file in files:
        with file.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


def download_archive(url: str, root: Path, md5: str | None = None) -> None:
    """Download the archive at ``url`` into ``root`` (checked against ``md5`` if known) and
    unpack it there (inside :func:`fetch_once`, which makes failures one line). It is
    unpacked beside its place, in a folder of this process's own, and moved in whole, so an
    unpacking cut short leaves no folder a later run would take for the data; an archive cut
    short or corrupt is removed, so a later run downloads it again."""
    from torchvision.datasets.utils import download_url, extract_archive

    archive = root / url.rsplit("/", 1)[-1]
    download_url(url, str(root), md5=md5)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{archive.name}."))
    try:
        extract_archive(str(archive), str(staging))
        for item in staging.iterdir():
            item.rename(root / item.name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        archive.unlink(missing_ok=True)
        raise RuntimeError(f"the archive is cut short or corrupt: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_cifar(config: DataConfig, info: DataInfo, archive: str, folder: str) -> DataSplits:
    from torchvision import datasets as tvd

    directory = config.root / folder
    if not directory.exists():
        url = CIFAR_URL.format(archive)
        if not config.download:
            raise _unavailable(info.name, directory, f"Get it from {url}.")
        md5 = (tvd.CIFAR10 if info.num_classes == 10 else tvd.CIFAR100).tgz_md5
        expected = f"{folder}/ (that archive unpacked)"
        archive_path = config.root / url.rsplit("/", 1)[-1]
        fetch_once(
            info.name, directory, url, config.root, expected,
            lambda: download_archive(url, config.root, md5=md5), partial=archive_path,
        )  # fmt: skip
    pad_mode: PadMode
    if info.num_classes == 10:
        train_files = [directory / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [directory / "test_batch"], b"labels"
        norm, pad_mode = CIFAR10_NORM, "reflect"
    else:
        train_files, test_files, key = [directory / "train"], [directory / "test"], b"fine_labels"
        norm, pad_mode = CIFAR100_NORM, "constant"
    x, y = _read_cifar_batches(train_files, key)
    xt, yt = _read_cifar_batches(test_files, key)
    keep, val = holdout(len(y), 0.1, config.split_seed)  # 45k / 5k (Table 4, footnote 13)
    train_tf, eval_tf = _image_transforms(norm, 32, config.augment, pad_mode)

    def tensors(images: np.ndarray, labels: np.ndarray, augment: bool) -> TensorSplit:
        nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        pad = 4 if augment else 0  # the same augmentation as the per-sample transforms
        return TensorSplit(nchw, torch.from_numpy(labels).long(), norm, pad, augment, pad_mode)

    return DataSplits(
        ArrayImages(x[keep], y[keep], train_tf),
        ArrayImages(x[val], y[val], eval_tf),
        ArrayImages(xt, yt, eval_tf),
        info,
        tensors=(
            tensors(x[keep], y[keep], config.augment),
            tensors(x[val], y[val], False),
            tensors(xt, yt, False),
        ),
    )


def load_cifar10(config: DataConfig) -> DataSplits:
    """CIFAR-10, 45,000/5,000/10,000 (Table 4)."""
    return _load_cifar(config, CIFAR10, "cifar-10-python", "cifar-10-batches-py")


def load_cifar100(config: DataConfig) -> DataSplits:
    """CIFAR-100, 45,000/5,000/10,000 (Table 4)."""
    return _load_cifar(config, CIFAR100, "cifar-100-python", "cifar-100-python")


def load_fashion_mnist(config: DataConfig) -> DataSplits:
    """FashionMNIST: default 60k/10k split, a random 10% of train held out (footnote 17)."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    raw = config.root / "FashionMNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").exists():
        if not config.download:
            raise _unavailable(
                "fashion-mnist",
                raw,
                "Get it from https://github.com/zalandoresearch/fashion-mnist.",
            )
        url = " or ".join(tvd.FashionMNIST.mirrors)
        expected = "FashionMNIST/raw/ with its four unpacked *-ubyte files"
        fetch_once(
            "fashion-mnist", raw / "train-images-idx3-ubyte", url, config.root, expected,
            lambda: tvd.FashionMNIST(str(config.root), train=True, download=True),  # all four
        )  # fmt: skip
    train = tvd.FashionMNIST(str(config.root), train=True, download=config.download)
    test = tvd.FashionMNIST(str(config.root), train=False, download=config.download)
    normalize = T.Compose([T.ToTensor(), T.Normalize(FASHION_NORM.mean, FASHION_NORM.std)])
    keep, val = holdout(len(train), 0.1, config.split_seed)
    norm = FASHION_NORM
    images, labels = train.data[:, None], train.targets.long()  # [N, 1, 28, 28] uint8, [N]
    keep_t, val_t = torch.from_numpy(keep), torch.from_numpy(val)
    return DataSplits(
        Transformed(train, keep, normalize),
        Transformed(train, val, normalize),
        Transformed(test, None, normalize),
        FASHION,
        tensors=(
            TensorSplit(images[keep_t], labels[keep_t], norm),
            TensorSplit(images[val_t], labels[val_t], norm),
            TensorSplit(test.data[:, None], test.targets.long(), norm),
        ),
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class TinyImageNetVal(Dataset):
    """Tiny-ImageNet's val split (labels in ``val_annotations.txt``), used as the test set."""

    def __init__(self, root: Path, class_to_idx: dict[str, int]) -> None:
        lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
        rows = [line.split("\t") for line in lines if line.strip()]
        self.items = [(root / "val" / "images" / r[0], class_to_idx[r[1]]) for r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[object, int]:
        from torchvision import datasets as tvd

        path, label = self.items[i]
        return tvd.folder.default_loader(str(path)), label


def load_tiny_imagenet(config: DataConfig) -> DataSplits:
    """Tiny-ImageNet at 64x64 with its standard split (Table 4, footnote 18): all 100,000
    train images for training; the 10,000-image val split is both validation and test ("we
    use the validation set as the test set"; no hyperparameters are tuned on it). Training
    augmentation is a horizontal flip."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = config.root / "tiny-imagenet-200"
    if not root.exists():
        if not config.download:
            raise _unavailable("tiny-imagenet", root, f"Get it from {TINY_URL}.")
        expected = "tiny-imagenet-200/ (that archive unpacked)"
        fetch_once(
            "tiny-imagenet", root, TINY_URL, config.root, expected,
            lambda: download_archive(TINY_URL, config.root),
            partial=config.root / TINY_URL.rsplit("/", 1)[-1],
        )  # fmt: skip
    train = tvd.ImageFolder(str(root / "train"))
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [T.RandomHorizontalFlip()] if config.augment else []
    train_tf, eval_tf = T.Compose([*augment, *normalize]), T.Compose(normalize)
    val = Transformed(TinyImageNetVal(root, train.class_to_idx), None, eval_tf)
    return DataSplits(Transformed(train, None, train_tf), val, val, TINY)


def _label_tensor(label: int) -> torch.Tensor:
    return torch.tensor(label)


def load_imagenet(config: DataConfig) -> DataSplits:
    """ImageNet as ImageFolder; the standard val set is both validation and test (fn. 16)."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = config.root / "imagenet"
    for split in ("train", "val"):
        if not (root / split).exists():
            raise _unavailable(
                "imagenet",
                root / split,
                "ImageNet cannot be downloaded automatically (licence): get ILSVRC2012 from "
                "https://image-net.org/ and arrange it as imagenet/train/<wnid>/*.JPEG and "
                "imagenet/val/<wnid>/*.JPEG under the data root.",
            )
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = (
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        if config.augment
        else [T.Resize(256), T.CenterCrop(224)]
    )
    train = tvd.ImageFolder(
        str(root / "train"),
        transform=T.Compose([*augment, *normalize]),
        target_transform=_label_tensor,
    )
    val = tvd.ImageFolder(
        str(root / "val"),
        transform=T.Compose([T.Resize(256), T.CenterCrop(224), *normalize]),
        target_transform=_label_tensor,
    )
    return DataSplits(train, val, val, IMAGENET)
