"""Datasets: the paper's splits (Table 4), loaded from fixtures in their real on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dst.datasets import (
    DATASETS,
    DataConfig,
    DatasetUnavailableError,
    DataSplits,
    get_dataset,
    load_dataset,
)
from dst.registry import UnknownNameError


def indices_of(split: torch.utils.data.Dataset) -> set[bytes]:
    return {x.numpy().tobytes() for x, _ in split}  # type: ignore[attr-defined]


def check_items(name: str, splits, n: int = 2) -> None:
    info = get_dataset(name).info
    for split in (splits.train, splits.val, splits.test):
        for i in range(min(n, len(split))):
            x, y = split[i]
            assert tuple(x.shape) == info.input_shape and x.dtype == torch.float32
            assert y.dtype == torch.int64 and 0 <= int(y) < info.num_classes


def test_digits_split_70_15_15_stratified_and_disjoint() -> None:
    s = load_dataset("digits", DataConfig())
    sizes = (len(s.train), len(s.val), len(s.test))
    assert sum(sizes) == 1797
    assert abs(len(s.val) - 0.15 * 1797) < 10 and abs(len(s.test) - 0.15 * 1797) < 10
    train, val, test = indices_of(s.train), indices_of(s.val), indices_of(s.test)
    assert not (train & test) and not (val & test)
    check_items("digits", s)


def test_splits_are_deterministic_for_a_split_seed() -> None:
    a = load_dataset("breast_cancer", DataConfig(split_seed=0))
    b = load_dataset("breast_cancer", DataConfig(split_seed=0))
    c = load_dataset("breast_cancer", DataConfig(split_seed=1))
    assert len(a.train) + len(a.val) + len(a.test) == 569
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])  # type: ignore[attr-defined]
    check_items("breast_cancer", a)


def write_cifar(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_from_python_batches_holds_out_10_percent(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    s = load_dataset("cifar10", DataConfig(root=tmp_path, download=False))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)  # 45k/5k/10k scaled
    check_items("cifar10", s)


def same_as_tensors(s: DataSplits, splits: tuple[int, ...] = (0, 1, 2)) -> None:
    """The tensor path's samples equal the per-sample pipeline's (without augmentation)."""
    assert s.tensors is not None
    for i in splits:
        dataset, tensors = (s.train, s.val, s.test)[i], s.tensors[i]
        n = len(dataset)  # type: ignore[arg-type]
        assert len(tensors) == n
        x, y = tensors.without_augmentation().batch(torch.arange(n))
        for j in range(n):
            xj, yj = dataset[j]
            assert torch.allclose(x[j], xj, atol=1e-6) and int(y[j]) == int(yj)


def test_cifar_tensors_match_the_loader_and_augment_only_training(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    s = load_dataset("cifar10", DataConfig(root=tmp_path, download=False))
    same_as_tensors(s, splits=(1, 2))  # training samples are augmented, at random
    train, val, test = s.tensors  # type: ignore[misc]
    assert (train.pad_crop, train.flip) == (4, True)
    assert (val.pad_crop, val.flip, test.pad_crop, test.flip) == (0, False, 0, False)
    plain = load_dataset("cifar10", DataConfig(root=tmp_path, download=False, augment=False))
    same_as_tensors(plain)
    assert (plain.tensors[0].pad_crop, plain.tensors[0].flip) == (0, False)  # type: ignore[index]


def windows(image: torch.Tensor, pad: int, mode: str) -> list[torch.Tensor]:
    """Every crop of ``image`` [C, H, W] padded by ``pad`` as ``mode``, and its mirror."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image[None], (pad,) * 4, mode=mode)[0]
    crops = [
        padded[:, y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)
    ]
    return crops + [crop.flip(2) for crop in crops]


@pytest.mark.parametrize(("name", "mode"), [("cifar10", "reflect"), ("cifar100", "constant")])
def test_cifar_crops_pad_as_the_papers_code(tmp_path: Path, name: str, mode: str) -> None:
    """CIFAR-10 pads its random crops by reflection, CIFAR-100 with zeros (black, before
    normalization), on both data paths."""
    if name == "cifar10":
        write_cifar(tmp_path)
    else:
        test_cifar100_uses_fine_labels(tmp_path)
    s = load_dataset(name, DataConfig(root=tmp_path, download=False))
    train = s.tensors[0]  # type: ignore[index]
    assert (train.pad_crop, train.pad_mode) == (4, mode)
    torch.manual_seed(0)
    for i in range(5):
        x, _ = s.train[i]  # normalized [3, 32, 32], augmented
        raw, _ = train.without_augmentation().batch(torch.tensor([i]))
        std = torch.tensor(train.norm.std).view(3, 1, 1)  # type: ignore[union-attr]
        mean = torch.tensor(train.norm.mean).view(3, 1, 1)  # type: ignore[union-attr]
        pixels = raw[0] * std + mean  # back to [0, 1]
        expected = [(c - mean) / std for c in windows(pixels, 4, mode)]
        assert any(torch.allclose(x, e, atol=1e-5) for e in expected)
        drawn = train.batch(torch.tensor([i]))[0][0]  # the tensor path's crop
        assert any(torch.allclose(drawn, e, atol=1e-5) for e in expected)


