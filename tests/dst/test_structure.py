"""Hand-worked oracles for the structural similarity analysis (Eq. 1, Section 5.4, Appendix K)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dst.criteria import CRITERIA, resolve_criterion
from dst.growth import GROWTH
from dst.masks import Masks, apply_masks, init_masks, prunable_weights, random_mask
from dst.schedules import PruneSchedule
from dst.structure import (
    consensus,
    defined_mean,
    end_mask_jaccard_over_seeds,
    initial_mask_reference,
    jaccard,
    jaccard_matrix,
    layer_jaccard_matrix,
    layer_jaccards,
    mean_jaccard,
    mean_pairwise_jaccard,
    over_time_jaccard,
    random_removal_reference,
    removal_jaccard_over_seeds,
    removal_sets,
    seeds_then_layers,
    std_where_defined,
)
from dst.topology import TopologyUpdater


def t(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def positions(n: int, *idx: int) -> torch.Tensor:
    """A flat bool set of size ``n`` holding ``idx``."""
    out = torch.zeros(n, dtype=torch.bool)
    out[list(idx)] = True
    return out


# -- Eq. (1) ------------------------------------------------------------------------------------
def test_jaccard_hand_worked() -> None:
    assert jaccard(t(1, 1, 0, 0), t(0, 1, 1, 0)) == pytest.approx(1 / 3)
    assert jaccard(t(1, 1, 1, 0), t(0, 1, 1, 1)) == pytest.approx(2 / 4)
    assert jaccard(t(1, 0), t(1, 0)) == 1.0
    assert jaccard(t(1, 0), t(0, 1)) == 0.0


def test_jaccard_of_two_empty_sets_is_undefined_and_of_one_empty_set_zero() -> None:
    assert math.isnan(jaccard(t(0, 0), t(0, 0)))
    assert jaccard(t(0, 0), t(0, 1)) == 0.0


def test_the_layer_average_leaves_out_layers_where_both_sets_are_empty() -> None:
    """l1: {0, 1} vs {1, 2} = 1/3; l2 removes nothing in either set: J̄ = 1/3, not (1/3 + 1)/2.
    With nothing removed anywhere the pair has no index at all."""
    a = {"l1": t(1, 1, 0), "l2": t(0, 0)}
    b = {"l1": t(0, 1, 1), "l2": t(0, 0)}
    per_layer = layer_jaccards(a, b)
    assert per_layer["l1"] == pytest.approx(1 / 3) and math.isnan(per_layer["l2"])
    assert mean_jaccard(a, b) == pytest.approx(1 / 3)
    nothing = {"l1": t(0, 0, 0), "l2": t(0, 0)}
    assert math.isnan(mean_jaccard(nothing, nothing))
    assert defined_mean([math.nan, 0.2, 0.4]) == pytest.approx(0.3)
    assert math.isnan(defined_mean([math.nan]))


def test_a_late_update_that_removes_nothing_is_not_identical_sets() -> None:
    """At ρ = 1e-4 no layer of a small net removes a weight (k rounds to 0): every pair of
    criteria, random included, has no index; the diagonal stays 1. Nothing warns."""
    weights, masks = small_trained_mlp(0)
    grads = {name: w.grad for name, w in weights.items()}
    names = ["magnitude", "snip", "random"]
    sets = removal_sets(weights, grads, masks, names, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matrix = jaccard_matrix(sets, names)
        stats = removal_jaccard_over_seeds([sets, sets], names)
    np.testing.assert_array_equal(np.diag(matrix), [1.0, 1.0, 1.0])
    assert np.isnan(matrix[~np.eye(3, dtype=bool)]).all()
    assert np.isnan(stats.mean[0, 1]) and np.isnan(stats.std[0, 1])
    assert stats.to_dict()["mean"][0] == [1.0, None, None]


def test_layer_jaccards_and_their_mean_on_two_layer_masks() -> None:
    a = {"l1": t(1, 1, 0, 0).view(2, 2), "l2": t(1, 0, 1)}
    b = {"l1": t(0, 1, 1, 0).view(2, 2), "l2": t(1, 0, 0)}
    assert layer_jaccards(a, b) == pytest.approx({"l1": 1 / 3, "l2": 1 / 2})
    assert mean_jaccard(a, b) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_mean_jaccard_needs_the_same_nonempty_layers() -> None:
    with pytest.raises(ValueError, match="same layers"):
        mean_jaccard({"l1": t(1)}, {"l2": t(1)})
    with pytest.raises(ValueError, match="at least one layer"):
        mean_jaccard({}, {})


# -- removal sets on a hand-worked 4x4 layer ----------------------------------------------------
# Active flat positions with (θ, ∇θ); inactive weights are zero (as in training) and have a
# dense gradient of 0.5, which no criterion may pick up.
LAYER = {
    0: (0.10, 0.90),
    2: (0.20, 0.05),
    5: (0.30, 0.60),
    7: (-0.40, 0.02),
    8: (-0.50, 0.45),
    10: (0.60, -0.01),
    13: (-0.70, 0.35),
    15: (-0.80, -0.12),
}
# ρ = 0.5 of 8 active weights: k = 4, the 4 lowest scores.
EXPECTED = {
    # |θ|: 0.1 0.2 0.3 0.4 | 0.5 0.6 0.7 0.8
    "magnitude": {0, 2, 5, 7},
    # θ >= 0 by |θ|: 0 (0.1), 2 (0.2) | 5, 10; θ < 0: 7 (0.4), 8 (0.5) | 13, 15
    "set": {0, 2, 7, 8},
    # |θ| + |∇θ|: 2: 0.25, 7: 0.42, 10: 0.61, 5: 0.90 | 15: 0.92, 8: 0.95, 0: 1.0, 13: 1.05
    "mest": {2, 5, 7, 10},
    # |∇θ| / |θ|: 10: 0.017, 7: 0.05, 15: 0.15, 2: 0.25 | 13: 0.5, 8: 0.9, 5: 2, 0: 9
    "sensitivity": {2, 7, 10, 15},
    # |θ| / |∇θ|: 0: 0.11, 5: 0.5, 8: 1.11, 13: 2 | 2: 4, 15: 6.7, 7: 20, 10: 60
    "rsensitivity": {0, 5, 8, 13},
    # |θ ∇θ|: 10: 0.006, 7: 0.008, 2: 0.01, 0: 0.09 | 15: 0.096, 5: 0.18, 8: 0.225, 13: 0.245
    "snip": {0, 2, 7, 10},
    # torch.rand(4, 4) from seed 0 at the active positions: 2: 0.089, 13: 0.169, 10: 0.349,
    # 8: 0.456 | 0: 0.496, 15: 0.519, 5: 0.634, 7: 0.896
    "random": {2, 8, 10, 13},
}


def hand_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, grad, mask) of the 4x4 layer above."""
    weight, grad = torch.zeros(16), torch.full((16,), 0.5)  # [16], [16]
    mask = torch.zeros(16, dtype=torch.bool)  # [16]
    for pos, (w, g) in LAYER.items():
        weight[pos], grad[pos], mask[pos] = w, g, True
    return weight.view(4, 4), grad.view(4, 4), mask.view(4, 4)


