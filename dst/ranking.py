"""Average ranks of pruning criteria and their critical distance diagram (Section 5.2, Fig. 3).

Within each group (a model, dataset, growth criterion and density: a block in Demšar's 2006
terms) the criteria are ranked by their final test accuracy averaged over seeds (rank 1 = best;
the means are rounded to 12 decimals, so equal accuracies tie, and tied criteria share the
average rank), and the ranks are averaged over the groups. Friedman's test
asks whether the criteria differ at all; the Nemenyi post-hoc test gives the critical distance
CD = q_α · sqrt(k(k+1) / 6N): two criteria whose average ranks differ by at most CD are not
significantly different, and the diagram joins such runs of criteria by thick bars.
Figure 3 splits the groups by density (all, ≤ 0.2, > 0.2): :func:`density_filter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import scikit_posthocs
from scipy import stats

RANK_TOLERANCE = 1e-9  # average ranks are sums of halves over N: float noise, not a difference
# a block's mean accuracies are rounded to this many decimals before ranking: accuracies in
# [0, 1] from finite test sets differ by far more, while equal accuracies summed in another
# order, or equal totals of correct predictions over the seeds, differ by float noise only
MEAN_DECIMALS = 12


@dataclass(frozen=True)
class Score:
    """One run's final test accuracy: the input of the ranking.

    ``group`` identifies the block the criteria are compared within, e.g.
    ``(model, dataset, growth, density)``; the seeds of a group are averaged before ranking.
    """

    criterion: str
    group: tuple[Any, ...]
    seed: int
    test_acc: float


def to_score(row: Score | Mapping[str, Any]) -> Score:
    """A :class:`Score` from itself or from a plain dict with the same four keys."""
    if isinstance(row, Score):
        return row
    return Score(str(row["criterion"]), tuple(row["group"]), int(row["seed"]), row["test_acc"])


def scores_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    criterion: str,
    group: Sequence[str],
    seed: str = "seed",
    test_acc: str = "test_acc",
) -> list[Score]:
    """Scores from flat records (e.g. a run's flattened spec plus its metrics), naming the keys
    that hold the criterion, the group's fields (in order), the seed and the accuracy."""
    return [
        Score(str(r[criterion]), tuple(r[key] for key in group), int(r[seed]), float(r[test_acc]))
        for r in records
    ]


DensitySplit = Literal["all", "low", "high"]


def density_filter(
    split: DensitySplit, position: int, threshold: float = 0.2
) -> Callable[[Score], bool]:
    """Figure 3's panels: all densities, densities ≤ ``threshold`` (low), or > it (high).

    ``position`` is where the density sits in each score's group tuple.
    """
    if split == "all":
        return lambda score: True
    if split == "low":
        return lambda score: float(score.group[position]) <= threshold
    if split == "high":
        return lambda score: float(score.group[position]) > threshold
    raise ValueError(f"unknown density split {split!r}; valid: all, low, high")


# -- the block table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AccuracyTable:
    """Mean test accuracy over seeds per group (row) and criterion (column): ``values`` [N, k],
    rounded to :data:`MEAN_DECIMALS` decimals so that equal accuracies tie.

    Only groups where every criterion has a result are kept (Friedman's test needs complete
    blocks); the others are listed in ``dropped_groups``.
    """

    groups: list[tuple[Any, ...]]
    criteria: list[str]
    values: np.ndarray  # [N, k]
    dropped_groups: list[tuple[Any, ...]]


def accuracy_table(scores: Iterable[Score], criteria: Sequence[str] | None = None) -> AccuracyTable:
    """Average each (group, criterion)'s accuracy over its seeds and lay the means out as blocks.

    ``criteria`` fixes the columns (default: in order of first appearance). A repeated
    (criterion, group, seed) or a non-finite accuracy is an error, not something to average.
    Each mean is the exactly rounded sum (:func:`math.fsum`, so the seeds' order does not
    matter) over the seeds, rounded to :data:`MEAN_DECIMALS` decimals: criteria with equal
    accuracies (e.g. the same total of correct predictions over the seeds) tie, and so share
    their rank (Demšar 2006).
    """
    runs: dict[tuple[Any, ...], dict[str, dict[int, float]]] = {}
    for s in scores:
        if not math.isfinite(s.test_acc):
            raise ValueError(f"non-finite test accuracy for {s}")
        seeds = runs.setdefault(s.group, {}).setdefault(s.criterion, {})
        if s.seed in seeds:
            raise ValueError(f"seed {s.seed} of {s.criterion} in group {s.group} given twice")
        seeds[s.seed] = s.test_acc
    names = list(criteria) if criteria is not None else _first_seen(runs.values())
    complete = [g for g, by in runs.items() if all(c in by for c in names)]
    means = [[_seed_mean(runs[g][c].values()) for c in names] for g in complete]
    values = np.array(means).reshape(len(complete), len(names))  # [N, k]
    dropped = [g for g in runs if g not in complete]
    return AccuracyTable(complete, names, values, dropped)


def _seed_mean(accuracies: Iterable[float]) -> float:
    """The mean over seeds, independent of their order and rounded to :data:`MEAN_DECIMALS`."""
    values = list(accuracies)
    return round(math.fsum(values) / len(values), MEAN_DECIMALS)


def _first_seen(groups: Iterable[dict[str, dict[int, float]]]) -> list[str]:
    return list(dict.fromkeys(c for by in groups for c in by))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Average rank of each column of an [N, k] accuracy table: [k].

    Within each row the highest accuracy gets rank 1; tied criteria share the average of the
    ranks they span (``scipy.stats.rankdata``, method "average"), as in Demšar (2006).
    """
    ranks = stats.rankdata(-values, method="average", axis=1)  # [N, k]
    return ranks.mean(axis=0)  # [k]


# -- significance -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FriedmanResult:
    """Friedman's χ² statistic (with the tie correction) and its p-value."""

    statistic: float
    p_value: float


def friedman_test(values: np.ndarray) -> tuple[FriedmanResult | None, str | None]:
    """Friedman's test over an [N, k] accuracy table (``scipy.stats.friedmanchisquare``).

    Returns the result and ``None``, or ``None`` and why the test cannot be run: it needs
    k >= 3 criteria and N >= 2 groups, and is undefined when every group ties all criteria.
    """
    n, k = values.shape
    if k < 3:
        return None, f"Friedman's test needs at least 3 criteria, got {k}"
    if n < 2:
        return None, f"Friedman's test needs at least 2 groups, got {n}"
    if all(np.all(row == row[0]) for row in values):
        return None, "every group ties all criteria"
    statistic, p_value = stats.friedmanchisquare(*values.T)
    return FriedmanResult(float(statistic), float(p_value)), None


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    """q_α of the Nemenyi test: the studentized range quantile for k groups and infinite
    degrees of freedom, divided by √2 (Demšar 2006, Table 5a: q_0.05 = 2.343 for k = 3)."""
    return float(stats.studentized_range.ppf(1.0 - alpha, k, np.inf)) / math.sqrt(2.0)


def critical_distance(k: int, n: int, alpha: float = 0.05) -> float:
    """CD = q_α · sqrt(k(k+1) / 6N) of the Nemenyi test for k criteria over N groups (Fig. 3)."""
    if k < 2 or n < 1:
        raise ValueError(f"a critical distance needs k >= 2 criteria and N >= 1 groups: {k}, {n}")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def nemenyi_p_values(values: np.ndarray, criteria: Sequence[str]) -> dict[str, dict[str, float]]:
    """Pairwise Nemenyi p-values over an [N, k] table
    (``scikit_posthocs.posthoc_nemenyi_friedman``): ``p[a][b]`` < α iff the average ranks of a
    and b differ by more than the critical distance."""
    table = scikit_posthocs.posthoc_nemenyi_friedman(values)  # [k, k] DataFrame
    p = table.to_numpy()
    return {a: {b: float(p[i, j]) for j, b in enumerate(criteria)} for i, a in enumerate(criteria)}


def cliques(ranks: Mapping[str, float], cd: float) -> list[list[str]]:
    """The thick bars of a critical distance diagram: maximal runs of criteria, in order of
    average rank, whose ranks span at most ``cd`` (so no pair inside is significantly
    different). Runs of a single criterion are not bars and are left out.
    """
    order = sorted(ranks, key=lambda c: ranks[c])  # best first, ties in given order
    found: list[list[str]] = []
    last_end = 0
    for i, first in enumerate(order):
        end = i
        while end + 1 < len(order) and ranks[order[end + 1]] - ranks[first] <= cd + RANK_TOLERANCE:
            end += 1
        if end > i and end > last_end:  # longer than one and not inside the previous run
            found.append(order[i : end + 1])
            last_end = end
    return found


# -- the whole analysis -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranking:
    """Figure 3 for one set of groups: average ranks, Friedman's test, CD and its cliques.

    ``criteria`` is in order of average rank, best first. ``critical_distance`` and
    ``nemenyi_p`` are ``None`` with fewer than two criteria; ``friedman`` is ``None`` when
    ``friedman_skipped`` says why.
    """

    criteria: list[str]
    average_ranks: dict[str, float]
    groups: list[tuple[Any, ...]]
    dropped_groups: list[tuple[Any, ...]]
    alpha: float
    friedman: FriedmanResult | None
    friedman_skipped: str | None
    critical_distance: float | None
    nemenyi_p: dict[str, dict[str, float]] | None
    cliques: list[list[str]]

    @property
    def n_groups(self) -> int:
        """N, the number of complete groups the ranks are averaged over."""
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: groups as lists, NaN as ``None``."""
        out = asdict(self)
        out["groups"] = [list(g) for g in self.groups]
        out["dropped_groups"] = [list(g) for g in self.dropped_groups]
        out["n_groups"] = self.n_groups
        return strict_json(out)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def rank_criteria(
    scores: Iterable[Score | Mapping[str, Any]],
    *,
    where: Callable[[Score], bool] | None = None,
    criteria: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> Ranking:
    """Rank criteria by mean final test accuracy within each group and test the differences
    (Section 5.2, Figure 3; the Nemenyi test at α = 0.05 as in the paper).

    ``where`` keeps only some scores (e.g. :func:`density_filter` for Figure 3b/c).
    ``criteria`` are the criteria to rank (default: every criterion of ``scores``, before
    ``where``), so a split where a criterion has no result at all drops its groups rather
    than ranking the others without it. Groups missing a criterion are dropped (listed in the
    result). Raises ``ValueError`` when no complete group is left.
    """
    every = list(map(to_score, scores))
    names = (
        list(criteria) if criteria is not None else list(dict.fromkeys(s.criterion for s in every))
    )
    kept = [s for s in every if where is None or where(s)]
    table = accuracy_table(kept, names)
    if not table.groups:
        present = {s.criterion for s in kept}
        absent = [c for c in names if c not in present]
        note = f"; {', '.join(absent)}: no result here" if absent else ""
        raise ValueError(
            f"no group has a result for every criterion ({', '.join(names)}): nothing to rank"
            + note
        )
    mean_ranks = dict(zip(table.criteria, average_ranks(table.values).tolist(), strict=True))
    n, k = table.values.shape
    cd = critical_distance(k, n, alpha) if k >= 2 else None
    nemenyi = nemenyi_p_values(table.values, table.criteria) if k >= 2 else None
    friedman, skipped = friedman_test(table.values)
    return Ranking(
        criteria=sorted(table.criteria, key=lambda c: mean_ranks[c]),
        average_ranks=mean_ranks,
        groups=table.groups,
        dropped_groups=table.dropped_groups,
        alpha=alpha,
        friedman=friedman,
        friedman_skipped=skipped,
        critical_distance=cd,
        nemenyi_p=nemenyi,
        cliques=cliques(mean_ranks, cd) if cd is not None else [],
    )
