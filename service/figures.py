"""Which figures a study has, and how each is drawn from its analysis (API and job driver).

A study's figures are named: ``accuracy_vs_density`` (Figure 1), ``learning_curves`` (2),
``critical_distance_<split>`` (3), ``loss_gap`` (4), ``accuracy_vs_update_period`` (5: the
validation accuracy, as the paper's; the test accuracy, so labelled, for runs without one),
``jaccard_first_update`` and ``jaccard_end_masks`` (6), ``accuracy_vs_mest_lambda`` (7),
``itop_vs_update_period`` (11) and ``jaccard_over_time`` (18). A figure drawn per setting
(everything the study varies but the criterion and the seed) carries the setting in its name
when the study has several, e.g. ``loss_gap_growth-gradient_density-0.1``; so do the figures
drawn from the results table, one per setting of everything varied but what they draw and the
seed: Figure 1 all but the density, the criterion and the growth (its panels), e.g.
``accuracy_vs_density_schedule-cosine``; Figure 5 all but Δt, the criterion and the density
(its panels), e.g. ``accuracy_vs_update_period_lr-0.1``; Figure 11 all but Δt, the criterion,
the growth and the density; Figure 7 (the MEST runs) all but λ and the density. Each draws
the baselines of its own setting only. A line or panel named by a field the study does not
vary is named by the value its runs used (``gradient growth``, not ``random``). Two settings
whose names would coincide (values that differ only in characters a file name cannot hold)
each get a short hash of the setting as well (``_<8 hex digits>``). Each appears only when
the study holds what it needs. A trial's own figures (:func:`trial_figures`) go to its MLflow
child run. The drawing itself is :mod:`dst.figures`'.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dst.spec import RunSpec
from service.analysis import (
    BASELINE_LABELS,
    CRITERION,
    DENSITY,
    DROPOUT,
    GROWTH,
    LAMBDA,
    MODE,
    PERIOD,
    StudyAnalysis,
    baseline_matches,
    removal_columns,
    removal_points,
    result_rows,
    setting_names,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dst.figures import Series

Builder = Callable[[], "Figure"]
SPLIT_TITLES = {"all": "all densities", "low": "densities ≤ 0.2", "high": "densities > 0.2"}
KINDS = {  # a figure name's stem -> what it shows (the paper's figure)
    "accuracy_vs_density": "Accuracy vs density (Figure 1)",
    "critical_distance": "Critical-distance diagrams (Figure 3)",
    "learning_curves": "Learning curves (Figure 2)",
    "loss_gap": "Loss gap over training (Figure 4)",
    "accuracy_vs_update_period": "Accuracy vs update period (Figure 5)",
    "itop_vs_update_period": "ITOP vs update period (Figure 11)",
    "jaccard_first_update": "Removal sets at the first update (Figure 6a)",
    "jaccard_over_time": "Removal sets over training (Figure 18)",
    "jaccard_end_masks": "End masks (Figure 6b)",
    "accuracy_vs_mest_lambda": "Accuracy vs MEST λ (Figure 7)",
}

log = logging.getLogger(__name__)


def kind_of(name: str) -> str:
    """The stem of figure ``name`` (a key of :data:`KINDS`), or the name itself."""
    return next((k for k in KINDS if name == k or name.startswith(f"{k}_")), name)


def figure_names(analysis: StudyAnalysis) -> list[str]:
    """The figures this study has the data for."""
    return list(_builders(analysis))


def build_figure(analysis: StudyAnalysis, name: str) -> Figure:
    """Draw figure ``name`` (one of :func:`figure_names`); ``KeyError`` if the study has no
    such figure."""
    return _builders(analysis)[name]()


PNG_DPI = 150  # a PNG's resolution unless asked otherwise


def render(figure: Figure, kind: str, dpi: int = PNG_DPI) -> bytes:
    """``figure`` as PNG (at ``dpi``) or SVG bytes (no pyplot, no global state: safe on any
    thread)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=kind, dpi=dpi if kind == "png" else "figure")
    return buffer.getvalue()


