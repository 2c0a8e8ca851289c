"""A study's paper-style analysis from its stored trials (runs in the API process).

From the trials' final metrics alone (no MLflow call, nothing slow): the criteria rankings of
Figure 3 (average ranks within each group of everything else the study varies, Friedman's
test, the Nemenyi critical distance and its cliques; for all densities, ≤ 0.2 and > 0.2) and
the figures whose data the study holds: accuracy vs density per growth (Figure 1), the
critical-distance diagrams (Figure 3), accuracy vs update period (Figure 5) and accuracy vs
MEST λ (Figure 7). A study still running gets the same analysis over what has finished,
marked ``partial``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dst.spec import RunSpec
from service.results import Results, run_config, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CRITERION, GROWTH, DENSITY, MODE = (
    "sparsity.criterion",
    "sparsity.growth",
    "sparsity.density",
    "sparsity.mode",
)
PERIOD, LAMBDA = "sparsity.update_period", "sparsity.mest_lambda"
SPLITS = ("all", "low", "high")  # Figure 3a-c: all densities, ≤ 0.2, > 0.2
INITIAL, FINAL = "initial.npz", "final.npz"  # a finished trial's masks, kept by the driver


def experiment_masks_dir(storage_path: Path, experiment_id: str) -> Path:
    """Where a study's finished trials keep their masks (shared by the driver and the API)."""
    return storage_path / "masks" / experiment_id


def trial_masks_dir(experiment_dir: Path, index: int) -> Path:
    return experiment_dir / str(index)


@dataclass(frozen=True)
class FinishedTrial:
    """What the analysis reads of one succeeded trial."""

    spec: RunSpec
    metrics: dict[str, float]
    index: int = -1  # the trial's index (its masks' directory)


@dataclass
class StudyAnalysis:
    """Rankings (by density split) and the results table a study's figures are drawn from."""

    partial: bool
    n_finished: int
    group_by: list[str]
    ranked_within: list[str]  # the fields that form a ranking group
    rankings: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # split -> why there is no ranking
    results: Results | None = None
    structure: list[dict[str, Any]] = field(default_factory=list)  # Figure 6b per setting
    removal: list[dict[str, Any]] = field(default_factory=list)  # Figure 6a per setting

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("results")
        return out


def analyze(
    specs: Sequence[RunSpec],
    finished: Sequence[FinishedTrial],
    partial: bool,
    mask_dir: Path | None = None,
) -> StudyAnalysis:
    """The analysis of a study whose trials are ``specs``, from its ``finished`` trials (and
    their masks in ``mask_dir``, for the structure of Figure 6b)."""
    results = summarize(specs, [(t.spec, t.metrics) for t in finished])
    within = [f for f in results.group_by if f not in (CRITERION, MODE)]
    analysis = StudyAnalysis(partial, len(finished), results.group_by, within, results=results)
    if mask_dir is not None and CRITERION in results.group_by:
        analysis.structure = end_mask_structure(finished, within, mask_dir)
    analysis.removal = first_update_structure(finished, within)
    if CRITERION not in results.group_by:
        analysis.skipped = {s: "the study does not vary the pruning criterion" for s in SPLITS}
        return analysis
    scores = _scores(finished, within)
    for split in SPLITS:
        ranking, reason = _ranking(scores, within, split)
        if ranking is not None:
            analysis.rankings[split] = ranking
        else:
            analysis.skipped[split] = reason or "nothing to rank"
    return analysis


def _scores(finished: Sequence[FinishedTrial], within: Sequence[str]) -> list[dict[str, Any]]:
    """Ranking inputs: DST trials with a final test accuracy, grouped by ``within``."""
    scores = []
    for trial in finished:
        config = run_config(trial.spec)
        if trial.spec.sparsity.mode != "dst" or "test_acc" not in trial.metrics:
            continue
        scores.append(
            {
                "criterion": config[CRITERION],
                "group": tuple(json.dumps(config.get(f)) for f in within),
                "density": trial.spec.sparsity.density,
                "seed": trial.spec.seed,
                "test_acc": trial.metrics["test_acc"],
            }
        )
    return scores


