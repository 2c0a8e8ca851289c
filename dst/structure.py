"""Structural similarity of pruning criteria (Section 4, Q3; Section 5.4; Appendix K).

Everything here compares *sets of weights*, one boolean tensor per layer (a :data:`Masks`):
the weights a criterion would remove at a topology update, or a mask at the end of training.
Sets are compared by the layer-wise Jaccard index averaged over the layers (Eq. 1).

* :func:`removal_sets` asks every criterion what it would prune from one network state, through
  the very selection a topology update runs (:func:`dst.topology.prune_indices`);
* :func:`jaccard_matrix` and :func:`over_time_jaccard` compare those sets (Figures 6a, 17, 18);
* :func:`removal_jaccard_over_seeds` and :func:`end_mask_jaccard_over_seeds` aggregate seeds in
  the two different orders Appendix K states (Figures 6, 20, 21);
* :func:`consensus` is the share of weights every criterion keeps / removes (Figure 19);
* :func:`random_removal_reference` (J_r) and :func:`initial_mask_reference` (J_init) are the
  reference overlaps of Figure 6.

Two empty sets have no Jaccard index (0 / 0): late topology updates, whose cosine-decayed prune
fraction rounds to zero in small layers, remove nothing there, and counting such a layer as
J = 1 ("identical") would lift every pair of criteria, random included, towards 1 at the end of
training. The paper does not say how it treats them; here J(∅, ∅) is NaN, Eq. (1)'s average is
over the layers where at least one of the two sets is non-empty, and a pair with no such layer
has no value (NaN; ``None`` in JSON). Seeds are averaged the same way, over the seeds that
have a value (:func:`mean_where_defined`, :func:`std_where_defined`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dst.criteria import resolve_criterion
from dst.masks import Masks, num_active
from dst.topology import Scope, prune_indices

RemovalSets = dict[str, Masks]  # criterion -> layer -> bool tensor of the weight's shape


# -- Eq. (1) ------------------------------------------------------------------------------------
def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """J(A, B) = |A ∩ B| / |A ∪ B| of two boolean set indicators (Eq. 1, one layer).

    J(∅, ∅) is undefined (NaN): two criteria that both prune nothing from a layer (its prune
    count rounds to zero late in training) have not chosen the same weights, so the layer
    says nothing about their overlap (see the module's note). On the CPU the sets are
    combined in NumPy, which is many times faster than torch's element-wise ops on small
    layers (and does not slow down when other processes hold the cores).
    """
    if a.device.type == "cpu" and b.device.type == "cpu":
        x, y = a.detach().numpy(), b.detach().numpy()
        union = int(np.count_nonzero(x | y))
        return int(np.count_nonzero(x & y)) / union if union else math.nan
    union = num_active(a | b)
    return num_active(a & b) / union if union else math.nan


def layer_jaccards(a: Masks, b: Masks) -> dict[str, float]:
    """J(I_a^l, I_b^l) for every layer l (Eq. 1 before the average), in ``a``'s layer order;
    NaN for a layer where both sets are empty."""
    _same_layers(a, b)
    return {name: jaccard(a[name].bool(), b[name].bool()) for name in a}


def defined_mean(values: Iterable[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is.

    Eq. (1)'s average over layers (the layers where either set is non-empty), and a mean of
    such averages over pairs of sets (J_r, J_init).
    """
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def mean_jaccard(a: Masks, b: Masks) -> float:
    """Eq. (1): J̄(I_a, I_b) = (1/L') Σ_l J(I_a^l, I_b^l), the layer-wise index averaged over
    the L' layers where at least one set is non-empty; NaN when there is no such layer."""
    return defined_mean(layer_jaccards(a, b).values())


def _same_layers(a: Masks, b: Masks) -> None:
    if a.keys() != b.keys():
        raise ValueError("both sets must cover the same layers")
    if not a:
        raise ValueError("the Jaccard index of Eq. (1) needs at least one layer")


# -- removal sets from one network state --------------------------------------------------------
def indices_to_mask(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped and placed like ``like``, True at the flat positions ``idx``."""
    flat = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)  # [n]
    flat[idx.to(like.device)] = True
    return flat.view(like.shape)


def removal_sets(
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor | None] | None,
    masks: Masks,
    criteria: Sequence[str],
    prune_fraction: float,
    *,
    scope: Scope = "local",
    mest_lambda: float = 1.0,
    generator: torch.Generator | None = None,
) -> RemovalSets:
    """The set each criterion would remove from one network state at a topology update.

    Section 5.4: at the first update every criterion shares the network state, so the sets
    they select for removal can be compared (Figures 6a, 17, 18). Each set is exactly what
    :class:`dst.topology.TopologyUpdater` would prune at prune fraction ρ = ``prune_fraction``
    (k = round(ρ · active weights) per layer under local scope), because both call
    :func:`dst.topology.prune_indices`. ``grads`` (the current batch's gradient per layer) may
    be ``None`` when no criterion needs it. The random criterion draws from ``generator``
    (a fixed seed 0 when not given), in the order of ``criteria``. Nothing is modified.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    layer_grads = grads if grads is not None else dict.fromkeys(weights)
    sets: RemovalSets = {}
    for name in criteria:
        criterion = resolve_criterion(name, mest_lambda=mest_lambda)
        chosen = prune_indices(criterion, weights, layer_grads, masks, prune_fraction, scope, gen)
        sets[name] = {layer: indices_to_mask(idx, masks[layer]) for layer, idx in chosen.items()}
    return sets


# -- criterion x criterion matrices -------------------------------------------------------------
def layer_jaccard_matrix(sets: Mapping[str, Masks], names: Sequence[str]) -> np.ndarray:
    """J(I_a^l, I_b^l) for every pair of ``names`` and layer l: an array [c, c, L].

    Symmetric in its first two axes with ones on the diagonal (a criterion is compared with
    itself, even in a layer where it removes nothing); NaN where both sets of a layer are
    empty. The layers are in the order of the first set's layers. Kept per layer so seeds can
    be averaged before layers (Appendix K).
    """
    layers = list(sets[names[0]])
    out = np.ones((len(names), len(names), len(layers)))  # [c, c, L]
    for i, j in itertools.combinations(range(len(names)), 2):
        per_layer = layer_jaccards(sets[names[i]], sets[names[j]])
        out[i, j] = out[j, i] = [per_layer[layer] for layer in layers]  # [L]
    return out


def jaccard_matrix(sets: Mapping[str, Masks], names: Sequence[str]) -> np.ndarray:
    """The criterion x criterion matrix of Eq. (1), J̄(I_a, I_b) for a, b in ``names``: [c, c].

    One state's removal sets (Figures 6a, 17) or one seed's end masks (Figure 6b; an extra
    name such as ``"init"`` mapped to the initial masks gives the bottom row of Figure 6b).
    A pair is averaged over the layers where either set is non-empty; NaN where none is.
    """
    return mean_where_defined(layer_jaccard_matrix(sets, names), axis=2)  # [c, c]


def over_time_jaccard(
    runs: Mapping[str, Sequence[Mapping[str, Masks]]], columns: Sequence[str]
) -> list[np.ndarray]:
    """Figure 18: per topology update, a [r, c] matrix J̄(I_row, I_col) in the row's run.

    ``runs[row][u]`` holds the removal sets that every criterion in ``columns`` (and ``row``
    itself) would select at update u of the run trained with criterion ``row``
    (:func:`removal_sets` on that run's state). Entry (row, col) is measured in the row's run,
    so the matrix need not be symmetric (Appendix K); it is NaN where both sets are empty in
    every layer (a late update that prunes nothing). Rows are in the order of ``runs``.
    """
    counts = {len(updates) for updates in runs.values()}
    if len(counts) != 1:
        raise ValueError(f"every run must have the same number of updates, got {sorted(counts)}")
    return [_update_matrix(runs, u, columns) for u in range(counts.pop())]


def _update_matrix(
    runs: Mapping[str, Sequence[Mapping[str, Masks]]], u: int, columns: Sequence[str]
) -> np.ndarray:
    """Row r: J̄ between what r removed and what each column would remove at r's update u."""
    rows = [[mean_jaccard(runs[r][u][r], runs[r][u][c]) for c in columns] for r in runs]
    return np.array(rows)  # [r, c]


# -- Figure 19: weights every criterion keeps or removes ----------------------------------------
@dataclass(frozen=True)
class Consensus:
    """Figure 19: how much of the end masks all criteria agree on, over the whole model.

    ``kept_by_all`` = |∩_c m_c| / (active weights of one mask); ``removed_by_all`` =
    |∩_c ¬m_c| / (inactive weights of one mask). Every criterion keeps the same number of
    weights (the density is exact), so the denominators do not depend on the criterion.
    """

    kept_by_all: float
    removed_by_all: float


def consensus(end_masks: Mapping[str, Masks]) -> Consensus:
    """The share of the model's weights kept by every criterion and removed by every criterion
    (Appendix K, Figure 19), from one seed's end masks of each criterion.

    An empty denominator (nothing kept, or nothing removed) gives 1.0: every criterion agrees.
    """
    masks = list(end_masks.values())
    if len(masks) < 2:
        raise ValueError("consensus compares at least two criteria")
    for other in masks[1:]:
        _same_layers(masks[0], other)
    actives = {sum(num_active(m) for m in layer_masks.values()) for layer_masks in masks}
    if len(actives) != 1:
        raise ValueError(f"end masks keep different numbers of weights: {sorted(actives)}")
    active = actives.pop()
    total = sum(m.numel() for m in masks[0].values())
    kept = removed = 0
    for layer in masks[0]:
        stack = np.stack([m[layer].bool().cpu().numpy() for m in masks])  # [c, *shape]
        kept += int(np.count_nonzero(stack.all(axis=0)))
        removed += int(np.count_nonzero((~stack).all(axis=0)))
    return Consensus(_share(kept, active), _share(removed, total - active))


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


# -- Appendix K: aggregation over seeds ---------------------------------------------------------
@dataclass(frozen=True)
class JaccardStats:
    """A criterion x criterion Jaccard matrix over seeds: ``mean`` and ``std`` are [c, c] in the
    order of ``names``; a mean is NaN where no seed has a value, a std where fewer than
    ddof + 1 seeds have one."""

    names: list[str]
    mean: np.ndarray  # [c, c]
    std: np.ndarray  # [c, c]
    n_seeds: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nested lists, NaN as ``None``."""
        return {
            "names": list(self.names),
            "mean": _json_matrix(self.mean),
            "std": _json_matrix(self.std),
            "n_seeds": self.n_seeds,
        }


def _json_matrix(values: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in values.tolist()]


def mean_where_defined(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean over ``axis`` of the entries that are not NaN; NaN where none is.

    What :func:`numpy.nanmean` gives, without its warning on an all-NaN slice (a pair of
    criteria whose sets are empty in every layer, or a layer empty in every seed).
    """
    present = ~np.isnan(values)
    count = present.sum(axis=axis)
    total = np.where(present, values, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(count), math.nan), where=count > 0)


def std_where_defined(values: np.ndarray, ddof: int, axis: int = 0) -> np.ndarray:
    """The std over ``axis`` (the seeds) of the entries that are not NaN: it counts only the
    seeds with a value, and is NaN (without a warning) where fewer than ddof + 1 have one."""
    present = ~np.isnan(values)
    count = present.sum(axis=axis)
    mean = np.expand_dims(mean_where_defined(values, axis), axis)
    squares = np.where(present, (values - mean) ** 2, 0.0).sum(axis=axis)
    variance = np.divide(
        squares, count - ddof, out=np.full(np.shape(count), math.nan), where=count > ddof
    )
    return np.sqrt(variance)


def seeds_then_layers(per_layer: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Appendix K's aggregation of removal-set indices ``per_layer`` [S, ..., L] (seeds first,
    layers last): the mean over seeds for each layer, then over layers; the std over seeds
    for each layer, then averaged over layers. Both skip what is NaN (a layer where both sets
    are empty in that seed; a layer's std with fewer than ddof + 1 seeds): [...]."""
    mean = mean_where_defined(mean_where_defined(per_layer, axis=0), axis=-1)
    std = mean_where_defined(std_where_defined(per_layer, ddof, axis=0), axis=-1)
    return mean, std


def removal_jaccard_over_seeds(
    per_seed: Sequence[Mapping[str, Masks]], names: Sequence[str], *, ddof: int = 1
) -> JaccardStats:
    """Removal-set Jaccard over seeds as Appendix K computes it (Figures 6a, 17, 20).

    The mean is taken over seeds for each layer, then over layers; the std is taken over
    seeds for each layer, then averaged over layers (:func:`seeds_then_layers`: a layer whose
    sets are empty in some seeds averages over the others). ``per_seed[s]`` is one seed's
    :func:`removal_sets`. ``ddof`` = 1 is the sample std, as the service's results tables.
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    per_layer = np.stack([layer_jaccard_matrix(sets, names) for sets in per_seed])  # [S, c, c, L]
    mean, std = seeds_then_layers(per_layer, ddof)  # [c, c], [c, c]
    return JaccardStats(list(names), mean, std, len(per_seed))


def end_mask_jaccard_over_seeds(
    per_seed: Sequence[Mapping[str, Masks]], names: Sequence[str], *, ddof: int = 1
) -> JaccardStats:
    """End-mask Jaccard over seeds as Appendix K computes it (Figures 6b, 21).

    Per seed the index is averaged over layers (Eq. 1); then mean and std are taken over
    the seeds where it has a value. ``per_seed[s]`` maps each name to that seed's end masks
    (all runs of a seed start from the same initial masks; add ``"init"`` for the comparison
    with the initialization).
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    per_run = np.stack([jaccard_matrix(masks, names) for masks in per_seed])  # [S, c, c]
    return JaccardStats(
        list(names),
        mean_where_defined(per_run, axis=0),
        std_where_defined(per_run, ddof, axis=0),
        len(per_seed),
    )


# -- reference overlaps of Figure 6 -------------------------------------------------------------
def mean_pairwise_jaccard(sets: Sequence[Masks]) -> float:
    """The mean of J̄ (Eq. 1) over the unordered pairs of ``sets`` that have one (NaN when no
    pair has: every set empty in every layer)."""
    if len(sets) < 2:
        raise ValueError("a pairwise mean needs at least two sets")
    return defined_mean(mean_jaccard(a, b) for a, b in itertools.combinations(sets, 2))


def initial_mask_reference(initial_masks: Sequence[Masks]) -> float:
    """J_init (Figure 6b): the mean pairwise Jaccard of the initial masks of different seeds,
    the overlap expected of unrelated random masks of the same densities."""
    return mean_pairwise_jaccard(initial_masks)


def random_removal_reference(
    initial_masks: Sequence[Masks],
    prune_fraction: float,
    *,
    scope: Scope = "local",
    generator: torch.Generator | None = None,
) -> float:
    """J_r (Figure 6a) as the paper estimates it: "the mean pair-wise Jaccard index of the
    random pruning criterion with different sparse initialization", i.e. random removal sets
    drawn from the initial masks of different seeds.

    Sets drawn from different masks can only share weights active in both masks, so J_r is
    below the overlap of two random removal sets from one network state; it is the paper's
    reference point, not a chance level for the criteria compared within one state. The sets
    come from :func:`removal_sets` with the random criterion (which ignores weights and
    gradients), so their sizes are those of a real update at ``prune_fraction``; NaN when
    that update removes nothing at all.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    sets = [
        removal_sets(
            {name: torch.zeros(m.shape, device=m.device) for name, m in masks.items()},
            None,
            masks,
            ["random"],
            prune_fraction,
            scope=scope,
            generator=gen,
        )["random"]
        for masks in initial_masks
    ]
    return mean_pairwise_jaccard(sets)