def write_figures(analysis: StudyAnalysis, directory: Path, processes: int = 2) -> None:
    """Every figure of ``analysis`` as PNG and SVG files in ``directory``.

    Drawn in ``processes`` child processes: a study's figures are seconds of CPU under the
    GIL, which the API's requests need meanwhile, and a second core draws half of them. Where
    child processes cannot start, they are drawn here.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    names = figure_names(analysis)
    shares = [share for i in range(processes) if (share := names[i::processes])]
    if not shares:
        return
    try:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied threads
        with ProcessPoolExecutor(len(shares), mp_context=context) as pool:
            for done in [pool.submit(_write, analysis, share, directory) for share in shares]:
                done.result()
    except (OSError, BrokenProcessPool) as error:
        log.warning("drawing the figures in this process (no child processes: %s)", error)
        _write(analysis, names, directory)


def _write(analysis: StudyAnalysis, names: Sequence[str], directory: Path) -> None:
    for name in names:
        figure = build_figure(analysis, name)
        for kind in ("png", "svg"):
            figure.savefig(directory / f"{name}.{kind}", format=kind)


def setting_title(setting: Mapping[str, Any]) -> str:
    """A setting as a title part: ``growth gradient, density 0.1``."""
    return ", ".join(f"{k.rpartition('.')[2]} {v}" for k, v in setting.items()) or "the study"


def _per_setting(
    builders: dict[str, Builder],
    stem: str,
    entries: Sequence[dict[str, Any]],
    make: Callable[[dict[str, Any]], Builder],
) -> None:
    """Add one figure per entry, named by :func:`setting_names`."""
    names = setting_names(stem, [entry["setting"] for entry in entries])
    for name, entry in zip(names, entries, strict=True):
        builders[name] = make(entry)


def _builders(analysis: StudyAnalysis) -> dict[str, Builder]:
    varied = set(analysis.group_by)
    validated = _with_validation(result_rows(analysis), analysis.validation)
    rows = [_with_fixed(row, analysis.fixed) for row in validated]
    builders: dict[str, Builder] = {}
    dst_rows = [r for r in rows if _is_dst(r)]

    def others(drawn: Sequence[str]) -> list[str]:  # what a figure is drawn once per value of
        return [f for f in analysis.group_by if f not in drawn]

    if DENSITY in varied and dst_rows:
        settings = _settings(dst_rows, others(DENSITY_DRAWN))
        entries = [{"setting": setting, "rows": rows} for setting in settings]
        _per_setting(builders, "accuracy_vs_density", entries, _density_builder)
    for split, ranking in analysis.rankings.items():
        if ranking["critical_distance"] is not None:
            builders[f"critical_distance_{split}"] = _cd_builder(ranking, split)
    _per_setting(builders, "learning_curves", analysis.curves, _curves_builder)
    _per_setting(builders, "loss_gap", analysis.curves, _loss_gap_builder)
    _per_setting(builders, "jaccard_first_update", analysis.removal, _removal_builder)
    _per_setting(builders, "jaccard_end_masks", analysis.structure, _jaccard_builder)
    _per_setting(builders, "jaccard_over_time", analysis.over_time, _over_time_builder)
    if PERIOD in varied and dst_rows:
        settings = _settings(dst_rows, others(PERIOD_DRAWN))
        entries = [{"setting": setting, "rows": rows} for setting in settings]
        _per_setting(builders, "accuracy_vs_update_period", entries, _period_builder)
        itop = [_with_fixed(r, analysis.fixed) for r in analysis.itop if _is_dst(r)]
        settings = _settings(dst_rows, others(ITOP_DRAWN))  # named over every DST setting
        names = setting_names("itop_vs_update_period", settings)
        for name, setting in zip(names, settings, strict=True):
            own = [r for r in itop if _in_setting(r, setting)]
            if own:
                builders[name] = _itop_builder(own, setting)
    mest = [r for r in dst_rows if r["config"].get(CRITERION, "mest") == "mest"]
    if LAMBDA in varied and mest:
        entries = [{"setting": s, "rows": mest} for s in _settings(mest, others(LAMBDA_DRAWN))]
        _per_setting(builders, "accuracy_vs_mest_lambda", entries, _lambda_builder)
    return builders


def _is_dst(row: dict[str, Any]) -> bool:
    return bool(row["config"].get(MODE, "dst") == "dst")


LABELLED = (CRITERION, GROWTH, DENSITY)  # what a figure's lines and panels are named by


def _with_fixed(row: dict[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """A DST results row whose config also holds the study's one value of each field of
    :data:`LABELLED` it does not vary, so a line is named by the criterion the runs used (not
    ``None``) and a panel by their growth; a baseline row as it is."""
    missing = {k: fixed[k] for k in LABELLED if k in fixed and k not in row["config"]}
    return row | {"config": row["config"] | missing} if missing and _is_dst(row) else row


def _with_validation(
    rows: Sequence[dict[str, Any]], validation: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Results rows with ``val_acc_mean`` and ``val_acc_std`` (``None`` where the row's runs
    recorded no validation accuracy) from the analysis's rows of the final ``val_acc`` of the
    same configurations (Figure 5 plots the validation accuracy)."""
    found = {json.dumps(row["config"], sort_keys=True): row for row in validation}
    out = []
    for row in rows:
        own = found.get(json.dumps(row["config"], sort_keys=True), {})
        out.append(row | {f"val_acc_{s}": own.get(f"val_acc_{s}") for s in ("mean", "std")})
    return out


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    seen: list[Any] = []
    for row in rows:
        value = row["config"].get(key)
        if value is not None and value not in seen:
            seen.append(value)
    return seen


