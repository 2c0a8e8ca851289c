"""Growth criteria (Section 3.1): which inactive weights become active after pruning.

A growth function returns the flat indices of ``k`` inactive positions of ``mask`` (the mask
after pruning, so just-pruned positions are candidates, as in RigL). Grown weights start at
zero; :mod:`dst.topology` zeroes them and resets their optimizer state. The registry imports
no torch (naming a growth criterion trains nothing): the functions import it when they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from dst.registry import Registry

if TYPE_CHECKING:
    import torch

GrowFn: TypeAlias = (
    "Callable[[torch.Tensor | None, torch.Tensor, int, torch.Generator], torch.Tensor]"
)
KeysFn: TypeAlias = "Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]"


@dataclass(frozen=True)
class Growth:
    """A registered growth criterion."""

    name: str
    select: GrowFn  # (dense grad, mask after pruning, k, generator) -> flat indices [k]
    needs_grad: bool
    description: str
    # a growth that ranks: (dense grad, mask after pruning) -> keys of their shape, elementwise,
    # whose k lowest (ties to the lowest index) ``select`` grows; a GPU then ranks all layers at
    # once (dst.topology). None for a growth that draws (random).
    keys: KeysFn | None = None


GROWTH: Registry[Growth] = Registry("growth")


def random_growth(
    grad: torch.Tensor | None, mask: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """SET-style growth (Mocanu et al. 2018): k positions uniformly among the inactive ones.

    Draws i.i.d. uniform positions until at least k distinct inactive ones are seen (marked in
    a bitmap, cheaper than ``unique``), then keeps a uniformly random k of them. By symmetry the
    distinct set is a uniform subset of its size, so the result is a uniform k-subset, without
    permuting all (millions of) inactive positions.
    Mostly-active layers fall back to permuting the few inactive positions.
    """
    import torch

    from dst.masks import num_active, true_indices

    flat = mask.flatten().cpu()  # [n]
    n, inactive = len(flat), len(flat) - num_active(flat)
    if k > inactive:
        raise ValueError(f"cannot grow {k} weights: only {inactive} are inactive")
    if inactive < 2 * k or inactive < n // 2:
        inactive_idx = true_indices(~flat)  # [i]
        picked = inactive_idx[torch.randperm(inactive, generator=gen)[:k]]
        return picked.to(mask.device)
    hit = torch.zeros(n, dtype=torch.bool)  # [n], drawn inactive positions so far
    found = 0
    while found < k:
        draws = math.ceil(1.1 * (k - found) * n / inactive) + 16
        hit[torch.randint(0, n, (draws,), generator=gen)] = True
        hit &= ~flat
        found = num_active(hit)
    chosen = true_indices(hit)  # [found], ascending
    keep = torch.zeros(found, dtype=torch.bool)  # a uniform k-subset, kept in ascending order
    keep[torch.randperm(found, generator=gen)[:k]] = True
    return chosen[keep].to(mask.device)


def gradient_keys(grad: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """RigL's ranking: -|∇θ| (lowest = largest gradient), then NaN gradients (key 1, above every
    -|∇θ| <= 0), and active positions never (+inf, above those). Elementwise."""
    if grad is None:
        raise ValueError("gradient growth needs the dense gradient of the masked weights")
    keys = grad.detach().abs().neg_()  # a copy
    keys.nan_to_num_(nan=1.0, posinf=math.inf, neginf=-math.inf)
    return keys.masked_fill_(mask, math.inf)


def gradient_growth(
    grad: torch.Tensor | None, mask: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """RigL growth (Evci et al. 2020): the k inactive positions with the largest dense |∇θ|
    (:func:`gradient_keys`).

    Ties go to the lowest flat index. On a GPU the inactive count is not checked (counting
    would wait for the device): the topology update grows what it pruned, so k never exceeds
    it.
    """
    from dst.masks import num_active
    from dst.selection import lowest_k

    keys = gradient_keys(grad, mask).flatten()  # [n]
    if mask.device.type == "cpu" and k > (inactive := mask.numel() - num_active(mask)):
        raise ValueError(f"cannot grow {k} weights: only {inactive} are inactive")
    return lowest_k(keys, k)


GROWTH.add("random", Growth("random", random_growth, False, "uniform among inactive weights"))
GROWTH.add(
    "gradient",
    Growth("gradient", gradient_growth, True, "largest |∇θ| (RigL)", keys=gradient_keys),
)