def _ranking(
    scores: list[dict[str, Any]], within: Sequence[str], split: str
) -> tuple[dict[str, Any] | None, str | None]:
    from dst.ranking import rank_criteria

    keep: Callable[[dict[str, Any]], bool] = {
        "all": lambda s: True,
        "low": lambda s: s["density"] <= 0.2,
        "high": lambda s: s["density"] > 0.2,
    }[split]
    kept = [s for s in scores if keep(s)]
    if not kept:
        return None, "no finished DST trial in this density range"
    try:
        ranking = rank_criteria(kept)
    except ValueError as error:
        return None, str(error)
    out = ranking.to_dict()
    out["groups"] = [dict(zip(within, map(json.loads, g), strict=True)) for g in ranking.groups]
    out["dropped_groups"] = [
        dict(zip(within, map(json.loads, g), strict=True)) for g in ranking.dropped_groups
    ]
    return out, None


def rankings_csv(analysis: StudyAnalysis) -> str:
    """One line per density split and criterion: its average rank, best first."""
    lines = ["split,criterion,average_rank,n_groups,critical_distance"]
    for split, ranking in analysis.rankings.items():
        for criterion in ranking["criteria"]:
            rank = ranking["average_ranks"][criterion]
            lines.append(
                f"{split},{criterion},{rank:.4f},{ranking['n_groups']},"
                f"{ranking['critical_distance'] or ''}"
            )
    return "\n".join(lines) + "\n"


def summary(analysis: StudyAnalysis) -> tuple[dict[str, float], dict[str, str]]:
    """What the MLflow runs table shows of a study: the mean final test accuracy of each
    criterion (metrics ``mean_test_acc.<criterion>``, over every DST configuration and seed)
    and the best criterion at each density (tags ``best_criterion.density_<d>``)."""
    rows = [r for r in _rows(analysis) if r["config"].get(MODE, "dst") == "dst"]
    by_criterion: dict[str, list[float]] = {}
    best: dict[str, tuple[float, str]] = {}
    for row in rows:
        criterion, mean = row["config"].get(CRITERION), row["test_acc_mean"]
        if criterion is None or mean is None:
            continue
        by_criterion.setdefault(criterion, []).append(mean)
        density = row["config"].get(DENSITY)
        if density is not None and (str(density) not in best or mean > best[str(density)][0]):
            best[str(density)] = (mean, criterion)
    metrics = {f"mean_test_acc.{c}": sum(v) / len(v) for c, v in by_criterion.items()}
    tags = {f"best_criterion.density_{d}": c for d, (_, c) in best.items()}
    return metrics, tags


FIRST_UPDATE = "removal_jaccard_first."  # a run's metrics with analysis.removal_sets


def first_update_structure(
    finished: Sequence[FinishedTrial], within: Sequence[str]
) -> list[dict[str, Any]]:
    """Figure 6a per setting, from runs with ``analysis.removal_sets``: row = the run's own
    criterion, column = another criterion, value = the Jaccard index (Eq. 1, mean over layers)
    of the sets both would prune at the run's first topology update, from its own state;
    mean and std over seeds."""
    import statistics

    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for trial in finished:
        row = {
            k[len(FIRST_UPDATE) :]: v
            for k, v in trial.metrics.items()
            if k.startswith(FIRST_UPDATE)
        }
        if not row:
            continue
        config = run_config(trial.spec)
        key = json.dumps({f: config.get(f) for f in within})
        own = cells.setdefault(key, {}).setdefault(str(config[CRITERION] or ""), {})
        for other, value in row.items():
            own.setdefault(other, []).append(value)
    out = []
    for key, rows in cells.items():
        names = list(rows)
        columns = names + sorted({c for r in rows.values() for c in r} - set(names))

        def stat(values: list[float] | None, how: Callable[[list[float]], float]) -> float | None:
            if not values or (how is statistics.stdev and len(values) < 2):
                return None
            return how(values)

        mean = [[stat(rows[r].get(c), statistics.fmean) for c in columns] for r in names]
        std = [[stat(rows[r].get(c), statistics.stdev) for c in columns] for r in names]
        seeds = max(len(v) for r in rows.values() for v in r.values())
        out.append(
            {
                "setting": json.loads(key),
                "rows": names,
                "columns": columns,
                "mean": mean,
                "std": std,
                "n_seeds": seeds,
            }
        )
    return out


