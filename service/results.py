"""A study's results table: finished trials grouped by every field the study varies.

Rows average over seeds only. Which fields a study varies is read off its stored trials (the
grid's fields and, with baselines, the mode), so a grid over anything (MEST λ, learning rate,
schedule, model) gets one row per value instead of being averaged together.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dst.spec import RunSpec, flatten
from service.study import DST_ONLY_FIELDS

RESULT_METRICS = ("test_acc", "test_acc_at_best_val", "test_loss")
NOT_GROUPED = ("name", "seed")  # seeds are what a row averages over


def run_config(spec: RunSpec) -> dict[str, Any]:
    """A run's flattened fields except name and seed; DST-only fields are ``None`` outside DST."""
    config = {
        k: v for k, v in flatten(spec.model_dump(mode="json")).items() if k not in NOT_GROUPED
    }
    if spec.sparsity.mode != "dst":
        config |= {f"sparsity.{f}": None for f in DST_ONLY_FIELDS}
    return config


def varied_fields(specs: Iterable[RunSpec]) -> list[str]:
    """Field paths that take more than one value among ``specs`` (``None`` is no value).

    These are what a study varies besides the seed: the grid's fields and, with baselines,
    ``sparsity.mode``. A DST-only field varies when it varies among the DST runs.
    """
    values: dict[str, set[str]] = {}
    for spec in specs:
        for key, value in run_config(spec).items():
            if value is not None:
                values.setdefault(key, set()).add(json.dumps(value))
    varied = [key for key, seen in values.items() if len(seen) > 1]
    return sorted(varied, key=lambda k: k != "sparsity.mode")  # the mode first, else spec order


@dataclass(frozen=True)
class ResultRow:
    """One configuration's final test metrics over its seeds.

    ``config`` holds the value of every field the study varies (the study's ``group_by``).
    ``test_acc`` is the last epoch's test accuracy; ``test_acc_at_best_val`` is the test
    accuracy of the epoch with the best validation accuracy (what the paper's code reports).
    A std is ``None`` when n = 1; a mean is ``None`` when no trial recorded that metric; both
    are NaN (``None`` in the API's JSON) when a seed's value is not a finite number.
    """

    config: dict[str, Any]
    n: int
    test_acc_mean: float | None
    test_acc_std: float | None
    test_acc_at_best_val_mean: float | None
    test_acc_at_best_val_std: float | None
    test_loss_mean: float | None
    test_loss_std: float | None


def sample_std(values: Sequence[float]) -> float | None:
    """The sample std over seeds: ``None`` for one seed, NaN when a value is not a finite
    number (a diverged run's loss; ``statistics.stdev`` fails there), which the API's strict
    JSON carries as ``None``."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def sample_mean(values: Sequence[float]) -> float | None:
    """The mean over seeds: ``None`` for none, NaN when a value is not a finite number
    (``statistics.fmean`` fails on +inf with -inf)."""
    if not values:
        return None
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.nan


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    return sample_mean(values), sample_std(values)


def _orderable(value: Any) -> tuple[int, float, str]:
    """A sort key for JSON values of mixed types: missing first, then numbers, then text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, int | float):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _sort_key(row: ResultRow) -> tuple[int, list[tuple[int, float, str]]]:
    """Dense, then static, then DST rows; within them by the grouped values."""
    order = {"dense": 0, "static": 1, "dst": 2}
    mode = row.config.get("sparsity.mode")
    return order.get(str(mode), 3), [_orderable(v) for v in row.config.values()]


def grouped_stats(
    finished: Iterable[tuple[RunSpec, dict[str, float]]],
    group_by: Sequence[str],
    metrics: Sequence[str],
) -> list[dict[str, Any]]:
    """Group finished trials by the fields in ``group_by`` (see :func:`varied_fields`) and
    average each of ``metrics`` over the seeds of each group: rows in the results table's
    JSON form (``config``, ``n``, ``<metric>_mean``, ``<metric>_std``)."""
    groups: dict[str, tuple[dict[str, Any], list[dict[str, float]]]] = {}
    for spec, values in finished:
        config = run_config(spec)
        key = {field: config.get(field) for field in group_by}
        groups.setdefault(json.dumps(key), (key, []))[1].append(values)
    rows = []
    for key, items in groups.values():
        row: dict[str, Any] = {"config": key, "n": len(items)}
        for metric in metrics:
            mean, std = _mean_std([m[metric] for m in items if metric in m])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)
    return rows


def aggregate(
    finished: Iterable[tuple[RunSpec, dict[str, float]]], group_by: Sequence[str]
) -> list[ResultRow]:
    """The results table's rows: :data:`RESULT_METRICS` per configuration, sorted."""
    rows = [ResultRow(**row) for row in grouped_stats(finished, group_by, RESULT_METRICS)]
    return sorted(rows, key=_sort_key)


@dataclass(frozen=True)
class Results:
    """A study's results table: the fields it varies and one row per configuration."""

    group_by: list[str]
    rows: list[ResultRow]


def summarize(
    specs: Iterable[RunSpec], finished: Iterable[tuple[RunSpec, dict[str, float]]]
) -> Results:
    """The results of a study whose trials are ``specs``, from its ``finished`` trials."""
    group_by = varied_fields(specs)
    return Results(group_by, aggregate(finished, group_by))


def format_cell(value: Any) -> str:
    """A table cell: ``-`` for nothing, floats to 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_stat(mean: float | None, std: float | None) -> str:
    """``mean ± std``; the mean alone for a single seed; ``-`` when nothing was recorded."""
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(group_by: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of result rows (as JSON dicts): one column per grouped field
    (named without its section), then n and the metrics."""
    header = [*(f.rpartition(".")[2] for f in group_by), "n", "test acc (last)"]
    header += ["test acc (best val)", "test loss"]
    body = [
        [
            *(format_cell(r["config"].get(f)) for f in group_by),
            str(r["n"]),
            *(format_stat(r[f"{m}_mean"], r[f"{m}_std"]) for m in RESULT_METRICS),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)
