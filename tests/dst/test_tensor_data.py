"""The tensor data path: on-device batches and augmentation with the per-sample pipeline's
distribution, and the same batches as the loader path."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torchvision import transforms as T

from dst.batches import GlobalBatchSampler, SampleKeys
from dst.tensor_data import (
    ImageNorm,
    TensorBatches,
    TensorSplit,
    augmentation_draws,
    crop_and_flip,
    fixed_batches,
    normalize,
    random_crop,
    random_flip,
)


def images(b: int = 4, c: int = 3, size: int = 6) -> torch.Tensor:
    return torch.arange(b * c * size * size, dtype=torch.int64).view(b, c, size, size) % 251


def test_crop_is_a_window_of_the_zero_padded_image() -> None:
    x = images().to(torch.uint8)
    draws = torch.rand((3, 4), generator=torch.Generator().manual_seed(3))
    out = random_crop(x, 2, draws)
    offsets = (draws[:2] * 5).long()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(out[i], padded[i, :, oy : oy + 6, ox : ox + 6])


@pytest.mark.parametrize("flip", [False, True])
def test_reflected_crop_is_a_window_of_the_mirrored_image(flip: bool) -> None:
    """Padding by reflection (edge pixels not repeated), as torch's and np.pad's ``reflect``."""
    x = images(64, size=8).to(torch.uint8)
    draws = torch.rand((3, 64), generator=torch.Generator().manual_seed(2))
    out = crop_and_flip(x, 4, flip, draws, "reflect")
    offsets = (draws[:2] * 9).long()
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for i in range(64):
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        window = padded[i, :, oy : oy + 8, ox : ox + 8]
        assert torch.equal(out[i], window.flip(2) if flip and draws[2, i] < 0.5 else window)
    corner = torch.zeros((3, 1))  # offset (0, 0): the top-left 4x4 is the image mirrored
    assert torch.equal(random_crop(x[:1], 4, corner, "reflect")[0, :, 4, 4], x[0, :, 0, 0])
    assert torch.equal(random_crop(x[:1], 4, corner, "reflect")[0, :, 3, 3], x[0, :, 1, 1])


def test_crop_offsets_are_uniform_over_every_position() -> None:
    """With training's keyed draws. A 9x9 image padded by 4: its centre pixel lands at
    (8 - oy, 8 - ox) of the crop for every offset oy, ox in [0, 8], so where it lands reveals
    the offset; all 81 offsets should be about equally frequent."""
    marked = torch.zeros(16_200, 1, 9, 9, dtype=torch.uint8)
    marked[:, :, 4, 4] = 1
    out = random_crop(marked, 4, augmentation_draws(1, 0, torch.arange(16_200)))
    assert bool((out.flatten(1).sum(1) == 1).all())  # always inside the crop
    counts = Counter(out.flatten(1).argmax(1).tolist())  # row * 9 + col
    assert len(counts) == 81
    assert chisquare(list(counts.values())).pvalue > 0.001  # uniform: 200 expected each


def test_flip_mirrors_half_of_the_images() -> None:
    x = images(2000)
    out = random_flip(x, augmentation_draws(0, 3, torch.arange(2000)))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert abs(float(mirrored.float().mean()) - 0.5) < 0.05


def test_crop_and_flip_together_is_a_mirrored_window() -> None:
    x = images(64, size=8).to(torch.uint8)
    draws = torch.rand((3, 64), generator=torch.Generator().manual_seed(5))
    out = crop_and_flip(x, 4, True, draws)
    offsets = (draws[:2] * 9).long()
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(64):
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        window = padded[i, :, oy : oy + 8, ox : ox + 8]
        assert torch.equal(out[i], window.flip(2) if draws[2, i] < 0.5 else window)


def test_normalize_matches_torchvision() -> None:
    hwc = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    norm = ImageNorm((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    expected = T.Compose([T.ToTensor(), T.Normalize(norm.mean, norm.std)])(hwc)
    ours = normalize(torch.from_numpy(hwc).permute(2, 0, 1)[None], norm)[0]
    assert torch.allclose(ours, expected, atol=1e-5)


def test_batches_follow_the_given_index_lists() -> None:
    split = TensorSplit(torch.arange(10.0)[:, None], torch.arange(10))
    batches = list(TensorBatches(split, [[3, 1], [7]]))
    assert [y.tolist() for _, y in batches] == [[3, 1], [7]]
    assert torch.equal(batches[0][0], torch.tensor([[3.0], [1.0]]))
    assert fixed_batches(7, 2, rank=1, world=2) == [[1, 3], [5]]
    assert fixed_batches(5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("pad", [0, 4])
def test_augmentation_keeps_shape_and_dtype(pad: int) -> None:
    split = TensorSplit(
        torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
        torch.zeros(8, dtype=torch.long),
        ImageNorm((0.5,) * 3, (0.25,) * 3),
        pad_crop=pad,
        flip=True,
    )
    x, y = split.batch(torch.arange(8))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and len(y) == 8


def test_two_workers_together_get_the_batches_one_worker_gets() -> None:
    """Each sample's crop and flip are keyed on (seed, epoch, index): in every global batch,
    worker r's augmented samples are the single worker's samples r, r + 2, ... ."""
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(50), pad_crop=4, flip=True)

    def epoch(rank: int, world: int, number: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sampler = GlobalBatchSampler(50, 16, seed=7, rank=rank, world_size=world)
        sampler.set_epoch(number)
        return list(TensorBatches(split, SampleKeys(sampler), seed=7))

    for number in (0, 1):
        one, ranks = epoch(0, 1, number), [epoch(r, 2, number) for r in (0, 1)]
        assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
        for step, (x, y) in enumerate(one):
            for r in (0, 1):
                assert torch.equal(ranks[r][step][0], x[r::2])
                assert torch.equal(ranks[r][step][1], y[r::2])
    assert not torch.equal(epoch(0, 1, 0)[0][0], epoch(0, 1, 1)[0][0])  # a new epoch: new draws
