"""Hand-worked oracles for every pruning criterion (Section 3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from dst.criteria import CRITERIA, resolve_criterion, safe_ratio
from dst.registry import UnknownNameError
from dst.selection import select_pruned

GEN = torch.Generator().manual_seed(0)


def pruned(name: str, w: list[float], g: list[float] | None, k: int, mask=None, **kw) -> set[int]:
    weight = torch.tensor(w)
    grad = torch.tensor(g) if g is not None else None
    m = torch.ones(len(w), dtype=torch.bool) if mask is None else torch.tensor(mask)
    scores = resolve_criterion(name, **kw).score(weight, grad, m, GEN)
    return set(select_pruned(scores, m, k).tolist())


def test_magnitude_prunes_smallest_absolute_values() -> None:
    w = [0.5, -0.1, 0.3, -0.7, 0.05, 0.9, -0.2, 0.4]
    assert pruned("magnitude", w, None, 3) == {4, 1, 6}


def test_inactive_weights_are_never_chosen() -> None:
    w = [0.5, -0.1, 0.3, -0.7, 0.05, 0.9, -0.2, 0.4]
    mask = [True, True, True, True, False, True, True, True]  # 0.05 is inactive
    assert pruned("magnitude", w, None, 3, mask) == {1, 6, 2}


def test_set_prunes_equal_numbers_of_positive_and_negative() -> None:
    # All positives are smaller than every negative: magnitude takes only positives.
    w = [0.1, 0.2, 0.3, 0.4, -0.9, -0.8, -0.7, -0.6]
    assert pruned("magnitude", w, None, 4) == {0, 1, 2, 3}
    assert pruned("set", w, None, 4) == {0, 1, 7, 6}


def test_set_balance_on_random_layer() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=gen) + 0.3  # skewed: more positives than negatives
    mask = torch.rand(64, 32, generator=gen) < 0.5
    k = 200
    idx = select_pruned(CRITERIA.get("set").score(w, None, mask, GEN), mask, k)
    chosen = w.flatten()[idx]
    assert len(idx) == k and mask.flatten()[idx].all()
    assert int((chosen >= 0).sum()) == int((chosen < 0).sum()) == k // 2
    # within each sign group SET takes exactly the ones closest to zero
    active = w.flatten()[mask.flatten()]
    pos = active[active >= 0].sort().values[: k // 2]
    neg = active[active < 0].abs().sort().values[: k // 2]
    assert torch.equal(chosen[chosen >= 0].sort().values, pos)
    assert torch.equal(chosen[chosen < 0].abs().sort().values, neg)


def test_set_exhausts_a_small_sign_group_then_takes_the_other() -> None:
    w = [-0.5, 0.1, 0.2, 0.3, 0.4]  # one negative weight only
    assert pruned("set", w, None, 3) == {0, 1, 2}


def test_set_ranks_are_exact_past_what_a_bf16_weight_can_count() -> None:
    """400 distinct bf16 weights of one sign: ranks 0..399 exactly (bf16 holds integers
    exactly only to 256), so the 300 pruned are the 300 smallest."""
    w = (2.0 ** (-torch.arange(400.0) / 32)).bfloat16()  # distinct in bf16, descending
    assert len(set(w.tolist())) == 400
    mask = torch.ones(400, dtype=torch.bool)
    scores = CRITERIA.get("set").score(w, None, mask, GEN)
    assert sorted(scores.tolist()) == list(range(400))
    assert set(select_pruned(scores, mask, 300).tolist()) == set(range(100, 400))


def test_mest_adds_lambda_times_gradient() -> None:
    w, g = [0.1, 0.2, 0.3], [1.0, 0.0, 0.0]
    assert pruned("mest", w, g, 1, mest_lambda=1.0) == {1}
    assert pruned("mest", w, g, 1, mest_lambda=0.0) == {0}


def test_sensitivity_and_reciprocal() -> None:
    w, g = [0.1, 0.2, 0.4, 0.0], [0.1, 0.1, 0.8, 0.0]
    # |g|/|w| = [1, 0.5, 2, 0/0 = 0]
    assert pruned("sensitivity", w, g, 2) == {3, 1}
    # |w|/|g| = [1, 2, 0.5, 0/0 = 0]
    assert pruned("rsensitivity", w, g, 2) == {3, 2}


def test_zero_denominators() -> None:
    ratio = safe_ratio(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 4.0]))
    assert ratio.tolist() == [math.inf, 0.0, 0.5]
    # a weight with zero gradient is the most important one for RSensitivity
    assert pruned("rsensitivity", [0.1, 0.2], [0.0, 1.0], 1) == {1}


def test_snip_is_absolute_taylor_product() -> None:
    w, g = [0.5, -0.1, 2.0, 0.3], [0.1, -2.0, 0.01, 0.5]
    # |w g| = [0.05, 0.2, 0.02, 0.15]
    assert pruned("snip", w, g, 2) == {2, 0}


def test_ties_go_to_the_lowest_index() -> None:
    assert pruned("magnitude", [0.3, -0.3, 0.3, 0.3], None, 2) == {0, 1}


def test_nan_scores_are_pruned_first() -> None:
    assert pruned("magnitude", [0.3, float("nan"), 0.1], None, 1) == {1}


def test_random_is_reproducible_and_only_active() -> None:
    w = torch.randn(100)
    mask = torch.arange(100) % 2 == 0
    a = CRITERIA.get("random").score(w, None, mask, torch.Generator().manual_seed(1))
    b = CRITERIA.get("random").score(w, None, mask, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert mask[select_pruned(a, mask, 20)].all()


@pytest.mark.parametrize("name", ["mest", "sensitivity", "rsensitivity", "snip"])
def test_gradient_criteria_need_the_gradient(name: str) -> None:
    crit = CRITERIA.get(name)
    assert crit.needs_grad
    with pytest.raises(ValueError, match="gradient"):
        crit.score(torch.ones(3), None, torch.ones(3, dtype=torch.bool), GEN)


def test_all_six_paper_criteria_and_random_are_registered() -> None:
    assert CRITERIA.names() == [
        "magnitude",
        "set",
        "mest",
        "sensitivity",
        "rsensitivity",
        "snip",
        "random",
    ]


def test_unknown_criterion_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="valid criterion names: magnitude, set"):
        resolve_criterion("magnitud")
