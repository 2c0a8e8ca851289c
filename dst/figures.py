"""The paper's figures (Figures 1-7, 11, 18, 23-30), drawn with matplotlib from plain numbers.

Every builder takes plain data (:class:`Series` of numbers, mappings of floats, nested lists)
and returns a new :class:`matplotlib.figure.Figure`; nothing here reads a study, a trial or a
mask, so the same figure can be drawn from a live study, a results file or a test. Figures are
made without :mod:`matplotlib.pyplot`: no global figure registry and no backend switch, so a
server may draw figures in several threads at once. :func:`save` writes PNG and SVG.

Accuracies are fractions in [0, 1] (as :mod:`dst.training` reports them); the loss gap is
validation loss minus training loss (``loss_gap`` in :mod:`dst.training`, Figure 4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

History = Sequence[Mapping[str, float]]  # one trial's per-epoch metrics (dst.training.Metrics)
Matrix = Sequence[Sequence[float]]  # rows × columns

FORMATS = ("png", "svg")
DPI = 150

# one colour per criterion in every figure; the baselines as in the paper (dense black,
# static light blue)
CRITERION_COLORS = {
    "magnitude": "tab:blue",
    "set": "tab:orange",
    "mest": "tab:green",
    "sensitivity": "tab:red",
    "rsensitivity": "tab:purple",
    "snip": "tab:brown",
    "random": "tab:pink",
    "init": "tab:gray",
}
PALETTE: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
PALETTE += ("tab:brown", "tab:pink", "tab:olive", "tab:gray", "navy")
BASELINE_STYLES: dict[str, dict[str, Any]] = {
    "dense": {"color": "black", "linestyle": "--"},
    "static": {"color": "tab:cyan", "linestyle": "--"},
    "dense + dropout": {"color": "dimgray", "linestyle": ":"},
}
OTHER_BASELINE_STYLE: dict[str, Any] = {"color": "darkgray", "linestyle": "-."}

ACCURACY_NOTE = "\n(fraction, higher is better)"


@dataclass(frozen=True)
class Series:
    """One line of a figure: y (a mean over seeds) against x, with an optional ±std band.

    ``label`` names the line in the legend (a criterion, a baseline, a density, a trial).
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.label}: {len(self.x)} x values but {len(self.y)} y values")
        if self.std is not None and len(self.std) != len(self.y):
            raise ValueError(f"{self.label}: {len(self.std)} std values for {len(self.y)} points")


# -- from recorded data to series ----------------------------------------------------------


def history_series(
    label: str, histories: Sequence[History], metric: str, x: str = "epoch"
) -> Series:
    """One per-epoch metric over a configuration's seeds: the mean per epoch, and the std when
    there are several seeds. Histories are cut to the shortest, so every point has every seed.

    What Figures 2, 4 and 23-30 plot, from :attr:`dst.training.Trainer.history` dicts.
    """
    if not histories:
        raise ValueError(f"{label}: no histories")
    length = min(len(h) for h in histories)
    columns = [[h[i][metric] for h in histories] for i in range(length)]
    xs = [histories[0][i][x] for i in range(length)]
    means = [_mean(c) for c in columns]
    stds = [_std(c) for c in columns] if len(histories) > 1 else None
    return Series(label, xs, means, stds)


def _mean(values: Sequence[float]) -> float:
    """The mean; NaN (a gap) when a value is not a finite number (``statistics.fmean``
    fails on +inf with -inf, e.g. a loss gap whose either loss diverged)."""
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.nan