def flat_set(mask: torch.Tensor) -> set[int]:
    return set(mask.flatten().nonzero().flatten().tolist())


def test_every_registered_criterion_has_a_hand_worked_removal_set() -> None:
    assert set(EXPECTED) == set(CRITERIA.names())


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_removal_set_of_each_criterion_on_a_4x4_layer(criterion: str) -> None:
    weight, grad, mask = hand_layer()
    sets = removal_sets(
        {"l": weight},
        {"l": grad},
        {"l": mask},
        [criterion],
        0.5,
        generator=torch.Generator().manual_seed(0),
    )
    removed = sets[criterion]["l"]
    assert removed.shape == (4, 4) and removed.dtype == torch.bool
    assert flat_set(removed) == EXPECTED[criterion]


def test_removal_sets_leave_the_state_untouched() -> None:
    weight, grad, mask = hand_layer()
    before = (weight.clone(), grad.clone(), mask.clone())
    removal_sets({"l": weight}, {"l": grad}, {"l": mask}, CRITERIA.names(), 0.5)
    for now, then in zip((weight, grad, mask), before, strict=True):
        assert torch.equal(now, then)


def test_removal_set_size_is_the_prune_fraction_of_active_weights_rounded_half_up() -> None:
    weight, grad, mask = hand_layer()
    for fraction, k in ((0.3, 2), (0.3125, 3), (0.0, 0), (1.0, 8)):  # 2.4, 2.5, 0, 8
        sets = removal_sets({"l": weight}, {"l": grad}, {"l": mask}, ["magnitude"], fraction)
        assert len(flat_set(sets["magnitude"]["l"])) == k