def test_image_normalization_is_the_papers_code() -> None:
    from dst.loaders import CIFAR10_NORM, CIFAR100_NORM, FASHION_NORM

    assert CIFAR10_NORM.std == (0.2023, 0.1994, 0.2010)
    assert CIFAR100_NORM.std == (0.2673, 0.2564, 0.2762)
    assert (FASHION_NORM.mean, FASHION_NORM.std) == ((0.5,), (0.5,))


def test_tabular_tensors_are_the_loader_tensors() -> None:
    s = load_dataset("breast_cancer", DataConfig())
    same_as_tensors(s)
    assert s.tensors[0].inputs.data_ptr() == s.train.tensors[0].data_ptr()  # type: ignore[index, attr-defined]


def test_only_image_folders_have_no_tensors() -> None:
    assert [n for n in DATASETS.names() if not get_dataset(n).in_memory] == [
        "tiny-imagenet",
        "imagenet",
    ]


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 50), ("test", 10)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    s = load_dataset("cifar100", DataConfig(root=tmp_path, download=False))
    assert (len(s.train), len(s.val), len(s.test)) == (45, 5, 10)
    check_items("cifar100", s)


def write_idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 30))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 10))
    s = load_dataset("fashion-mnist", DataConfig(root=tmp_path, download=False))
    assert (len(s.train), len(s.val), len(s.test)) == (27, 3, 10)
    check_items("fashion-mnist", s)
    same_as_tensors(s)


def jpeg(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_tiny_imagenet_standard_split_val_is_validation_and_test(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids))
    for w in wnids:
        for i in range(5):
            jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", 64)
    lines = []
    for i, w in enumerate(wnids * 2):
        jpeg(root / "val" / "images" / f"val_{i}.JPEG", 64)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    s = load_dataset("tiny-imagenet", DataConfig(root=tmp_path, download=False))
    # Table 4 / footnote 18: every train image trains; the val split validates and tests
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 4)
    assert s.val is s.test
    assert [int(s.test[i][1]) for i in range(4)] == [0, 1, 0, 1]
    check_items("tiny-imagenet", s)


def test_imagenet_image_folder(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for w in ("n01", "n02"):
            jpeg(tmp_path / "imagenet" / split / w / "a.JPEG", 40)
    s = load_dataset("imagenet", DataConfig(root=tmp_path, download=False))
    assert len(s.train) == 2 and s.val is s.test
    check_items("imagenet", s)


def test_higgs_from_cache_70_15_15(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "higgs").mkdir()
    x = rng.normal(loc=5.0, scale=3.0, size=(200, 24)).astype(np.float32)
    y = np.repeat([0, 1], [120, 80])
    np.savez(tmp_path / "higgs" / "higgs.npz", X=x, y=y)
    s = load_dataset("higgs", DataConfig(root=tmp_path, download=False))
    assert (len(s.train), len(s.val), len(s.test)) == (140, 30, 30)
    for split, n_pos in ((s.train, 56), (s.val, 12), (s.test, 12)):  # stratified: 40% ones
        assert int(split.tensors[1].sum()) == n_pos  # type: ignore[attr-defined]
    # Table 4 names no preprocessing: features stay as stored, rows are the stored rows
    features = torch.cat([p.tensors[0] for p in (s.train, s.val, s.test)])  # type: ignore[attr-defined]
    assert sorted(map(tuple, features.tolist())) == sorted(map(tuple, x.tolist()))
    check_items("higgs", s)


@pytest.mark.parametrize(
    ("name", "missing", "where"),
    [
        ("cifar10", "cifar-10-batches-py", "cs.toronto.edu"),
        ("higgs", "higgs.npz", "openml.org/d/44129"),
        ("tiny-imagenet", "tiny-imagenet-200", "cs231n.stanford.edu"),
        ("fashion-mnist", "raw", "fashion-mnist"),
        ("imagenet", "imagenet", "image-net.org"),
    ],
)
def test_missing_data_says_what_and_where(
    tmp_path: Path, name: str, missing: str, where: str
) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, DataConfig(root=tmp_path, download=False))
    assert missing in str(info.value) and where in str(info.value)


def test_registry() -> None:
    assert DATASETS.names() == [
        "higgs",
        "cifar10",
        "cifar100",
        "fashion-mnist",
        "tiny-imagenet",
        "imagenet",
        "digits",
        "breast_cancer",
    ]
    with pytest.raises(UnknownNameError, match="valid dataset names: higgs"):
        get_dataset("mnist")


def test_every_registered_dataset_names_a_loader() -> None:
    """The registry names loaders as strings (it imports no torch): each must exist."""
    from dst import loaders
    from dst.datasets import DATASETS

    for name in DATASETS.names():
        assert callable(getattr(loaders, DATASETS.get(name).loader, None)), name
