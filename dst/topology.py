"""One DST topology update (Section 3.1): prune a fraction ρ_t of the active weights by a
criterion, then grow as many inactive weights back by a growth criterion.

Growth may choose a weight that was pruned in the same update; such a weight was active before
and after, so it keeps its value and its optimizer state (RigL's default). Only connections
that were inactive before the update are new: they start at zero with their optimizer state
(momentum) reset. Pruned weights that are not regrown are set to zero.

Local scope (the paper's choice, Section 3.2) prunes and grows within each layer: grown =
pruned per layer, so every layer keeps its exact active count. Global scope (Appendix I)
compares scores across the whole network: it prunes ρ of all active weights by one threshold
and grows as many back wherever the growth criterion ranks highest in the network, so the
total count is kept while the layers' densities may drift ("global pruning may change the
sparsity distributions in each layer").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dst.criteria import Criterion
from dst.growth import Growth
from dst.masks import Masks, active_counts
from dst.schedules import PruneSchedule
from dst.selection import Segments, pruning_keys, select_pruned

Scope = Literal["local", "global"]


@dataclass(frozen=True)
class LayerUpdate:
    """Flat indices pruned from and grown into one layer at one update.

    ``is_new`` marks the grown positions that were inactive before the update; the others
    were pruned and regrown at once, and are left untouched. Kept as a mask over ``grown``
    rather than as indices so that nothing waits for a GPU to count them.
    """

    pruned: torch.Tensor  # [k] int64
    grown: torch.Tensor  # [g] int64 (g = k in local scope; in global scope g may differ)
    is_new: torch.Tensor  # [g] bool

    @property
    def new(self) -> torch.Tensor:
        """Grown positions that were inactive before the update, [g_new <= g] int64."""
        return self.grown[self.is_new]


def prune_count(fraction: float, active: int) -> int:
    """k = round(ρ · active), half up: how many of ``active`` weights a prune fraction ρ removes."""
    return math.floor(fraction * active + 0.5)


@torch.no_grad()
def prune_indices(
    criterion: Criterion,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    masks: Masks,
    fraction: float,
    scope: Scope,
    generator: torch.Generator,
    counts: Mapping[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat indices (int64, ascending) that ``criterion`` prunes from each layer at fraction ρ.

    The selection of one topology update (Section 3.1) as a pure function of a network state:
    :class:`TopologyUpdater` prunes exactly these, and the structural analysis of Section 5.4
    (:mod:`dst.structure`) asks it what every criterion would prune from one state. Nothing is
    modified; the random criterion draws from ``generator``. ``counts`` (each mask's active
    count, when the caller knows them) spare a GPU the wait for counting them.
    """
    if counts is None:
        counts = dict(zip(weights, active_counts(masks[n] for n in weights), strict=True))
    if scope == "local":
        return _prune_local(criterion, weights, grads, masks, counts, fraction, generator)
    return _prune_global(criterion, weights, grads, masks, counts, fraction, generator)