def _std(values: Sequence[float]) -> float:
    """The sample std of two or more values; NaN (no band drawn) when one is not a finite
    number, a diverged seed's loss, where ``statistics.stdev`` fails."""
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def _matches(config: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    return all(config.get(key) == value for key, value in where.items())


def result_series(
    rows: Sequence[Mapping[str, Any]],
    x: str,
    label: str,
    metric: str = "test_acc",
    where: Mapping[str, Any] | None = None,
) -> list[Series]:
    """Lines from results rows (the JSON form of ``service.results.ResultRow``): one per value
    of the grouped field ``label``, ``{metric}_mean`` against the grouped field ``x``.

    ``where`` keeps only rows whose config holds those values (e.g. one growth method, for one
    panel of Figure 1). Rows without an x value or a mean are left out; a missing std (one
    seed) draws no band.
    """
    points: dict[str, list[tuple[float, float, float | None]]] = {}
    for row in rows:
        config = row["config"]
        mean, at = row.get(f"{metric}_mean"), config.get(x)
        if not _matches(config, where or {}) or mean is None or at is None:
            continue
        points.setdefault(str(config.get(label)), []).append((at, mean, row.get(f"{metric}_std")))
    return [_points_series(name, sorted(p, key=lambda t: t[0])) for name, p in points.items()]


def _points_series(label: str, points: Sequence[tuple[float, float, float | None]]) -> Series:
    stds = [s for _, _, s in points]
    std = None if all(s is None for s in stds) else [s or 0.0 for s in stds]
    return Series(label, [p[0] for p in points], [p[1] for p in points], std)


# -- drawing helpers -----------------------------------------------------------------------


def _panels(
    count: int, width: float = 4.6, height: float = 3.6, sharey: bool = True
) -> tuple[Figure, list[Axes]]:
    """A figure of ``count`` side-by-side panels (a fresh Figure: no pyplot state)."""
    if count < 1:
        raise ValueError("a figure needs at least one panel")
    fig = Figure(figsize=(width * count, height), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False, sharey=sharey)
    return fig, list(axes.flat)


def _grid(
    count: int, columns: int = 3, width: float = 4.6, height: float = 3.6
) -> tuple[Figure, list[Axes]]:
    """A figure of ``count`` panels, ``columns`` to a row, sharing both axes; unused cells of
    the last row are removed."""
    if count < 1:
        raise ValueError("a figure needs at least one panel")
    columns = min(columns, count)
    rows = -(-count // columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).flat)
    for extra in axes[count:]:
        extra.remove()
    return fig, axes[:count]


def _color(label: str, index: int) -> str:
    """The criterion's own colour, else the palette by position."""
    return CRITERION_COLORS.get(label.lower(), PALETTE[index % len(PALETTE)])


def _plot(ax: Axes, series: Series, color: str, **style: Any) -> None:
    """The series as a line with markers and, when it has a std, a ±std band around it."""
    ax.plot(series.x, series.y, marker="o", markersize=3, color=color, label=series.label, **style)
    if series.std is not None:
        low = [m - s for m, s in zip(series.y, series.std, strict=True)]
        high = [m + s for m, s in zip(series.y, series.std, strict=True)]
        ax.fill_between(series.x, low, high, color=color, alpha=0.2, linewidth=0)


def _plot_all(ax: Axes, series: Sequence[Series]) -> None:
    for index, s in enumerate(series):
        _plot(ax, s, _color(s.label, index))


def _baseline_style(label: str) -> dict[str, Any]:
    return BASELINE_STYLES.get(label.lower(), OTHER_BASELINE_STYLE)


def _plot_baseline(ax: Axes, series: Series) -> None:
    """A baseline run drawn over the x axis (static over densities, a dense loss gap)."""
    style = _baseline_style(series.label)
    _plot(ax, series, style["color"], linestyle=style["linestyle"])


def _hline(ax: Axes, value: float, label: str, kind: str) -> None:
    """A baseline that does not depend on x (the dense model; static without updates), styled
    as the baseline ``kind``."""
    ax.axhline(value, label=label, linewidth=1.2, **_baseline_style(kind))


def _x_values(series: Sequence[Series]) -> list[float]:
    return sorted({v for s in series for v in s.x})


def _tick_label(value: float) -> str:
    return f"{value:g}"


def _log_x(ax: Axes, values: Sequence[float], base: float = 10) -> None:
    """Log x axis with a tick at each measured value (the paper marks its grid points)."""
    ax.set_xscale("log", base=base)
    if values:
        ax.set_xticks(values, labels=[_tick_label(v) for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _symlog_x(ax: Axes, values: Sequence[float]) -> None:
    """Log x axis that also shows x = 0 (MEST λ = 0 is plain magnitude), linear below the
    smallest positive value."""
    positive = [v for v in values if v > 0]
    if any(v <= 0 for v in values) and positive:
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlim(left=-0.3 * min(positive))  # nothing to show below λ = 0
        ax.set_xticks(values, labels=[_tick_label(v) for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif positive:
        _log_x(ax, values)


def _legend(ax: Axes) -> None:
    ax.legend(fontsize="small", frameon=False)


def _label(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _wrapped(text: str, fig: Figure) -> str:
    """``text`` broken into lines that fit the figure's width (long titles name a setting)."""
    import textwrap

    return textwrap.fill(text, max(30, int(fig.get_figwidth() * 11)))


def _finish_panels(fig: Figure, axes: Sequence[Axes], title: str) -> None:
    """The legend on the last panel, the y label on the first only (the panels share y), and
    the figure's title."""
    _legend(axes[-1])
    for ax in axes:
        ax.label_outer()
    fig.suptitle(title)


def _unit_y(ax: Axes) -> None:
    """Ratios and Jaccard indices live in [0, 1]."""
    ax.set_ylim(0.0, 1.02)


# the default titles of the figures a study draws once per setting (the service adds the
# setting to them)
ACCURACY_VS_DENSITY_TITLE = "Test accuracy vs density per growth criterion"
ACCURACY_VS_UPDATE_PERIOD_TITLE = "Accuracy vs topology update period Δt"
ITOP_VS_UPDATE_PERIOD_TITLE = "Final ITOP ratio vs topology update period Δt"
ACCURACY_VS_MEST_LAMBDA_TITLE = "C_MEST: accuracy vs λ (score = |θ| + λ|∇θ L|)"


# -- Figure 1: accuracy vs density -----------------------------------------------------------


def accuracy_vs_density(
    panels: Mapping[str, Sequence[Series]],
    dense: float | None = None,
    static: Series | None = None,
    *,
    ylabel: str = "test accuracy",
    title: str = ACCURACY_VS_DENSITY_TITLE,
) -> Figure:
    """Figure 1 (and 10, 22): accuracy against density on a log axis, one panel per growth
    criterion (``panels`` maps e.g. ``"random"`` to its lines), one line per pruning criterion
    with a ±std band. The dense model is a horizontal dashed line and static sparse training a
    line over the densities, as the baselines every criterion is judged against."""
    fig, axes = _panels(len(panels))
    for ax, (growth, series) in zip(axes, panels.items(), strict=True):
        _plot_all(ax, series)
        if static is not None:
            _plot_baseline(ax, static)
        if dense is not None:
            _hline(ax, dense, "dense", "dense")
        _log_x(ax, _x_values([*series, *([static] if static else [])]))
        _label(ax, "density (fraction of weights kept, log scale)", f"{ylabel}{ACCURACY_NOTE}")
        ax.set_title(f"{growth} growth")
    _finish_panels(fig, axes, title)
    return fig


# -- Figures 2, 23-30: learning curves -----------------------------------------------------


def learning_curves(
    val_acc: Sequence[Series],
    train_loss: Sequence[Series] = (),
    dense_val_acc: float | None = None,
    *,
    title: str = "Learning curves per pruning criterion",
) -> Figure:
    """Figure 2 (and 23-30): validation accuracy per epoch, one line per trial or criterion,
    with the dense model's best validation accuracy dashed; with ``train_loss``, a second panel
    of the training loss per epoch (where C_SNIP's early trouble shows)."""
    fig, axes = _panels(2 if train_loss else 1, sharey=False)
    _plot_all(axes[0], val_acc)
    if dense_val_acc is not None:
        _hline(axes[0], dense_val_acc, "dense (best)", "dense")
    _label(axes[0], "epoch", f"validation accuracy{ACCURACY_NOTE}")
    axes[0].set_title("Validation accuracy")
    _legend(axes[0])
    if train_loss:
        _plot_all(axes[1], train_loss)
        _label(axes[1], "epoch", "training loss (lower is better)")
        axes[1].set_title("Training loss")
    fig.suptitle(title)
    return fig


# -- Figure 3: critical-distance diagram ----------------------------------------------------

CD_BAR_Y = -0.9  # the CD bar, above the rank axis (y grows downwards)
CD_CLIQUE_Y = 0.3  # the first clique bar, below the axis
CD_CLIQUE_STEP = 0.2
CD_LABEL_STEP = 0.45


def _check_cliques(ranks: Mapping[str, float], cliques: Sequence[Sequence[str]]) -> None:
    unknown = sorted({name for clique in cliques for name in clique} - set(ranks))
    if unknown:
        raise ValueError(f"cliques name criteria without a rank: {unknown}")


def _cd_axis(ax: Axes, k: int) -> None:
    """The rank axis 1..k, best (lowest) rank on the left, integer and half ticks above."""
    ax.plot([1, k], [0, 0], color="black", linewidth=1)
    for tick in range(2 * k - 1):
        rank = 1 + tick / 2
        length = 0.12 if tick % 2 == 0 else 0.06
        ax.plot([rank, rank], [0, -length], color="black", linewidth=1)
        if tick % 2 == 0:
            ax.text(rank, -0.18, f"{rank:g}", ha="center", va="bottom", fontsize="small")


def _cd_bar(ax: Axes, cd: float) -> None:
    """The critical distance as a bar of that many ranks at the top left, labelled."""
    ends = (1.0, 1.0 + cd)
    ax.plot(ends, [CD_BAR_Y, CD_BAR_Y], color="black", linewidth=1.5)
    for end in ends:
        ax.plot([end, end], [CD_BAR_Y - 0.06, CD_BAR_Y + 0.06], color="black", linewidth=1.5)
    ax.text(1.0 + cd / 2, CD_BAR_Y - 0.1, f"CD = {cd:.2f}", ha="center", va="bottom")


def _cd_cliques(ax: Axes, ranks: Mapping[str, float], cliques: Sequence[Sequence[str]]) -> None:
    """A thick bar under the axis joining each group that is not significantly different."""
    for row, clique in enumerate(cliques):
        low, high = min(ranks[c] for c in clique), max(ranks[c] for c in clique)
        y = CD_CLIQUE_Y + row * CD_CLIQUE_STEP
        ax.plot([low - 0.03, high + 0.03], [y, y], color="black", linewidth=4)


def _cd_label(ax: Axes, name: str, rank: float, y: float, x_end: float, side: str) -> None:
    """An elbow from the criterion's rank down to its row, then out to its name."""
    ax.plot([rank, rank, x_end], [0, y, y], color="black", linewidth=0.8)
    pad = -0.05 if side == "right" else 0.05
    ax.text(x_end + pad, y, f"{name} ({rank:.2f})", ha=side, va="center")


def _cd_labels(ax: Axes, ranks: Mapping[str, float], top: float, span: float) -> None:
    """Better half named on the left, worse half on the right; the rank nearest each end gets
    the shortest elbow so that no lines cross."""
    order = sorted(ranks, key=lambda name: ranks[name])
    half = (len(order) + 1) // 2
    left_end, right_end = 1 - 0.1 * span, len(order) + 0.1 * span
    for row, name in enumerate(order[:half]):
        _cd_label(ax, name, ranks[name], top + row * CD_LABEL_STEP, left_end, "right")
    for row, name in enumerate(reversed(order[half:])):
        _cd_label(ax, name, ranks[name], top + row * CD_LABEL_STEP, right_end, "left")


def critical_distance(
    ranks: Mapping[str, float],
    cd: float,
    cliques: Sequence[Sequence[str]] = (),
    *,
    title: str = "Average rank of the pruning criteria (lower rank is better)",
) -> Figure:
    """Figure 3: Demšar's critical-distance diagram. ``ranks`` are the criteria's average
    ranks (1 = best), ``cd`` the Nemenyi critical distance, ``cliques`` the groups of criteria
    whose ranks are not significantly different (joined by thick bars; singletons are not
    drawn). The CD bar sits in the upper left corner as in the paper."""
    if len(ranks) < 2:
        raise ValueError("a critical-distance diagram needs at least two criteria")
    _check_cliques(ranks, cliques)
    k = len(ranks)
    span = max(k - 1.0, 1.0, cd)
    bars = [c for c in cliques if len(c) > 1]
    label_top = CD_CLIQUE_Y + CD_CLIQUE_STEP * len(bars) + 0.15
    bottom = label_top + CD_LABEL_STEP * ((k + 1) // 2)
    fig = Figure(figsize=(8.0, 1.6 + 0.55 * bottom), layout="constrained")
    ax = fig.add_subplot()
    _cd_axis(ax, k)
    _cd_bar(ax, cd)
    _cd_cliques(ax, ranks, bars)
    _cd_labels(ax, ranks, label_top, span)
    ax.set_xlim(1 - 0.55 * span, max(k, 1 + cd) + 0.55 * span)
    ax.set_ylim(bottom, CD_BAR_Y - 0.5)  # inverted: the axis on top, names below
    ax.set_axis_off()
    fig.suptitle(title)
    return fig


# -- Figure 4: loss gap --------------------------------------------------------------------


def _accuracy_points(
    ax: Axes, test_acc: Mapping[str, float], std: Mapping[str, float | None] | None
) -> None:
    """Final test accuracy per criterion as a point with a ±std error bar (over seeds, where
    given), the y axis zoomed on the spread between them. Points, not bars: a bar's height
    reads as the value, which a y axis that does not start at 0 would exaggerate."""
    names = list(test_acc)
    spreads = {name: (std or {}).get(name) for name in names}
    for index, name in enumerate(names):
        spread = spreads[name]
        ax.errorbar(
            [index],
            [test_acc[name]],
            yerr=None if spread is None else [spread],
            fmt="o",
            capsize=4,
            color=_color(name, index),
        )
    ax.set_xticks(range(len(names)), labels=names)
    low = min(test_acc[name] - (spreads[name] or 0.0) for name in names)
    high = max(test_acc[name] + (spreads[name] or 0.0) for name in names)
    margin = max(high - low, 0.01)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(max(low - margin, 0.0), min(high + margin, 1.0))
    ax.set_ylabel(f"test accuracy{ACCURACY_NOTE}")
    ax.set_title("Test accuracy (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=45)


def loss_gap_over_time(
    criteria: Sequence[Series],
    baselines: Sequence[Series] = (),
    test_acc: Mapping[str, float] | None = None,
    *,
    test_acc_std: Mapping[str, float | None] | None = None,
    title: str = "Loss gap (validation loss − training loss) over training",
) -> Figure:
    """Figure 4: the loss gap (validation loss − training loss, ``loss_gap`` per epoch) for
    each criterion and for the baselines (labelled ``dense``, ``dense + dropout``, ``static``;
    drawn dashed), showing DST's regularizing effect. With ``test_acc`` a second panel shows
    each criterion's test accuracy, as on the right of Figure 4: a point per criterion with
    its ``test_acc_std`` (over seeds; none where missing) as an error bar."""
    fig, axes = _panels(2 if test_acc else 1, sharey=False)
    _plot_all(axes[0], criteria)
    for baseline in baselines:
        _plot_baseline(axes[0], baseline)
    _label(axes[0], "epoch", "loss gap: validation − training loss\n(lower is better)")
    axes[0].set_title("Loss gap")
    _legend(axes[0])
    if test_acc:
        _accuracy_points(axes[1], test_acc, test_acc_std)
    fig.suptitle(title)
    return fig


# -- Figures 5 and 11: update period -----------------------------------------------------------


def accuracy_vs_update_period(
    panels: Mapping[str, Sequence[Series]],
    static: Mapping[str, float] | None = None,
    *,
    ylabel: str = "validation accuracy",
    title: str = ACCURACY_VS_UPDATE_PERIOD_TITLE,
) -> Figure:
    """Figure 5: accuracy against the update period Δt (log₂ axis: the paper doubles Δt from
    25 to 6400), one panel per density (or density × growth; ``panels`` maps the panel title to
    one line per criterion). ``static`` maps a panel title to static sparse training's accuracy
    there, drawn as a dashed line: no topology update at all."""
    fig, axes = _panels(len(panels))
    for ax, (name, series) in zip(axes, panels.items(), strict=True):
        _plot_all(ax, series)
        if static is not None and name in static:
            _hline(ax, static[name], "static (no updates)", "static")
        _log_x(ax, _x_values(series), base=2)
        _label(ax, "update period Δt (steps, log scale)", f"{ylabel}{ACCURACY_NOTE}")
        ax.set_title(name)
    _finish_panels(fig, axes, title)
    return fig


def itop_vs_update_period(
    panels: Mapping[str, Sequence[Series]],
    *,
    title: str = ITOP_VS_UPDATE_PERIOD_TITLE,
) -> Figure:
    """Figure 11: the ITOP ratio at the end of training (weights ever active / prunable
    weights, Appendix E) against the update period Δt on a log₂ axis, one panel per growth
    criterion, one line per pruning criterion: how much each criterion explores."""
    fig, axes = _panels(len(panels))
    for ax, (name, series) in zip(axes, panels.items(), strict=True):
        _plot_all(ax, series)
        _log_x(ax, _x_values(series), base=2)
        _label(ax, "update period Δt (steps, log scale)", "final ITOP ratio (explored fraction)")
        _unit_y(ax)
        ax.set_title(f"{name} growth")
    _finish_panels(fig, axes, title)
    return fig


# -- Figure 6: Jaccard heatmap --------------------------------------------------------------


def _check_matrix(matrix: Matrix, rows: int, columns: int, what: str) -> None:
    if len(matrix) != rows or any(len(row) != columns for row in matrix):
        raise ValueError(f"{what} must be {rows} × {columns} (rows × columns)")


def _annotate_cells(ax: Axes, matrix: Matrix, std: Matrix | None) -> None:
    """Each cell's value (and ± std, Figures 20-21), dark text on light cells; a cell without
    a value (NaN: e.g. both criteria removed nothing) reads "n/a", a missing std is left out."""
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if math.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", color="gray", fontsize="small")
                continue
            spread = math.nan if std is None else std[i][j]
            text = f"{value:.2f}" if math.isnan(spread) else f"{value:.2f}\n±{spread:.2f}"
            color = "black" if value >= 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize="small")


REFERENCES = {  # what a heatmap's reference value is, as the paper estimates it (Figure 6)
    "J_r": "random removal sets from different initializations",
    "J_init": "initial masks of different seeds",
}


def jaccard_heatmap(
    matrix: Matrix,
    rows: Sequence[str],
    columns: Sequence[str] | None = None,
    std: Matrix | None = None,
    reference: float | None = None,
    *,
    reference_name: str = "J_r",
    title: str = "Jaccard index between pruning criteria",
) -> Figure:
    """Figure 6 (and 17, 20-21): the mean Jaccard index between criteria as a heatmap on
    [0, 1], each cell annotated with its value and, given ``std``, its std over seeds (a cell
    without a value reads "n/a"). Columns default to the rows; a different column list allows
    Figure 6b's extra ``init`` row. ``reference`` is the paper's reference point, in the
    title with what it is (:data:`REFERENCES`): ``J_r``, the mean pairwise Jaccard index of
    the random criterion's removal sets from different initializations (Figure 6a), or
    ``J_init``, that of the initial masks of different seeds (Figure 6b). J_r compares sets
    from different masks, not two random picks from one state, so it is no chance level for
    the cells."""
    columns = list(rows) if columns is None else list(columns)
    _check_matrix(matrix, len(rows), len(columns), "the matrix")
    if std is not None:
        _check_matrix(std, len(rows), len(columns), "the std matrix")
    size = (max(4.5, 1.0 + 0.9 * len(columns)), 1.4 + 0.75 * len(rows))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow([list(r) for r in matrix], vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="Jaccard index (1 = same weights)")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    _annotate_cells(ax, matrix, std)
    note = ""
    if reference is not None and not math.isnan(reference):
        meaning = REFERENCES.get(reference_name)
        note = f"\n{reference_name} = {reference:.3f}" + (f" ({meaning})" if meaning else "")
    fig.suptitle(_wrapped(title, fig) + note, fontsize="medium")
    return fig


# -- Figure 7: MEST λ ------------------------------------------------------------------------


def accuracy_vs_mest_lambda(
    series: Sequence[Series],
    references: Mapping[str, float] | None = None,
    *,
    ylabel: str = "test accuracy",
    title: str = ACCURACY_VS_MEST_LAMBDA_TITLE,
) -> Figure:
    """Figure 7: accuracy of the MEST criterion against its λ, one line per density (log x
    axis; λ = 0, plain magnitude, stays on it as a linear stretch). ``references`` are
    horizontal dotted lines by label, e.g. the magnitude criterion at each density, which
    λ → 0 should match."""
    fig, axes = _panels(1, width=6.0, height=4.0)
    ax = axes[0]
    _plot_all(ax, series)
    for index, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, label=label, linestyle=":", color=_color(label, index + len(series)))
    _symlog_x(ax, _x_values(series))
    _label(ax, "MEST λ (log scale)", f"{ylabel}{ACCURACY_NOTE}")
    _legend(ax)
    fig.suptitle(title)
    return fig


# -- Figure 18: Jaccard over time -------------------------------------------------------------


def jaccard_over_time(
    panels: Mapping[str, Sequence[Series]],
    *,
    title: str = "Removal-set Jaccard index over training",
) -> Figure:
    """Figure 18: one panel per criterion a run was trained with (``panels`` maps it to its
    lines). At every topology update each other criterion picks the weights it would remove
    from the run's state; each line is the Jaccard index of that pick with what the run's
    own criterion removed, against the training step. Not symmetric between criteria. A NaN
    point (an update that removed nothing) is a gap. No reference line: J_r depends on the
    number of weights removed, which the prune schedule lowers from update to update."""
    fig, axes = _grid(len(panels))
    for ax, (trained_with, series) in zip(axes, panels.items(), strict=True):
        _plot_all(ax, series)
        _label(ax, "training step", "Jaccard index of removal sets (1 = same)")
        _unit_y(ax)
        ax.set_title(f"trained with {trained_with}")
    _finish_panels(fig, axes, title)
    return fig


# -- saving ------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    """A plain file stem: no directories, so a name from a request cannot escape ``directory``."""
    if not name or name in {".", ".."} or Path(name).name != name:
        raise ValueError(f"not a plain file name: {name!r}")


def save(fig: Figure, directory: str | Path, name: str) -> list[Path]:
    """Write ``fig`` as ``name.png`` and ``name.svg`` under ``directory`` (created if need be)
    and return the paths: PNG to look at, SVG to scale into a paper or a web page."""
    _check_name(name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=DPI)
        paths.append(path)
    return paths
