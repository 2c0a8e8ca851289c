"""Selections (the k lowest keys): the CPU's threshold selection, the sorting one a GPU runs,
and all layers at once, choose the same entries, ties, infinities and NaN included."""

from __future__ import annotations

import math

import pytest
import torch

from dst.criteria import resolve_criterion
from dst.selection import (
    Segments,
    lowest_k,
    lowest_k_sorted,
    select_pruned,
    select_pruned_sorted,
)

CPU = torch.device("cpu")


def test_lowest_k_ranks_nan_after_every_number() -> None:
    nan, inf = math.nan, math.inf
    values = torch.tensor([nan, 2.0, inf, nan, -inf, 2.0, nan])
    assert lowest_k(values, 3).tolist() == [1, 4, 5]
    assert lowest_k(values, 4).tolist() == [1, 2, 4, 5]  # every number before any NaN
    assert lowest_k(values, 5).tolist() == [0, 1, 2, 4, 5]  # then NaN, lowest position first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_precision_select_as_float32_does(dtype: torch.dtype) -> None:
    values = torch.tensor([3.0, -1.0, math.nan, 0.5, 3.0, -math.inf, 2.0])
    for k in range(1, 8):
        assert torch.equal(lowest_k(values.to(dtype), k), lowest_k(values, k)), k
    scores, mask = values.to(dtype), torch.tensor([True, True, True, False, True, True, True])
    assert select_pruned(scores, mask, 3).tolist() == [1, 2, 5]  # NaN counts as the lowest


def tricky_values(n: int, seed: int) -> torch.Tensor:
    """A few levels (many ties), ±inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 5, (n,), generator=gen).float()
    for fill in (-math.inf, math.inf, math.nan):
        values[torch.randperm(n, generator=gen)[: n // 8]] = fill
    return values


@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
def test_the_sorting_selection_is_the_threshold_selection(n: int) -> None:
    """What a GPU runs (a full stable sort) chooses what the CPU's O(n) selection chooses,
    ties, infinities and NaN included."""
    values = tricky_values(n, n)
    for k in sorted({1, n // 3, n // 2, n - 1, n}):
        assert torch.equal(lowest_k_sorted(values, k), lowest_k(values, k)), k


@pytest.mark.parametrize("name", ["magnitude", "set", "mest", "sensitivity", "snip", "random"])
def test_the_sorting_pruning_selection_is_the_listing_one(name: str) -> None:
    """A GPU ranks every entry with the inactive ones last instead of listing the active ones
    (which would wait for the device): the chosen weights are the same."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randint(-3, 4, (40, 50), generator=gen).float() / 4  # ties, zeros
    g = torch.randint(-2, 3, (40, 50), generator=gen).float()  # zero gradients: x/0, 0/0
    w[0, :5] = math.nan  # a diverged weight
    mask = torch.rand(40, 50, generator=gen) < 0.3
    scores = resolve_criterion(name).score(w, g, mask, torch.Generator().manual_seed(5))
    active = int(mask.sum())
    for k in (1, active // 3, active):
        chosen = select_pruned_sorted(scores, mask, k)
        assert torch.equal(chosen, select_pruned(scores, mask, k)), k
        assert mask.flatten()[chosen].all()


def test_segments_take_each_segments_lowest_as_the_per_segment_selection() -> None:
    gen = torch.Generator().manual_seed(6)
    sizes = [7, 1, 300, 64, 2, 1000]
    values = tricky_values(sum(sizes), 6)
    values[:7] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0])  # -0 ties +0
    segments = Segments(sizes, CPU)
    for _ in range(5):
        ks = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in sizes]
        chosen = segments.lowest_k(values, ks)
        expected = [
            lowest_k_sorted(part, k) + start
            for part, k, start in zip(values.split(sizes), ks, segments.starts, strict=True)
        ]
        assert torch.equal(chosen, torch.cat(expected)), ks
        local = segments.local(chosen, ks)
        assert [len(t) for t in local] == ks
        for mine, theirs, start in zip(local, expected, segments.starts, strict=True):
            assert torch.equal(mine, theirs - start)


def test_segments_refuse_impossible_counts() -> None:
    segments = Segments([3, 4], CPU)
    with pytest.raises(ValueError, match="one k for each of 2 segments"):
        segments.lowest_k(torch.zeros(7), [1])
    with pytest.raises(ValueError, match="0 <= k <= size"):
        segments.lowest_k(torch.zeros(7), [4, 1])
