"""Results tables: grouping by every field a study varies, mean ± std over seeds."""

from __future__ import annotations

from typing import Any

import pytest

from service.results import aggregate, format_table, summarize, varied_fields
from service.study import StudySpec, expand


def study(**extra: Any) -> StudySpec:
    base: dict[str, Any] = {"name": "s", "model": "small-mlp", "dataset": "digits"}
    return StudySpec.model_validate(base | extra)


def finish(spec: StudySpec, acc: Any) -> tuple[list, list]:
    """Every trial of ``spec`` finished with test_acc = acc(run spec)."""
    plans = expand(spec)
    finished = []
    for plan in plans:
        a = acc(plan.spec)
        metrics = {"test_acc": a, "test_loss": 1.0 - a, "test_acc_at_best_val": a + 0.01}
        finished.append((plan.spec, metrics))
    return [p.spec for p in plans], finished


def test_mean_and_sample_std_over_seeds() -> None:
    spec = study(grid={"criterion": ["magnitude", "snip"], "seed": [0, 1]})
    table = {("magnitude", 0): 0.8, ("magnitude", 1): 0.6}
    specs, finished = finish(spec, lambda s: table.get((s.sparsity.criterion, s.seed), 0.5))
    results = summarize(specs, finished)
    assert results.group_by == ["sparsity.criterion"]
    rows = {r.config["sparsity.criterion"]: r for r in results.rows}
    assert rows["magnitude"].n == 2
    assert rows["magnitude"].test_acc_mean == pytest.approx(0.7)
    assert rows["magnitude"].test_acc_std == pytest.approx(0.1414213562, rel=1e-6)  # sample std
    assert rows["magnitude"].test_acc_at_best_val_mean == pytest.approx(0.71)
    assert rows["snip"].test_acc_std == 0.0
    assert rows["snip"].test_loss_mean == pytest.approx(0.5)


def test_a_grid_over_mest_lambda_gives_one_row_per_lambda() -> None:
    spec = study(
        sparsity={"criterion": "mest"}, grid={"mest_lambda": [0.0, 1.0, 10.0], "seed": [0, 1, 2]}
    )
    specs, finished = finish(spec, lambda s: 0.9 - 0.01 * s.sparsity.mest_lambda + 0.001 * s.seed)
    results = summarize(specs, finished)
    assert results.group_by == ["sparsity.mest_lambda"]
    assert [(r.config["sparsity.mest_lambda"], r.n) for r in results.rows] == [
        (0.0, 3),
        (1.0, 3),
        (10.0, 3),
    ]
    assert results.rows[2].test_acc_mean == pytest.approx(0.8 + 0.001)


@pytest.mark.parametrize(
    ("grid", "field"),
    [
        ({"training.lr": [0.01, 0.1]}, "training.lr"),
        ({"schedule": ["cosine", "constant"]}, "sparsity.schedule"),
        ({"scope": ["local", "global"]}, "sparsity.scope"),
        ({"model": ["small-mlp", "small-cnn"]}, "model"),
        ({"dataset": ["digits", "breast_cancer"]}, "dataset"),
        ({"training.batch_size": [32, 64]}, "training.batch_size"),
    ],
)
def test_every_varied_field_splits_rows(grid: dict[str, list[Any]], field: str) -> None:
    spec = study(grid=grid | {"seed": [0, 1]})
    specs, finished = finish(spec, lambda s: 0.5)
    results = summarize(specs, finished)
    assert results.group_by == [field]
    assert len(results.rows) == 2 and all(r.n == 2 for r in results.rows)


def test_baselines_add_the_mode_and_blank_dst_fields() -> None:
    spec = study(
        grid={"criterion": ["magnitude", "snip"], "density": [0.1, 0.2]},
        baselines={"dense": True, "static": True, "dense_dropout": 0.05},
    )
    specs, finished = finish(spec, lambda s: 0.5)
    results = summarize(specs, finished)
    assert results.group_by == [
        "sparsity.mode",
        "training.dropout",
        "sparsity.density",
        "sparsity.criterion",
    ]
    configs = [tuple(r.config.values()) for r in results.rows]
    assert configs == [
        ("dense", 0.0, 1.0, None),
        ("dense", 0.05, 1.0, None),
        ("static", 0.0, 0.1, None),
        ("static", 0.0, 0.2, None),
        ("dst", 0.0, 0.1, "magnitude"),
        ("dst", 0.0, 0.1, "snip"),
        ("dst", 0.0, 0.2, "magnitude"),
        ("dst", 0.0, 0.2, "snip"),
    ]


def test_a_single_seed_has_no_std_and_the_table_shows_no_plus_minus() -> None:
    spec = study(grid={"criterion": ["magnitude", "set"]})
    specs, finished = finish(spec, lambda s: 0.75)
    results = summarize(specs, finished)
    assert all(r.n == 1 and r.test_acc_std is None for r in results.rows)
    rows = [
        {"config": r.config, "n": r.n, **{k: getattr(r, k) for k in r.__dataclass_fields__}}
        for r in results.rows
    ]
    table = format_table(results.group_by, rows)
    assert "±" not in table and "0.7500" in table
    assert table.splitlines()[0].split()[:3] == ["criterion", "n", "test"]


def test_trials_without_a_metric_leave_its_mean_empty() -> None:
    spec = study(grid={"seed": [0, 1]})
    specs = [p.spec for p in expand(spec)]
    rows = aggregate([(s, {"test_acc": 0.5, "test_loss": 0.1}) for s in specs], [])
    assert rows[0].n == 2 and rows[0].test_acc_at_best_val_mean is None
    assert varied_fields(specs) == []


def test_a_loss_infinite_both_ways_is_no_number_not_an_error() -> None:
    """``statistics.fmean`` fails on +inf with -inf; the row's statistic is NaN (null)."""
    import math

    spec = study(grid={"seed": [0, 1]})
    specs, finished = finish(spec, lambda s: 0.5)
    for (_, metrics), loss in zip(finished, (math.inf, -math.inf), strict=True):
        metrics["test_loss"] = loss
    [row] = summarize(specs, finished).rows
    assert math.isnan(row.test_loss_mean or 0) and math.isnan(row.test_loss_std or 0)
    assert row.test_acc_mean == 0.5
