"""Pruning criteria of Section 3.2: pure score functions, lowest score pruned.

Every criterion maps ``(weight, grad, mask, generator) -> scores`` of the weight's shape.
Only active weights are ever selected (:func:`dst.selection.select_pruned`); ties are broken by
flat index (lowest first) and zero denominators have a fixed value, so selection is
deterministic.
Gradient criteria reuse the gradient of the current training batch (Section 5.1, after MEST).

The registry imports no torch (the spec, the REST API and the job driver name criteria
without training anything): the functions import it when they run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from dst.registry import Registry

if TYPE_CHECKING:
    import torch

ScoreFn: TypeAlias = (
    "Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Generator], torch.Tensor]"
)


@dataclass(frozen=True)
class Criterion:
    """A registered pruning criterion."""

    name: str
    score: ScoreFn
    needs_grad: bool
    description: str


CRITERIA: Registry[Criterion] = Registry("criterion")


def _grad(grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise ValueError("this criterion needs the gradient of the current batch, got None")
    return grad


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for non-negative tensors, with x/0 = +inf for x > 0 and 0/0 = 0."""
    import torch

    ratio = num / den
    return torch.where(den == 0, torch.where(num > 0, math.inf, 0.0), ratio)


def magnitude(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """C_Magnitude: s(θ) = |θ|."""
    return weight.abs()


def set_balanced(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """C_SET (Mocanu et al. 2018, Section 3.2): equal numbers of positive and negative weights.

    The score of an active weight is the rank of |θ| within its sign group (θ >= 0 or θ < 0),
    so the k lowest scores take the k/2 smallest non-negative and the k/2 negative weights
    closest to zero; a group with too few active weights is exhausted and the rest come from
    the other. Inactive entries get +inf (they are never selected anyway). Ranks are float64,
    exact for any layer (a bf16 or float32 rank is not past 2^8 or 2^24 weights).
    """
    import torch

    from dst.masks import true_indices

    flat, active = weight.detach().flatten(), mask.flatten()  # [n], [n]
    scores = torch.full_like(flat, math.inf, dtype=torch.float64)  # [n]
    for group in ((flat >= 0) & active, (flat < 0) & active):
        idx = true_indices(group)  # [g]
        order = torch.sort(flat[idx].abs(), stable=True).indices  # [g]
        ranks = torch.empty_like(order, dtype=torch.float64)
        ranks[order] = torch.arange(len(idx), device=flat.device, dtype=torch.float64)
        scores[idx] = ranks
    return scores.view_as(weight)


def mest(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    mask: torch.Tensor,
    gen: torch.Generator,
    *,
    lam: float = 1.0,
) -> torch.Tensor:
    """C_MEST (Yuan et al. 2021): s(θ) = |θ| + λ|∇θ|."""
    return weight.abs() + lam * _grad(grad).abs()


def sensitivity(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """C_Sensitivity (Naji et al. 2021): s(θ) = |∇θ| / |θ|."""
    return safe_ratio(_grad(grad).abs(), weight.abs())


def rsensitivity(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """C_RSensitivity (the paper's reciprocal form, Appendix B): s(θ) = |θ| / |∇θ|."""
    return safe_ratio(weight.abs(), _grad(grad).abs())


def snip(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """C_SNIP (Lee et al. 2019), first-order Taylor: s(θ) = |θ · ∇θ|."""
    return (weight * _grad(grad)).abs()


def random_scores(
    weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Control: i.i.d. uniform scores, i.e. a uniformly random subset of the active weights."""
    import torch

    return torch.rand(weight.shape, generator=gen).to(weight.device)


for _c in (
    Criterion("magnitude", magnitude, False, "|θ|"),
    Criterion("set", set_balanced, False, "smallest |θ|, equal numbers of θ>=0 and θ<0"),
    Criterion("mest", mest, True, "|θ| + λ|∇θ|"),
    Criterion("sensitivity", sensitivity, True, "|∇θ| / |θ|"),
    Criterion("rsensitivity", rsensitivity, True, "|θ| / |∇θ|"),
    Criterion("snip", snip, True, "|θ · ∇θ|"),
    Criterion("random", random_scores, False, "uniformly random (control)"),
):
    CRITERIA.add(_c.name, _c)


def resolve_criterion(name: str, *, mest_lambda: float = 1.0) -> Criterion:
    """The criterion ``name`` with its hyperparameters bound (MEST's λ)."""
    criterion = CRITERIA.get(name)
    if name == "mest":
        bound: ScoreFn = functools.partial(mest, lam=mest_lambda)
        return Criterion(criterion.name, bound, criterion.needs_grad, criterion.description)
    return criterion
