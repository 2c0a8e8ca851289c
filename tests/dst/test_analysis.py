"""ITOP ratio and Jaccard index oracles."""

from __future__ import annotations

import pytest
import torch

from dst.analysis import ItopTracker, jaccard, mean_jaccard


def t(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_jaccard_hand_worked() -> None:
    assert jaccard(t(1, 1, 0, 0), t(0, 1, 1, 0)) == pytest.approx(1 / 3)
    assert jaccard(t(1, 0), t(1, 0)) == 1.0
    assert jaccard(t(0, 0), t(0, 0)) == 1.0
    assert jaccard(t(1, 0), t(0, 1)) == 0.0


def test_mean_jaccard_averages_layers() -> None:
    a = {"l1": t(1, 1, 0, 0), "l2": t(1, 0)}
    b = {"l1": t(0, 1, 1, 0), "l2": t(1, 0)}
    assert mean_jaccard(a, b) == pytest.approx((1 / 3 + 1) / 2)


def test_itop_counts_every_weight_ever_active() -> None:
    tracker = ItopTracker({"l": t(1, 1, 0, 0, 0, 0, 0, 0)})
    assert tracker.ratio() == 0.25
    tracker.update({"l": t(0, 1, 1, 0, 0, 0, 0, 0)})
    tracker.update({"l": t(0, 0, 1, 1, 0, 0, 0, 0)})
    assert tracker.ratio() == 0.5
