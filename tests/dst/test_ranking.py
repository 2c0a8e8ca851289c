"""Hand-worked oracles for the average ranks, Friedman's test and the Nemenyi critical distance
of Figure 3 (Section 5.2; Demšar 2006)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from dst.ranking import (
    Score,
    accuracy_table,
    average_ranks,
    cliques,
    critical_distance,
    density_filter,
    friedman_test,
    nemenyi_q,
    rank_criteria,
    scores_from_records,
)


def table_scores(table: dict[str, list[float]], seeds: int = 1) -> list[Score]:
    """One score per criterion, group (the row index) and seed from a column table."""
    return [
        Score(criterion, (row,), seed, acc)
        for criterion, column in table.items()
        for row, acc in enumerate(column)
        for seed in range(seeds)
    ]


# -- ranks --------------------------------------------------------------------------------------
def test_average_ranks_best_is_one_and_ties_share_the_mean_rank() -> None:
    values = np.array([[0.9, 0.8, 0.8], [0.7, 0.9, 0.6]])
    # row 1: 1, 2.5, 2.5; row 2: 2, 1, 3
    np.testing.assert_allclose(average_ranks(values), [1.5, 1.75, 2.75])


def test_seeds_are_averaged_before_ranking() -> None:
    """a wins two of three seeds but loses on the mean (0.7 vs 0.8): b ranks first."""
    scores = [
        Score("a", ("g",), 0, 0.90),
        Score("a", ("g",), 1, 0.90),
        Score("a", ("g",), 2, 0.30),
        Score("b", ("g",), 0, 0.80),
        Score("b", ("g",), 1, 0.80),
        Score("b", ("g",), 2, 0.80),
    ]
    table = accuracy_table(scores)
    np.testing.assert_allclose(table.values, [[0.7, 0.8]])
    ranking = rank_criteria(scores)
    assert ranking.criteria == ["b", "a"]
    assert ranking.average_ranks == {"a": 2.0, "b": 1.0}


def test_equal_accuracies_in_another_seed_order_tie() -> None:
    """a's seeds give 0.1, 0.2, 0.3 and b's 0.3, 0.2, 0.1: the same mean 0.2 (a float sum in
    seed order gives 0.20000000000000004 and 0.19999999999999998), so both rank 1.5."""
    scores = [
        *(Score("a", ("g",), seed, acc) for seed, acc in enumerate((0.1, 0.2, 0.3))),
        *(Score("b", ("g",), seed, acc) for seed, acc in enumerate((0.3, 0.2, 0.1))),
    ]
    table = accuracy_table(scores)
    assert table.values[0, 0] == table.values[0, 1]
    assert rank_criteria(scores).average_ranks == {"a": 1.5, "b": 1.5}


def test_equal_totals_of_correct_predictions_tie() -> None:
    """247 + 258 + 254 = 247 + 260 + 252 = 759 of 3 x 270 test examples: both criteria have
    the mean accuracy 759 / 810, though the per-seed fractions sum to different floats."""
    scores = [
        *(Score("a", ("g",), seed, n / 270) for seed, n in enumerate((247, 258, 254))),
        *(Score("b", ("g",), seed, n / 270) for seed, n in enumerate((247, 260, 252))),
        *(Score("c", ("g",), seed, n / 270) for seed, n in enumerate((250, 250, 250))),
    ]
    assert rank_criteria(scores).average_ranks == {"a": 1.5, "b": 1.5, "c": 3.0}


def test_ranks_average_over_groups_of_several_fields() -> None:
    rows = [
        {"criterion": c, "group": g, "seed": 0, "test_acc": acc}
        for g, accs in {
            ("mlp", "cifar10", "random", 0.1): (0.5, 0.6, 0.7),
            ("mlp", "cifar10", "gradient", 0.1): (0.6, 0.5, 0.7),
            ("cnn", "cifar10", "random", 0.1): (0.7, 0.7, 0.5),
        }.items()
        for c, acc in zip(("a", "b", "c"), accs, strict=True)
    ]
    ranking = rank_criteria(rows)
    # ranks per group: (3, 2, 1), (2, 3, 1), (1.5, 1.5, 3)
    assert ranking.average_ranks == pytest.approx({"a": 6.5 / 3, "b": 6.5 / 3, "c": 5 / 3})
    assert ranking.criteria[0] == "c"
    assert ranking.n_groups == 3


def test_incomplete_groups_are_dropped_and_listed() -> None:
    scores = [*table_scores({"a": [0.9, 0.8], "b": [0.7, 0.9]}), Score("a", (2,), 0, 0.5)]
    ranking = rank_criteria(scores)
    assert ranking.groups == [(0,), (1,)]
    assert ranking.dropped_groups == [(2,)]


def test_given_criteria_fix_the_columns() -> None:
    scores = table_scores({"a": [0.9, 0.8], "b": [0.7, 0.9], "c": [0.1, 0.2]})
    table = accuracy_table(scores, ["c", "a"])
    assert table.criteria == ["c", "a"]
    np.testing.assert_allclose(table.values, [[0.1, 0.9], [0.2, 0.8]])


def test_a_repeated_seed_or_a_non_finite_accuracy_is_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        accuracy_table([Score("a", (0,), 0, 0.5), Score("a", (0,), 0, 0.6)])
    with pytest.raises(ValueError, match="non-finite"):
        accuracy_table([Score("a", (0,), 0, math.nan)])
    with pytest.raises(ValueError, match="nothing to rank"):
        rank_criteria([Score("a", (0,), 0, 0.5), Score("b", (1,), 0, 0.5)])


def test_scores_from_flat_records() -> None:
    records = [
        {"sparsity.criterion": "snip", "model.name": "mlp", "sparsity.density": 0.1, "seed": 3}
        | {"test_acc": 0.42, "test_loss": 1.0}
    ]
    scores = scores_from_records(
        records, criterion="sparsity.criterion", group=["model.name", "sparsity.density"]
    )
    assert scores == [Score("snip", ("mlp", 0.1), 3, 0.42)]


# -- density split ------------------------------------------------------------------------------
def test_density_filter_splits_at_0_2_inclusive_low() -> None:
    scores = [Score("a", ("mlp", d), 0, 0.5) for d in (0.05, 0.1, 0.2, 0.5, 0.8)]
    densities = {
        split: [s.group[1] for s in scores if density_filter(split, 1)(s)]
        for split in ("all", "low", "high")
    }
    assert densities == {
        "all": [0.05, 0.1, 0.2, 0.5, 0.8],
        "low": [0.05, 0.1, 0.2],
        "high": [0.5, 0.8],
    }
    with pytest.raises(ValueError, match="unknown density split"):
        density_filter("middle", 1)  # type: ignore[arg-type]


def test_rank_criteria_on_a_density_split() -> None:
    """a wins the sparse groups, b the dense ones: the split decides the order."""
    scores = [
        Score(c, ("m", d), 0, acc)
        for d, (acc_a, acc_b) in {0.1: (0.9, 0.8), 0.2: (0.9, 0.8), 0.5: (0.7, 0.8)}.items()
        for c, acc in (("a", acc_a), ("b", acc_b))
    ]
    assert rank_criteria(scores, where=density_filter("low", 1)).criteria == ["a", "b"]
    high = rank_criteria(scores, where=density_filter("high", 1))
    assert high.criteria == ["b", "a"] and high.groups == [("m", 0.5)]


def test_a_split_ranks_every_criterion_of_the_scores() -> None:
    """c has results only at density 0.5 (its runs at 0.1 and 0.2 failed): the low split's
    groups lack c, so they are dropped, not ranked as if the study had a and b only; given
    criteria fix what a split ranks in the same way."""
    scores = [
        Score(c, ("m", d), 0, acc)
        for d, accs in {0.1: (0.9, 0.8, None), 0.2: (0.9, 0.8, None), 0.5: (0.7, 0.8, 0.9)}.items()
        for c, acc in zip(("a", "b", "c"), accs, strict=True)
        if acc is not None
    ]
    with pytest.raises(ValueError, match=r"nothing to rank; c: no result here"):
        rank_criteria(scores, where=density_filter("low", 1))
    mixed = [*scores, Score("c", ("m", 0.2), 0, 0.85)]
    low = rank_criteria(mixed, where=density_filter("low", 1))
    assert low.groups == [("m", 0.2)] and low.dropped_groups == [("m", 0.1)]
    assert low.average_ranks == {"a": 1.0, "b": 3.0, "c": 2.0}
    low_only = [s for s in scores if s.group[1] < 0.5]
    with pytest.raises(ValueError, match="nothing to rank"):
        rank_criteria(low_only, criteria=["a", "b", "c"])


# -- Friedman -----------------------------------------------------------------------------------
def test_friedman_on_a_hand_made_table() -> None:
    """Ranks (1,2,3), (1,2,3), (1,3,2), (2,1,3): rank sums 5, 8, 11.
    χ² = 12 / (N k (k+1)) Σ R² - 3N(k+1) = 12/48 · 210 - 48 = 4.5; with k - 1 = 2 degrees of
    freedom p = exp(-4.5 / 2)."""
    values = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4], [0.9, 0.7, 0.8], [0.8, 0.9, 0.7]])
    result, reason = friedman_test(values)
    assert reason is None and result is not None
    assert result.statistic == pytest.approx(4.5)
    assert result.p_value == pytest.approx(math.exp(-2.25))


def test_friedman_applies_the_tie_correction() -> None:
    """Ranks (1,2,3), (1,2,3), (1.5,1.5,3): rank sums 3.5, 5.5, 9, Σ R² = 123.5, so the
    uncorrected χ² = 12/36 · 123.5 - 36 = 31/6; one tie of two (t³ - t = 6) in
    N(k³ - k) = 72 gives the correction 1 - 6/72 = 11/12, χ² = 31/6 · 12/11 = 62/11."""
    values = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.9, 0.9, 0.7]])
    result, _ = friedman_test(values)
    assert result is not None
    assert result.statistic == pytest.approx(62 / 11)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.array([[0.9, 0.8], [0.7, 0.6]]), "at least 3 criteria, got 2"),
        (np.array([[0.9, 0.8, 0.7]]), "at least 2 groups, got 1"),
        (np.array([[0.5, 0.5, 0.5], [0.7, 0.7, 0.7]]), "ties all criteria"),
    ],
)
def test_friedman_is_skipped_with_a_reason(values: np.ndarray, reason: str) -> None:
    result, why = friedman_test(values)
    assert result is None and why is not None and reason in why


def test_two_criteria_get_a_cd_but_no_friedman() -> None:
    ranking = rank_criteria(table_scores({"a": [0.9, 0.8, 0.7], "b": [0.8, 0.9, 0.6]}))
    assert ranking.friedman is None and ranking.friedman_skipped is not None
    assert ranking.critical_distance == pytest.approx(1.960 * math.sqrt(6 / 18), abs=1e-3)


# -- Nemenyi ------------------------------------------------------------------------------------
DEMSAR_Q_005 = {2: 1.960, 3: 2.343, 4: 2.569, 5: 2.728, 6: 2.850, 7: 2.949}  # Table 5a
DEMSAR_Q_010 = {2: 1.645, 3: 2.052, 4: 2.291, 5: 2.459, 6: 2.589, 7: 2.693}  # Table 5a


@pytest.mark.parametrize("k", sorted(DEMSAR_Q_005))
def test_nemenyi_q_matches_demsar_table(k: int) -> None:
    assert nemenyi_q(k, 0.05) == pytest.approx(DEMSAR_Q_005[k], abs=1e-3)
    assert nemenyi_q(k, 0.10) == pytest.approx(DEMSAR_Q_010[k], abs=1e-3)


def test_critical_distance_for_six_criteria_over_ten_groups() -> None:
    """CD = 2.850 · sqrt(6 · 7 / (6 · 10)) = 2.850 · 0.83666 = 2.3845."""
    assert critical_distance(6, 10) == pytest.approx(2.3845, abs=1e-3)
    assert critical_distance(3, 14) == pytest.approx(2.343 * math.sqrt(12 / 84), abs=1e-3)
    with pytest.raises(ValueError):
        critical_distance(1, 10)


def spread_table(n: int = 12) -> dict[str, list[float]]:
    """Five criteria over ``n`` groups with clearly separated and with close average ranks."""
    rng = np.random.default_rng(0)
    base = {"a": 0.90, "b": 0.89, "c": 0.85, "d": 0.80, "e": 0.79}
    return {c: list(mean + 0.02 * rng.standard_normal(n)) for c, mean in base.items()}


def test_nemenyi_p_values_agree_with_the_critical_distance() -> None:
    ranking = rank_criteria(table_scores(spread_table()))
    cd, p, ranks = ranking.critical_distance, ranking.nemenyi_p, ranking.average_ranks
    assert cd is not None and p is not None
    decisions = set()
    for a, b in itertools.combinations(ranking.criteria, 2):
        assert p[a][b] == p[b][a]
        different = abs(ranks[a] - ranks[b]) > cd
        assert (p[a][b] < ranking.alpha) == different
        decisions.add(different)
    assert decisions == {True, False}  # the example has both kinds of pairs
    assert all(p[c][c] == 1.0 for c in ranking.criteria)


def test_friedman_rejects_on_the_spread_table() -> None:
    ranking = rank_criteria(table_scores(spread_table()))
    assert ranking.friedman is not None and ranking.friedman.p_value < 0.01


# -- cliques ------------------------------------------------------------------------------------
def test_cliques_are_maximal_runs_within_the_critical_distance() -> None:
    ranks = {"d": 3.0, "a": 1.0, "e": 3.1, "b": 1.5, "c": 2.2}
    # from a: b (0.5), not c (1.2); from b: c (0.7), not d (1.5); from c: d, e (0.9);
    # from d: e, inside c's run
    assert cliques(ranks, 1.0) == [["a", "b"], ["b", "c"], ["c", "d", "e"]]
    assert cliques(ranks, 0.05) == []
    assert cliques(ranks, 5.0) == [["a", "b", "c", "d", "e"]]


def test_a_rank_span_equal_to_the_critical_distance_is_not_significant() -> None:
    ranks = {"a": 1.0, "b": 1.3, "c": 1.6}  # in floats 1.3 - 1.0 = 0.30000000000000004
    assert cliques(ranks, 0.3) == [["a", "b"], ["b", "c"]]
    assert cliques(ranks, 0.6) == [["a", "b", "c"]]
    assert cliques(ranks, 0.29) == []


# -- serialization ------------------------------------------------------------------------------
def test_ranking_serializes_to_strict_json() -> None:
    ranking = rank_criteria(table_scores(spread_table(), seeds=2))
    data = json.loads(json.dumps(ranking.to_dict(), allow_nan=False))
    assert data["criteria"] == ranking.criteria
    assert data["n_groups"] == 12
    assert data["groups"][0] == [0]
    assert ranking.friedman is not None
    assert data["friedman"]["statistic"] == pytest.approx(ranking.friedman.statistic)
    assert data["cliques"] == ranking.cliques
    assert set(data["nemenyi_p"]) == set(ranking.criteria)
