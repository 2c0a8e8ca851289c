"""Mask analysis: ITOP ratio (Appendix E) and the Jaccard index of Eq. (1) (Section 4, Q3)."""

from __future__ import annotations

import torch

from dst.masks import Masks, num_active


class ItopTracker:
    """In-Time Over-Parameterization ratio (Liu et al. 2021; paper Appendix E).

    The fraction of prunable weights that have been active at least once during training.
    """

    def __init__(self, masks: Masks) -> None:
        self.explored: Masks = {name: m.clone() for name, m in masks.items()}

    def update(self, masks: Masks) -> None:
        """Record the current masks (call after every topology update)."""
        for name, m in masks.items():
            self.explored[name] |= m

    def ratio(self) -> float:
        """Explored weights / prunable weights."""
        explored = sum(num_active(m) for m in self.explored.values())
        total = sum(m.numel() for m in self.explored.values())
        return explored / total if total else 1.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: m.cpu() for name, m in self.explored.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in state.items():
            self.explored[name] = m.to(self.explored[name].device).bool()


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """J(A, B) = |A ∩ B| / |A ∪ B| of two boolean set indicators (1.0 when both are empty)."""
    union = num_active(a | b)
    return num_active(a & b) / union if union else 1.0


def mean_jaccard(a: Masks, b: Masks) -> float:
    """Eq. (1): the layer-wise Jaccard index averaged over the layers."""
    if a.keys() != b.keys():
        raise ValueError("both mask sets must cover the same layers")
    return sum(jaccard(a[name].bool(), b[name].bool()) for name in a) / len(a)