def end_mask_structure(
    finished: Sequence[FinishedTrial], within: Sequence[str], mask_dir: Path
) -> list[dict[str, Any]]:
    """Figure 6b per setting (everything varied but the criterion and the seed): the Jaccard
    index (Eq. 1, mean over layers) between the end masks of trials that differ only in the
    criterion (same seed, so the same initial mask), and of each with that initial mask
    (row ``init``), mean and std over seeds (Appendix K), with J_init, the mean pairwise
    Jaccard of the initial masks of different seeds. Only seeds where every criterion of the
    setting finished count; settings with fewer than two criteria are left out."""
    from dst.masks import load_masks
    from dst.structure import end_mask_jaccard_over_seeds, initial_mask_reference

    settings: dict[str, dict[int, dict[str, Path]]] = {}
    criteria: dict[str, list[str]] = {}
    for trial in finished:
        directory = trial_masks_dir(mask_dir, trial.index)
        if trial.spec.sparsity.mode != "dst" or not (directory / FINAL).exists():
            continue
        config = run_config(trial.spec)
        key = json.dumps({f: config.get(f) for f in within})
        criterion = str(config[CRITERION])
        settings.setdefault(key, {}).setdefault(trial.spec.seed, {})[criterion] = directory
        if criterion not in criteria.setdefault(key, []):
            criteria[key].append(criterion)
    out = []
    for key, seeds in settings.items():
        names = criteria[key]
        complete = {seed: runs for seed, runs in seeds.items() if set(runs) == set(names)}
        if len(names) < 2 or not complete:
            continue
        per_seed, initials = [], []
        for runs in complete.values():
            masks = {name: load_masks(runs[name] / FINAL) for name in names}
            masks["init"] = load_masks(runs[names[0]] / INITIAL)
            initials.append(masks["init"])
            per_seed.append(masks)
        stats = end_mask_jaccard_over_seeds(per_seed, [*names, "init"])
        j_init = initial_mask_reference(initials) if len(initials) > 1 else None
        out.append({"setting": json.loads(key), "jaccard": stats.to_dict(), "j_init": j_init})
    return out


# -- figures ----------------------------------------------------------------------------------


def figure_names(analysis: StudyAnalysis) -> list[str]:
    """The figures this study has the data for."""
    return list(_builders(analysis))


def build_figure(analysis: StudyAnalysis, name: str) -> Figure:
    """Draw figure ``name`` (one of :func:`figure_names`); ``KeyError`` if the study has no
    such figure."""
    return _builders(analysis)[name]()