def _baseline(rows: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["config"].get(MODE) == mode and r["test_acc_mean"] is not None]


def _nan(values: Sequence[Sequence[float | None]]) -> list[list[float]]:
    return [[math.nan if v is None else v for v in row] for row in values]


# -- figures from the results table --------------------------------------------------------


DENSITY_DRAWN = (MODE, CRITERION, DENSITY, GROWTH)  # Figure 1's x, lines and panels


def _settings(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[dict[str, Any]]:
    """The distinct settings of ``fields`` among ``rows``' configs, in row order. A field
    with one value in all ``rows`` is left out: it varies in the study only through its
    baselines (the dense + dropout run's dropout), and splits nothing here."""
    fields = [f for f in fields if len({repr(row["config"].get(f)) for row in rows}) > 1]
    seen: list[dict[str, Any]] = []
    for row in rows:
        setting = {f: row["config"].get(f) for f in fields}
        if setting not in seen:
            seen.append(setting)
    return seen


def _in_setting(row: dict[str, Any], setting: Mapping[str, Any]) -> bool:
    """Whether a DST row has exactly ``setting``'s values."""
    return all(row["config"].get(key) == value for key, value in setting.items())


def _baseline_matches(row: dict[str, Any], setting: Mapping[str, Any]) -> bool:
    """Whether a baseline row belongs beside ``setting``: :func:`service.analysis.
    baseline_matches` on the row's config."""
    return baseline_matches(row["config"], setting, dense=row["config"].get(MODE) == "dense")


def _dense_baseline(rows: Sequence[dict[str, Any]], setting: Mapping[str, Any]) -> float | None:
    """The mean test accuracy of the dense run (without dropout: not the dense + dropout
    baseline) of ``setting``, or ``None`` when the study has none: no baseline is better
    than another setting's."""
    for row in _baseline(rows, "dense"):
        if not row["config"].get(DROPOUT) and _baseline_matches(row, setting):
            return float(row["test_acc_mean"])
    return None


def _density_builder(entry: dict[str, Any]) -> Builder:
    """Figure 1 of one setting (an entry of :func:`_per_setting`)."""
    return lambda: _accuracy_vs_density(entry["rows"], entry["setting"])


def _accuracy_vs_density(rows: list[dict[str, Any]], setting: Mapping[str, Any]) -> Figure:
    """Figure 1 for one setting (everything varied but the density, criterion, growth and
    seed): one panel per growth, one line per criterion (mean ± std over seeds), with the
    dense and static baselines of that same setting."""
    from dst import figures

    dst = [r for r in rows if _is_dst(r) and _in_setting(r, setting)]
    growths = _values(dst, GROWTH) or [None]
    panels = {
        str(g or "random"): figures.result_series(
            dst, DENSITY, CRITERION, where={GROWTH: g} if g is not None else None
        )
        for g in growths
    }
    static = [r for r in _baseline(rows, "static") if _baseline_matches(r, setting)]
    static_series = figures.result_series(static, DENSITY, MODE) if static else []
    return figures.accuracy_vs_density(
        panels,
        dense=_dense_baseline(rows, setting),
        static=static_series[0] if static_series else None,
        title=_titled(figures.ACCURACY_VS_DENSITY_TITLE, setting),
    )


def _cd_builder(ranking: dict[str, Any], split: str) -> Builder:
    def build() -> Figure:
        from dst import figures

        return figures.critical_distance(
            ranking["average_ranks"],
            ranking["critical_distance"],
            ranking["cliques"],
            title=f"Critical distance of the pruning criteria by {ranking['metric']}\n"
            f"({SPLIT_TITLES[split]}, N = {ranking['n_groups']} groups, "
            f"Nemenyi α = {ranking['alpha']})",
        )

    return build


def _titled(title: str, setting: Mapping[str, Any]) -> str:
    """A figure's title, with its setting when the study has one besides what it draws."""
    return f"{title} ({setting_title(setting)})" if setting else title


PERIOD_DRAWN = (MODE, CRITERION, PERIOD, DENSITY)  # Figure 5's baseline, lines, x and panels
ITOP_DRAWN = (MODE, CRITERION, PERIOD, GROWTH, DENSITY)  # Figure 11's: and the growth
LAMBDA_DRAWN = (MODE, CRITERION, LAMBDA, DENSITY)  # Figure 7's: MEST alone, x, lines


def _period_builder(entry: dict[str, Any]) -> Builder:
    """Figure 5 of one setting (an entry of :func:`_per_setting`)."""
    return lambda: _accuracy_vs_update_period(entry["rows"], entry["setting"])


VALIDATION_LABEL = "validation accuracy"
NO_VALIDATION_LABEL = "test accuracy (no validation accuracy recorded)"


def _accuracy_vs_update_period(rows: list[dict[str, Any]], setting: Mapping[str, Any]) -> Figure:
    """Figure 5 for one setting (everything varied but the criterion, Δt, density and seed):
    the final validation accuracy (mean ± std over seeds) against Δt, as the paper plots it,
    one panel per density, one line per criterion, the static run of that same setting and
    density as the reference (none when it has none). Where a DST run of the setting recorded
    no validation accuracy, the figure falls back to the test accuracy and its y axis says so.
    """
    from dst import figures

    dst = [r for r in rows if _is_dst(r) and _in_setting(r, setting)]
    validated = bool(dst) and all(r.get("val_acc_mean") is not None for r in dst)
    metric, ylabel = (
        ("val_acc", VALIDATION_LABEL) if validated else ("test_acc", NO_VALIDATION_LABEL)
    )
    densities = _values(dst, DENSITY) or [None]
    panels, static = {}, {}
    for d in densities:
        name = f"density {d}" if d is not None else "all"
        where = {DENSITY: d} if d is not None else None
        panels[name] = figures.result_series(dst, PERIOD, CRITERION, metric=metric, where=where)
        at = {**setting, DENSITY: d} if d is not None else setting
        own = [
            r
            for r in _baseline(rows, "static")
            if _baseline_matches(r, at) and r.get(f"{metric}_mean") is not None
        ]
        if own:
            static[name] = own[0][f"{metric}_mean"]
    return figures.accuracy_vs_update_period(
        panels,
        static,
        ylabel=ylabel,
        title=_titled(figures.ACCURACY_VS_UPDATE_PERIOD_TITLE, setting),
    )


def _itop_builder(rows: list[dict[str, Any]], setting: Mapping[str, Any]) -> Builder:
    return lambda: _itop_vs_update_period(rows, setting)


def _itop_vs_update_period(rows: list[dict[str, Any]], setting: Mapping[str, Any]) -> Figure:
    """Figure 11 for one setting (everything varied but the criterion, Δt, growth, density
    and seed; ``rows`` are its own): the final ITOP ratio against Δt, one panel per growth
    (and density, when the setting has several), one line per criterion."""
    from dst import figures

    densities = _values(rows, DENSITY) or [None]
    panels = {}
    for growth in _values(rows, GROWTH) or [None]:
        for density in densities:
            where = {k: v for k, v in ((GROWTH, growth), (DENSITY, density)) if v is not None}
            series = figures.result_series(rows, PERIOD, CRITERION, metric="itop", where=where)
            if series:  # a panel is titled "<name> growth"
                name = str(growth or "random")
                panels[f"density {density}, {name}" if len(densities) > 1 else name] = series
    return figures.itop_vs_update_period(
        panels, title=_titled(figures.ITOP_VS_UPDATE_PERIOD_TITLE, setting)
    )


def _lambda_builder(entry: dict[str, Any]) -> Builder:
    """Figure 7 of one setting (an entry of :func:`_per_setting`)."""
    return lambda: _accuracy_vs_mest_lambda(entry["rows"], entry["setting"])


def _accuracy_vs_mest_lambda(rows: list[dict[str, Any]], setting: Mapping[str, Any]) -> Figure:
    """Figure 7 for one setting (everything varied but λ, the density, the criterion and the
    seed; ``rows`` are the MEST runs): MEST's accuracy against λ, one line per density."""
    from dst import figures

    own = [r for r in rows if _in_setting(r, setting)]
    return figures.accuracy_vs_mest_lambda(
        figures.result_series(own, LAMBDA, DENSITY),
        title=_titled(figures.ACCURACY_VS_MEST_LAMBDA_TITLE, setting),
    )


# -- figures from the histories ------------------------------------------------------------


def _series(label: str, line: dict[str, Any], metric: str) -> Series:
    from dst.figures import Series

    return Series(label, line["epoch"], line[metric]["mean"], line[metric]["std"])


def _gaps(values: Sequence[float | None]) -> list[float]:
    """A line's values with ``None`` (no value) as NaN: a gap where matplotlib draws it."""
    return [math.nan if v is None else v for v in values]


def _split_lines(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A setting's curves: the criteria's and the baselines'."""
    lines: dict[str, Any] = entry["lines"]
    criteria = {k: v for k, v in lines.items() if k not in BASELINE_LABELS}
    baselines = {k: v for k, v in lines.items() if k in BASELINE_LABELS}
    return criteria, baselines


def _curves_builder(entry: dict[str, Any]) -> Builder:
    def build() -> Figure:
        """Figure 2: validation accuracy and training loss per epoch, one line per criterion
        (mean over seeds, ±std), the dense model's best validation accuracy dashed."""
        from dst import figures

        criteria, baselines = _split_lines(entry)
        dense = baselines.get("dense")
        return figures.learning_curves(
            [_series(c, line, "val_acc") for c, line in criteria.items()],
            [_series(c, line, "train_loss") for c, line in criteria.items()],
            dense_val_acc=max(dense["val_acc"]["mean"]) if dense else None,
            title=f"Learning curves per pruning criterion ({setting_title(entry['setting'])})",
        )

    return build


def _loss_gap_builder(entry: dict[str, Any]) -> Builder:
    def build() -> Figure:
        """Figure 4: the loss gap per epoch of each criterion and baseline, with each
        criterion's final test accuracy beside it."""
        from dst import figures

        criteria, baselines = _split_lines(entry)
        accuracy = {c: line["test_acc"] for c, line in criteria.items() if line["test_acc"]}
        spread = {c: criteria[c].get("test_acc_std") for c in accuracy}
        return figures.loss_gap_over_time(
            [_series(c, line, "loss_gap") for c, line in criteria.items()],
            [_series(b, line, "loss_gap") for b, line in baselines.items()],
            test_acc=accuracy or None,
            test_acc_std=spread or None,
            title="Loss gap (validation − training loss) over training "
            f"({setting_title(entry['setting'])})",
        )

    return build


def _over_time_builder(entry: dict[str, Any]) -> Builder:
    def build() -> Figure:
        """Figure 18: one panel per criterion a run was trained with; a point without a value
        (the update removed nothing) is a gap. No J_r line: the first update's reference does
        not hold for later updates, which remove fewer weights."""
        from dst import figures
        from dst.figures import Series

        panels = {
            row: [
                Series(
                    column,
                    line["step"],
                    _gaps(line["mean"]),
                    None if line["std"] is None else _gaps(line["std"]),
                )
                for column, line in columns.items()
            ]
            for row, columns in entry["lines"].items()
        }
        return figures.jaccard_over_time(
            panels,
            title="Removal-set Jaccard index over training: what the run removed vs what each "
            f"criterion would have removed ({setting_title(entry['setting'])})",
        )

    return build


# -- Jaccard heatmaps ------------------------------------------------------------------------


def _removal_builder(entry: dict[str, Any]) -> Builder:
    def build() -> Figure:
        from dst import figures

        return figures.jaccard_heatmap(
            _nan(entry["mean"]),
            entry["rows"],
            entry["columns"],
            std=_nan(entry["std"]) if entry["n_seeds"] > 1 else None,
            reference=entry.get("j_r"),
            title="Jaccard index of the sets pruned at the first update "
            f"({setting_title(entry['setting'])}; row: the run's criterion, column: what "
            "another would prune from the same state)",
        )

    return build


def _jaccard_builder(entry: dict[str, Any]) -> Builder:
    def build() -> Figure:
        from dst import figures

        jaccard = entry["jaccard"]
        shares = entry.get("consensus")
        agreed = ""
        if shares and shares["kept_by_all"]["mean"] is not None:
            agreed = (
                f"; kept by all {shares['kept_by_all']['mean']:.0%}, "
                f"removed by all {shares['removed_by_all']['mean']:.0%}"
            )
        return figures.jaccard_heatmap(
            _nan(jaccard["mean"]),
            jaccard["names"],
            std=_nan(jaccard["std"]) if jaccard["n_seeds"] > 1 else None,
            reference=entry["j_init"],
            reference_name="J_init",
            title=f"Jaccard index of the end masks ({setting_title(entry['setting'])}; "
            f"{jaccard['n_seeds']} seeds; row init: the initial mask{agreed})",
        )

    return build


# -- a trial's own figures (its MLflow child run) ----------------------------------------------


def trial_figures(spec: RunSpec, history: Sequence[Mapping[str, float]]) -> dict[str, Builder]:
    """One trial's learning curves (Figure 2) and, with ``analysis.removal_sets``, its
    removal-set Jaccard index over training (Figure 18's row for its criterion)."""
    if not history:
        return {}
    name = spec.sparsity.criterion if spec.sparsity.mode == "dst" else spec.sparsity.mode
    columns = removal_columns([history])

    def curves() -> Figure:
        from dst import figures
        from dst.figures import Series

        epochs = [h["epoch"] for h in history]
        return figures.learning_curves(
            [Series(str(name), epochs, [h["val_acc"] for h in history])],
            [Series(str(name), epochs, [h["train_loss"] for h in history])],
            title=f"Learning curves of {spec.name or name}",
        )

    def over_time() -> Figure:
        from dst import figures
        from dst.figures import Series

        series = []
        for column in columns:
            points = removal_points(history, column)
            series.append(Series(column, [p[0] for p in points], [p[1] for p in points]))
        return figures.jaccard_over_time({str(name): series})

    builders: dict[str, Builder] = {"learning_curves": curves}
    if columns:
        builders["jaccard_over_time"] = over_time
    return builders