def test_gradient_criteria_need_gradients() -> None:
    weight, _, mask = hand_layer()
    assert (
        flat_set(removal_sets({"l": weight}, None, {"l": mask}, ["set"], 0.5)["set"]["l"])
        == (EXPECTED["set"])
    )
    with pytest.raises(ValueError, match="gradient"):
        removal_sets({"l": weight}, None, {"l": mask}, ["snip"], 0.5)


def test_mest_lambda_is_bound() -> None:
    """λ = 10 lets the gradient lead: |θ| + 10|∇θ| = 7: 0.6, 2: 0.7, 10: 0.7, 15: 2.0 |
    13: 4.2, 8: 5.0, 5: 6.3, 0: 9.1 (λ = 1 gives {2, 5, 7, 10})."""
    weight, grad, mask = hand_layer()
    sets = removal_sets({"l": weight}, {"l": grad}, {"l": mask}, ["mest"], 0.5, mest_lambda=10.0)
    assert flat_set(sets["mest"]["l"]) == {2, 7, 10, 15}


def small_trained_mlp(seed: int) -> tuple[dict[str, nn.Parameter], Masks]:
    """A two-layer MLP at density 0.4 with the gradient of one batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    weights = prunable_weights(model)
    masks = init_masks(weights, dict.fromkeys(weights, 0.4), torch.Generator().manual_seed(seed))
    apply_masks(weights, masks)
    gen = torch.Generator().manual_seed(seed + 100)
    x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    return weights, masks


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_removal_sets_are_what_a_topology_update_prunes(criterion: str, scope: str) -> None:
    weights, masks = small_trained_mlp(0)
    grads = {name: w.grad for name, w in weights.items()}
    sets = removal_sets(
        weights,
        grads,
        masks,
        [criterion],
        0.3,
        scope=scope,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(7),
    )[criterion]
    updater = TopologyUpdater(
        resolve_criterion(criterion),
        GROWTH.get("random"),
        PruneSchedule("constant", 0.3, 1, 100),
        scope,  # type: ignore[arg-type]
        torch.Generator().manual_seed(7),
    )
    changes = updater.update(weights, masks, None, 1)
    for name, change in changes.items():
        assert flat_set(sets[name]) == set(change.pruned.tolist())
        assert len(change.pruned) > 0


# -- criterion x criterion matrices -------------------------------------------------------------
def hand_sets() -> dict[str, Masks]:
    weight, grad, mask = hand_layer()
    return removal_sets({"l": weight}, {"l": grad}, {"l": mask}, CRITERIA.names(), 0.5)


def test_jaccard_matrix_of_the_4x4_removal_sets() -> None:
    names = ["magnitude", "set", "rsensitivity", "snip"]
    # magnitude {0,2,5,7}, set {0,2,7,8}, rsensitivity {0,5,8,13}, snip {0,2,7,10}
    expected = np.array(
        [
            [1, 3 / 5, 2 / 6, 3 / 5],
            [3 / 5, 1, 2 / 6, 3 / 5],
            [2 / 6, 2 / 6, 1, 1 / 7],
            [3 / 5, 3 / 5, 1 / 7, 1],
        ]
    )
    np.testing.assert_allclose(jaccard_matrix(hand_sets(), names), expected)


def test_layer_jaccard_matrix_keeps_layers_and_the_matrix_averages_them() -> None:
    sets = {
        "a": {"l1": positions(4, 0, 1), "l2": positions(3, 0)},
        "b": {"l1": positions(4, 1, 2), "l2": positions(3, 0)},
        "c": {"l1": positions(4, 3), "l2": positions(3, 2)},
    }
    per_layer = layer_jaccard_matrix(sets, ["a", "b", "c"])
    assert per_layer.shape == (3, 3, 2)
    np.testing.assert_allclose(per_layer[0, 1], [1 / 3, 1.0])
    np.testing.assert_allclose(per_layer[1, 2], [0.0, 0.0])
    np.testing.assert_allclose(
        jaccard_matrix(sets, ["a", "b", "c"]),
        [[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 1]],
    )


def test_over_time_matrices_are_measured_in_the_row_run_and_need_not_be_symmetric() -> None:
    s = {i: {"l": positions(6, *idx)} for i, idx in enumerate([(0, 1), (1, 2), (4, 5), (0, 1, 2)])}
    runs = {
        # in a's run: update 0 a = {0,1}, b would take {1,2}; update 1 a = {4,5}, b {4,5}
        "a": [{"a": s[0], "b": s[1]}, {"a": s[2], "b": s[2]}],
        # in b's run: update 0 b = {0,1,2}, a would take {0,1}; update 1 b = {1,2}, a {4,5}
        "b": [{"a": s[0], "b": s[3]}, {"a": s[2], "b": s[1]}],
    }
    first, second = over_time_jaccard(runs, ["a", "b"])
    np.testing.assert_allclose(first, [[1, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(second, [[1, 1], [0, 1]])


def test_over_time_needs_runs_of_equal_length() -> None:
    sets = {"a": {"l": t(1, 0)}, "b": {"l": t(0, 1)}}
    with pytest.raises(ValueError, match="same number of updates"):
        over_time_jaccard({"a": [sets], "b": [sets, sets]}, ["a", "b"])


# -- Figure 19 ----------------------------------------------------------------------------------
def test_consensus_counts_weights_kept_and_removed_by_every_criterion() -> None:
    # 2 layers, 10 weights, 4 kept by each criterion
    masks = {
        "a": {"l1": t(1, 1, 0, 0, 0, 0), "l2": t(1, 1, 0, 0)},
        "b": {"l1": t(1, 0, 1, 0, 0, 0), "l2": t(1, 1, 0, 0)},
        "c": {"l1": t(1, 1, 0, 0, 0, 0), "l2": t(1, 0, 1, 0)},
    }
    # kept by all: l1 {0}, l2 {0} -> 2 of 4; removed by all: l1 {3,4,5}, l2 {3} -> 4 of 6
    result = consensus(masks)
    assert result.kept_by_all == pytest.approx(2 / 4)
    assert result.removed_by_all == pytest.approx(4 / 6)


def test_consensus_needs_masks_of_one_density() -> None:
    with pytest.raises(ValueError, match="different numbers"):
        consensus({"a": {"l": t(1, 1, 0)}, "b": {"l": t(1, 0, 0)}})


# -- Appendix K: seeds --------------------------------------------------------------------------
def crossing_seeds() -> list[dict[str, Masks]]:
    """Two seeds of a and b over two layers: J per layer is (1, 0) in seed 1, (0, 1) in seed 2."""
    same, other = positions(2, 0), positions(2, 1)
    return [
        {"a": {"l1": same, "l2": same}, "b": {"l1": same, "l2": other}},
        {"a": {"l1": same, "l2": same}, "b": {"l1": other, "l2": same}},
    ]


def test_removal_jaccard_averages_seeds_per_layer_then_layers() -> None:
    stats = removal_jaccard_over_seeds(crossing_seeds(), ["a", "b"])
    # per layer over seeds: mean (0.5, 0.5), sample std (0.707, 0.707): the std stays
    np.testing.assert_allclose(stats.mean, [[1, 0.5], [0.5, 1]])
    np.testing.assert_allclose(stats.std, [[0, np.sqrt(0.5)], [np.sqrt(0.5), 0]])
    assert stats.n_seeds == 2
    pop = removal_jaccard_over_seeds(crossing_seeds(), ["a", "b"], ddof=0)
    np.testing.assert_allclose(pop.std, [[0, 0.5], [0.5, 0]])


def test_end_mask_jaccard_averages_layers_per_seed_then_seeds() -> None:
    stats = end_mask_jaccard_over_seeds(crossing_seeds(), ["a", "b"])
    # per seed over layers: 0.5 and 0.5, so the std over seeds vanishes
    np.testing.assert_allclose(stats.mean, [[1, 0.5], [0.5, 1]])
    np.testing.assert_allclose(stats.std, [[0, 0], [0, 0]])


def test_end_mask_std_over_seeds_of_uneven_seeds() -> None:
    seeds = [
        {"a": {"l": positions(4, 0, 1)}, "init": {"l": positions(4, 0, 1)}},
        {"a": {"l": positions(4, 0, 1)}, "init": {"l": positions(4, 1, 2)}},
    ]
    stats = end_mask_jaccard_over_seeds(seeds, ["a", "init"])
    assert stats.mean[0, 1] == pytest.approx((1 + 1 / 3) / 2)
    assert stats.std[0, 1] == pytest.approx(np.std([1, 1 / 3], ddof=1))


def test_a_layer_empty_in_one_seed_averages_over_the_others() -> None:
    """Three seeds of a and b over layers l1, l2. l1: J = 1, 0, 1/2 (no empty set). l2: both
    empty in seeds 1 and 2 (NaN), J = 1 in seed 3. Appendix K for removal sets: l1 mean 1/2,
    sample std 1/2; l2 mean 1 (its one seed), std undefined (one seed): mean (1/2 + 1) / 2,
    std 1/2 (l1's alone). End masks: per seed 1, 0, (1/2 + 1) / 2 = 3/4, so mean 7/12 and the
    sample std of (1, 0, 3/4)."""
    one, other, both, none = positions(2, 0), positions(2, 1), positions(2, 0, 1), positions(2)
    seeds = [
        {"a": {"l1": one, "l2": none}, "b": {"l1": one, "l2": none}},
        {"a": {"l1": one, "l2": none}, "b": {"l1": other, "l2": none}},
        {"a": {"l1": one, "l2": one}, "b": {"l1": both, "l2": one}},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        removal = removal_jaccard_over_seeds(seeds, ["a", "b"])
        end = end_mask_jaccard_over_seeds(seeds, ["a", "b"])
    assert removal.mean[0, 1] == pytest.approx((0.5 + 1.0) / 2)
    assert removal.std[0, 1] == pytest.approx(0.5)
    assert end.mean[0, 1] == pytest.approx(7 / 12)
    assert end.std[0, 1] == pytest.approx(np.std([1.0, 0.0, 0.75], ddof=1))
    np.testing.assert_allclose(np.diag(removal.mean), [1.0, 1.0])


def test_seeds_then_layers_and_the_std_count_only_the_seeds_with_a_value() -> None:
    nan = math.nan
    per_layer = np.array([[0.2, nan, nan], [0.4, 0.6, nan]])  # [seeds, layers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = seeds_then_layers(per_layer)
        np.testing.assert_allclose(std_where_defined(per_layer, 0), [0.1, 0.0, nan], equal_nan=True)
    assert float(mean) == pytest.approx((0.3 + 0.6) / 2)  # l3 has no value in any seed
    assert float(std) == pytest.approx(np.std([0.2, 0.4], ddof=1))  # l2's one seed: no std


def test_one_seed_has_no_std_and_serializes_it_as_null() -> None:
    stats = end_mask_jaccard_over_seeds(crossing_seeds()[:1], ["a", "b"])
    assert np.isnan(stats.std).all()
    data = json.loads(json.dumps(stats.to_dict(), allow_nan=False))
    assert data["std"] == [[None, None], [None, None]]
    assert data["mean"] == [[1.0, 0.5], [0.5, 1.0]]
    assert data["names"] == ["a", "b"]


# -- reference overlaps -------------------------------------------------------------------------
def test_initial_mask_reference_is_the_mean_pairwise_jaccard() -> None:
    masks = [{"l": positions(4, 0, 1)}, {"l": positions(4, 1, 2)}, {"l": positions(4, 0, 1)}]
    # pairs: 1/3, 1, 1/3
    assert initial_mask_reference(masks) == pytest.approx(5 / 9)
    assert mean_pairwise_jaccard(masks) == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_jaccard(masks[:1])


def test_j_r_leaves_out_layers_a_small_update_removes_nothing_from() -> None:
    """Layer "big" (1000 weights at density 1) loses round(0.002 · 1000) = 2 weights, layer
    "small" (10 weights) round(0.02) = 0: J_r is big's alone (two random 2-subsets of the
    same 1000 weights: near 0), not lifted towards (J_big + 1) / 2 by the empty layer."""
    masks = [
        {"big": torch.ones(1000, dtype=torch.bool), "small": torch.ones(10, dtype=torch.bool)}
        for _ in range(3)
    ]
    assert random_removal_reference(masks, 0.002) < 0.1
    assert math.isnan(random_removal_reference(masks, 1e-5))  # nothing removed anywhere


def random_masks(seeds: int, n: int, density: float) -> list[Masks]:
    active = round(density * n)
    return [
        {"l": random_mask((n,), active, torch.Generator().manual_seed(s))} for s in range(seeds)
    ]


def test_removing_everything_makes_j_r_equal_j_init() -> None:
    masks = random_masks(3, 200, 0.3)
    assert random_removal_reference(masks, 1.0) == pytest.approx(initial_mask_reference(masks))


def test_references_match_the_overlap_of_independent_uniform_subsets() -> None:
    """Independent uniform subsets holding a fraction p of n positions overlap with
    J ≈ p² / (2p - p²) = p / (2 - p): p = d for masks, p = ρd for removal sets."""
    masks = random_masks(3, 100_000, 0.2)
    assert initial_mask_reference(masks) == pytest.approx(0.2 / 1.8, abs=3e-3)
    assert random_removal_reference(masks, 0.5) == pytest.approx(0.1 / 1.9, abs=3e-3)