def render(figure: Figure, kind: str) -> bytes:
    """``figure`` as PNG or SVG bytes (no pyplot, no global state: safe on any thread)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=kind, dpi=150 if kind == "png" else "figure")
    return buffer.getvalue()


def _rows(analysis: StudyAnalysis) -> list[dict[str, Any]]:
    assert analysis.results is not None
    return [asdict(row) for row in analysis.results.rows]


def _builders(analysis: StudyAnalysis) -> dict[str, Callable[[], Figure]]:
    varied = set(analysis.group_by)
    rows = _rows(analysis)
    builders: dict[str, Callable[[], Figure]] = {}
    dst_rows = [r for r in rows if r["config"].get(MODE, "dst") == "dst"]
    if DENSITY in varied and dst_rows:
        builders["accuracy_vs_density"] = lambda: _accuracy_vs_density(rows)
    for split, ranking in analysis.rankings.items():
        if ranking["critical_distance"] is not None:
            builders[f"critical_distance_{split}"] = _cd_builder(ranking, split)
    for number, entry in enumerate(analysis.removal):
        name = "jaccard_first_update" + (f"_{number + 1}" if len(analysis.removal) > 1 else "")
        builders[name] = _removal_builder(entry)
    for number, entry in enumerate(analysis.structure):
        name = "jaccard_end_masks" + (f"_{number + 1}" if len(analysis.structure) > 1 else "")
        builders[name] = _jaccard_builder(entry)
    if PERIOD in varied and dst_rows:
        builders["accuracy_vs_update_period"] = lambda: _accuracy_vs_update_period(rows)
    if LAMBDA in varied and dst_rows:
        builders["accuracy_vs_mest_lambda"] = lambda: _accuracy_vs_mest_lambda(rows)
    return builders


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    seen: list[Any] = []
    for row in rows:
        value = row["config"].get(key)
        if value is not None and value not in seen:
            seen.append(value)
    return seen


def _baseline(rows: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["config"].get(MODE) == mode and r["test_acc_mean"] is not None]


def _accuracy_vs_density(rows: list[dict[str, Any]]) -> Figure:
    """Figure 1: one panel per growth, one line per criterion, dense and static baselines."""
    from dst import figures

    dst = [r for r in rows if r["config"].get(MODE, "dst") == "dst"]
    growths = _values(dst, GROWTH) or [None]
    panels = {
        str(g or "random"): figures.result_series(
            dst, DENSITY, CRITERION, where={GROWTH: g} if g is not None else None
        )
        for g in growths
    }
    dense = _baseline(rows, "dense")
    static = _baseline(rows, "static")
    static_series = figures.result_series(static, DENSITY, MODE) if static else []
    return figures.accuracy_vs_density(
        panels,
        dense=dense[0]["test_acc_mean"] if dense else None,
        static=static_series[0] if static_series else None,
    )


def _cd_builder(ranking: dict[str, Any], split: str) -> Callable[[], Figure]:
    titles = {"all": "all densities", "low": "densities ≤ 0.2", "high": "densities > 0.2"}

    def build() -> Figure:
        from dst import figures

        return figures.critical_distance(
            ranking["average_ranks"],
            ranking["critical_distance"],
            ranking["cliques"],
            title=f"Critical distance of the pruning criteria ({titles[split]}, "
            f"N = {ranking['n_groups']} groups, Nemenyi α = {ranking['alpha']})",
        )

    return build


def _nan(values: list[list[float | None]]) -> list[list[float]]:
    return [[math.nan if v is None else v for v in row] for row in values]


def _removal_builder(entry: dict[str, Any]) -> Callable[[], Figure]:
    def build() -> Figure:
        from dst import figures

        setting = ", ".join(f"{k.rpartition('.')[2]} {v}" for k, v in entry["setting"].items())
        return figures.jaccard_heatmap(
            _nan(entry["mean"]),
            entry["rows"],
            entry["columns"],
            std=_nan(entry["std"]) if entry["n_seeds"] > 1 else None,
            title="Jaccard index of the sets pruned at the first update "
            f"({setting or 'the study'}; row: the run's criterion, column: what another "
            "would prune from the same state)",
        )

    return build


def _jaccard_builder(entry: dict[str, Any]) -> Callable[[], Figure]:
    def build() -> Figure:
        from dst import figures

        jaccard = entry["jaccard"]
        names = jaccard["names"]
        setting = ", ".join(f"{k.rpartition('.')[2]} {v}" for k, v in entry["setting"].items())

        def matrix(values: list[list[float | None]]) -> list[list[float]]:
            return [[math.nan if v is None else v for v in row] for row in values]

        return figures.jaccard_heatmap(
            matrix(jaccard["mean"]),
            names,
            std=matrix(jaccard["std"]) if jaccard["n_seeds"] > 1 else None,
            reference=entry["j_init"],
            reference_name="J_init",
            title=f"Jaccard index of the end masks ({setting or 'the study'}; "
            f"{jaccard['n_seeds']} seeds; row init: the initial mask)",
        )

    return build


def _accuracy_vs_update_period(rows: list[dict[str, Any]]) -> Figure:
    """Figure 5: one panel per density, one line per criterion, static as the reference."""
    from dst import figures

    dst = [r for r in rows if r["config"].get(MODE, "dst") == "dst"]
    densities = _values(dst, DENSITY) or [None]
    panels, static = {}, {}
    for d in densities:
        name = f"density {d}" if d is not None else "all"
        where = {DENSITY: d} if d is not None else None
        panels[name] = figures.result_series(dst, PERIOD, CRITERION, where=where)
        for row in _baseline(rows, "static"):
            if d is None or row["config"].get(DENSITY) == d:
                static[name] = row["test_acc_mean"]
    return figures.accuracy_vs_update_period(panels, static, ylabel="test accuracy")


def _accuracy_vs_mest_lambda(rows: list[dict[str, Any]]) -> Figure:
    """Figure 7: MEST's accuracy against λ, one line per density."""
    from dst import figures

    mest = [
        r
        for r in rows
        if r["config"].get(MODE, "dst") == "dst" and r["config"].get(CRITERION, "mest") == "mest"
    ]
    return figures.accuracy_vs_mest_lambda(figures.result_series(mest, LAMBDA, DENSITY))
