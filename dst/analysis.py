"""Mask exploration: the ITOP ratio (Appendix E).

The Jaccard index of Eq. (1) and the structural comparisons of Section 5.4 are in
:mod:`dst.structure`.
"""

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