def _prune_local(
    criterion: Criterion,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    masks: Masks,
    counts: Mapping[str, int],
    fraction: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Local scope (the paper's choice, Section 3.2): ρ of each layer's active weights, ranked
    within the layer."""
    out = {}
    for name, w in weights.items():
        k = prune_count(fraction, counts[name])
        scores = criterion.score(w.detach(), grads[name], masks[name], generator)  # [*w.shape]
        out[name] = select_pruned(scores, masks[name], k)  # [k]
    return out


def _prune_global(
    criterion: Criterion,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None],
    masks: Masks,
    counts: Mapping[str, int],
    fraction: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Global scope: ρ of all active weights, one threshold over the concatenated layers."""
    flat_w = torch.cat([w.detach().flatten() for w in weights.values()])  # [N]
    layer_grads = [grads[name] for name in weights]
    flat_g = (
        torch.cat([g.flatten() for g in layer_grads if g is not None])  # [N]
        if all(g is not None for g in layer_grads)
        else None
    )
    flat_m = torch.cat([masks[name].flatten() for name in weights])  # [N]
    k = prune_count(fraction, sum(counts[name] for name in weights))
    chosen = select_pruned(criterion.score(flat_w, flat_g, flat_m, generator), flat_m, k)  # [k]
    return dict(zip(weights, per_layer(chosen, [w.numel() for w in weights.values()]), strict=True))


def per_layer(chosen: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Indices ``chosen`` into the concatenation of layers of ``sizes``, as each layer's own
    ascending flat indices: one sort, and one wait for a GPU (the split points), however many
    layers."""
    ordered = torch.sort(chosen).values  # [K]
    ends = torch.tensor(list(itertools.accumulate(sizes)), device=chosen.device)  # [L]
    cuts = [0, *torch.searchsorted(ordered, ends).tolist()]  # L + 1 split points
    starts = [0, *itertools.accumulate(sizes)]
    return [ordered[cuts[i] : cuts[i + 1]] - starts[i] for i in range(len(sizes))]


class TopologyUpdater:
    """Applies prune-and-grow updates to masks, weights and optimizer state.

    ``together`` chooses how: layer by layer, or all layers at once (:class:`Segments`: the
    same selection as two sorts of the concatenated layers, for a local scope and a growth that
    ranks). ``None`` takes all at once where it pays, on a GPU: per layer, ResNet-50's 54
    layers cost the host about 2,700 small kernel launches per update.
    """

    def __init__(
        self,
        criterion: Criterion,
        growth: Growth,
        schedule: PruneSchedule,
        scope: Scope,
        generator: torch.Generator,
        together: bool | None = None,
    ) -> None:
        if together and (scope != "local" or growth.keys is None):
            raise ValueError(
                "an update of all layers at once needs scope 'local' and a growth that ranks "
                f"(gradient), not scope {scope!r} with {growth.name!r} growth"
            )
        self.criterion, self.growth, self.schedule = criterion, growth, schedule
        self.scope: Scope = scope
        self.generator = generator  # CPU generator for random criterion / random growth
        self.together = together
        # each mask's active count, remembered with the mask and its version: an update keeps
        # every count, and counting again would make a GPU update wait for the device
        self._counted: dict[str, tuple[torch.Tensor, int, int]] = {}
        self._segments: Segments | None = None

    @property
    def needs_grad(self) -> bool:
        return self.criterion.needs_grad or self.growth.needs_grad

    def _grad(self, weight: nn.Parameter) -> torch.Tensor | None:
        if self.needs_grad and weight.grad is None:
            raise RuntimeError("topology update needs gradients: call it after backward()")
        return weight.grad

    def prune_sets(
        self, weights: dict[str, nn.Parameter], masks: Masks, fraction: float
    ) -> dict[str, torch.Tensor]:
        """Flat indices each layer would prune at prune fraction ``fraction`` (no side effects
        besides drawing from the generator for the random criterion); see :func:`prune_indices`.
        """
        grads = {name: self._grad(w) for name, w in weights.items()}
        return prune_indices(
            self.criterion,
            weights,
            grads,
            masks,
            fraction,
            self.scope,
            self.generator,
            self.active_counts(masks),
        )

    def active_counts(self, masks: Masks) -> dict[str, int]:
        """Each mask's active count: remembered at the mask's version, counted (all stale
        masks at once) when something else edited a mask since (a checkpoint load, a user)."""
        stale = [name for name, m in masks.items() if not self._knows(name, m)]
        for name, count in zip(stale, active_counts(masks[n] for n in stale), strict=True):
            self._counted[name] = (masks[name], masks[name]._version, count)
        return {name: self._counted[name][2] for name in masks}

    def _knows(self, name: str, mask: torch.Tensor) -> bool:
        known = self._counted.get(name)
        return known is not None and known[0] is mask and known[1] == mask._version

    @torch.no_grad()
    def update(
        self,
        weights: dict[str, nn.Parameter],
        masks: Masks,
        optimizer: torch.optim.Optimizer | None,
        step: int,
    ) -> dict[str, LayerUpdate]:
        """Prune ρ_step of the active weights and grow as many back, in place.

        Only truly new connections (grown ∧ ¬old mask) are zeroed and get their optimizer
        state reset; a weight pruned and regrown in the same update keeps both. Pruned weights
        that are not regrown are zeroed.
        """
        fraction = self.schedule.fraction(step)
        if self.scope == "global":
            updates = self._update_global(weights, masks, optimizer, fraction)
        elif self._all_at_once(weights):
            updates = self._update_together(weights, masks, optimizer, fraction)
        else:
            updates = self._update_each(weights, masks, optimizer, fraction)
        for name, u in updates.items():  # the new count at the new version (index lengths are
            # shapes, known without waiting for a GPU; in local scope they are equal)
            count = self._counted[name][2] - len(u.pruned) + len(u.grown)
            self._counted[name] = (masks[name], masks[name]._version, count)
        return updates

    def _all_at_once(self, weights: dict[str, nn.Parameter]) -> bool:
        devices = {w.device for w in weights.values()}
        if self.together is not None:
            if self.together and len(devices) > 1:
                raise ValueError("an update of all layers at once needs them on one device")
            return self.together
        if self.scope != "local" or self.growth.keys is None or len(devices) != 1:
            return False
        return next(iter(devices)).type != "cpu"  # the CPU selects faster layer by layer

    def _update_each(
        self,
        weights: dict[str, nn.Parameter],
        masks: Masks,
        optimizer: torch.optim.Optimizer | None,
        fraction: float,
    ) -> dict[str, LayerUpdate]:
        """The update layer by layer (local scope): each layer grows what it pruned."""
        pruned_sets = self.prune_sets(weights, masks, fraction)
        updates = {}
        for name, w in weights.items():
            pruned = pruned_sets[name]  # [k], all active before the update
            before = masks[name].view(-1).clone()  # [n]; cheaper lookups than set intersections
            masks[name].view(-1).index_fill_(0, pruned, False)  # not mask[i] = x: waits for a GPU
            grown = self.growth.select(w.grad, masks[name], len(pruned), self.generator)  # [k]
            updates[name] = _grow(w, masks[name], before, pruned, grown, optimizer)
        return updates

    def _update_global(
        self,
        weights: dict[str, nn.Parameter],
        masks: Masks,
        optimizer: torch.optim.Optimizer | None,
        fraction: float,
    ) -> dict[str, LayerUpdate]:
        """Global scope (Appendix I): one threshold prunes ρ of all active weights, and the
        growth criterion grows as many back, ranked (or drawn) over all layers' inactive
        weights together, so a layer may end with more or fewer active weights than before."""
        pruned_sets = self.prune_sets(weights, masks, fraction)
        before = {name: m.view(-1).clone() for name, m in masks.items()}  # [n] each
        for name in weights:
            masks[name].view(-1).index_fill_(0, pruned_sets[name], False)
        grads = [w.grad for w in weights.values()]
        grad = (  # [N]
            torch.cat([g.flatten() for g in grads if g is not None])
            if all(g is not None for g in grads)
            else None
        )
        mask = torch.cat([masks[name].view(-1) for name in weights])  # [N], after pruning
        total = sum(len(p) for p in pruned_sets.values())
        chosen = self.growth.select(grad, mask, total, self.generator)  # [K] into [N]
        shares = per_layer(chosen, [w.numel() for w in weights.values()])  # [g] each
        return {
            name: _grow(w, masks[name], before[name], pruned_sets[name], grown, optimizer)
            for (name, w), grown in zip(weights.items(), shares, strict=True)
        }

    def _update_together(
        self,
        weights: dict[str, nn.Parameter],
        masks: Masks,
        optimizer: torch.optim.Optimizer | None,
        fraction: float,
    ) -> dict[str, LayerUpdate]:
        """The update of all layers at once: the same selections (the same criterion scores,
        drawn in the same order; the same keys, ties and NaN rules) over the concatenated
        layers, then each layer's share written back."""
        names = list(weights)
        counts = self.active_counts(masks)
        ks = [prune_count(fraction, counts[name]) for name in names]
        segments = self._segments_of(weights)
        old = torch.cat([masks[name].view(-1) for name in names])  # [N]
        grads = {name: self._grad(w) for name, w in weights.items()}
        scores = torch.cat(  # [N]
            [
                self.criterion.score(w.detach(), grads[name], masks[name], self.generator).flatten()
                for name, w in weights.items()
            ]
        )
        pruned = segments.lowest_k(pruning_keys(scores, old), ks)  # [K], all active
        mask = old.clone()  # [N]
        mask.index_fill_(0, pruned, False)  # not mask[i] = x: that waits for a GPU
        present = [g.flatten() for g in grads.values() if g is not None]
        grad = torch.cat(present) if len(present) == len(grads) else None  # [N]
        assert self.growth.keys is not None  # checked by _all_at_once
        grown = segments.lowest_k(self.growth.keys(grad, mask), ks)  # [K], all inactive
        mask.index_fill_(0, grown, True)
        changed, new = old ^ mask, mask & ~old  # [N]: pruned and not regrown, or new; new
        is_new = ~old[grown]  # [K]
        updates = {}
        for name, w, m, c, n, p, g, i in zip(
            names,
            weights.values(),
            segments.split(mask),
            segments.split(changed),
            segments.split(new),
            segments.local(pruned, ks),
            segments.local(grown, ks),
            is_new.split(ks),
            strict=True,
        ):
            masks[name].view(-1).copy_(m)
            w.detach().view(-1).masked_fill_(c, 0)
            if optimizer is not None:
                for state in optimizer_state(optimizer, w):
                    state.view(-1).masked_fill_(n, 0)
            updates[name] = LayerUpdate(p, g, i)
        return updates

    def _segments_of(self, weights: dict[str, nn.Parameter]) -> Segments:
        """The layers as segments of their concatenation (made once per network)."""
        sizes = [w.numel() for w in weights.values()]
        device = next(iter(weights.values())).device
        known = self._segments
        if known is None or known.sizes != sizes or known.device != device:
            self._segments = known = Segments(sizes, device)
        return known


def _grow(
    weight: nn.Parameter,
    mask: torch.Tensor,
    before: torch.Tensor,
    pruned: torch.Tensor,
    grown: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
) -> LayerUpdate:
    """Activate ``grown`` [g] in ``mask`` (already without ``pruned`` [k]; ``before`` [n] is
    the flat mask before the update), zero pruned weights that were not regrown, and start
    new connections at zero with their optimizer state reset."""
    flat_mask, flat_w = mask.view(-1), weight.detach().view(-1)  # [n], [n]
    flat_mask.index_fill_(0, grown, True)
    is_new = ~before[grown]  # [g]: inactive before the update
    zero_where(flat_w, pruned, ~flat_mask[pruned])  # pruned and not regrown
    zero_where(flat_w, grown, is_new)
    if optimizer is not None:
        for state in optimizer_state(optimizer, weight):
            zero_where(state.view(-1), grown, is_new)
    return LayerUpdate(pruned, grown, is_new)


def zero_where(flat: torch.Tensor, idx: torch.Tensor, where: torch.Tensor) -> None:
    """``flat[idx[where]] = 0`` without compacting ``idx`` (which would wait for a GPU to count
    ``where``): the k entries at ``idx`` are read, zeroed where asked and written back.
    ``idx`` must not repeat a position."""
    flat[idx] = flat[idx].masked_fill_(where, 0)


def optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> list[torch.Tensor]:
    """Every per-element state tensor (e.g. SGD momentum) ``optimizer`` keeps for ``param``:
    what a new connection must start from zero."""
    return [
        value
        for value in optimizer.state.get(param, {}).values()
        if isinstance(value, torch.Tensor) and value.shape == param.shape
    ]
