"""ITOP ratio oracles (Appendix E) on scripted mask histories."""

from __future__ import annotations

import pytest
import torch

from dst.analysis import ItopTracker


def t(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_itop_counts_every_weight_ever_active() -> None:
    tracker = ItopTracker({"l": t(1, 1, 0, 0, 0, 0, 0, 0)})
    assert tracker.ratio() == 0.25
    tracker.update({"l": t(0, 1, 1, 0, 0, 0, 0, 0)})
    tracker.update({"l": t(0, 0, 1, 1, 0, 0, 0, 0)})
    assert tracker.ratio() == 0.5


def test_itop_over_a_scripted_two_layer_history() -> None:
    """12 prunable weights (8 + 4); each update moves one weight per layer."""
    history = [
        ({"a": t(1, 1, 0, 0, 0, 0, 0, 0), "b": t(1, 0, 0, 0)}, 3 / 12),
        ({"a": t(0, 1, 1, 0, 0, 0, 0, 0), "b": t(0, 1, 0, 0)}, 5 / 12),
        ({"a": t(1, 1, 0, 0, 0, 0, 0, 0), "b": t(1, 0, 0, 0)}, 5 / 12),  # back: nothing new
        ({"a": t(0, 1, 0, 0, 0, 0, 0, 1), "b": t(0, 0, 0, 1)}, 7 / 12),
    ]
    tracker = ItopTracker(history[0][0])
    assert tracker.ratio() == pytest.approx(history[0][1])
    for masks, ratio in history[1:]:
        tracker.update(masks)
        assert tracker.ratio() == pytest.approx(ratio)


def test_itop_does_not_alias_the_masks_it_was_given() -> None:
    masks = {"l": t(1, 0, 0, 0)}
    tracker = ItopTracker(masks)
    masks["l"][:] = True  # a topology update edits masks in place
    assert tracker.ratio() == 0.25


def test_itop_state_round_trip_resumes_the_count() -> None:
    tracker = ItopTracker({"l": t(1, 0, 0, 0)})
    tracker.update({"l": t(0, 1, 0, 0)})
    resumed = ItopTracker({"l": t(0, 0, 1, 0)})
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.ratio() == 0.5
    resumed.update({"l": t(0, 0, 1, 0)})
    assert resumed.ratio() == 0.75
