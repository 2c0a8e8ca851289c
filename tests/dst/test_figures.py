"""The paper's figures: each builder draws what it is given, and save writes valid PNG and SVG."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from dst.figures import (
    CD_BAR_Y,
    Series,
    accuracy_vs_density,
    accuracy_vs_mest_lambda,
    accuracy_vs_update_period,
    critical_distance,
    history_series,
    itop_vs_update_period,
    jaccard_heatmap,
    jaccard_over_time,
    learning_curves,
    loss_gap_over_time,
    result_series,
    save,
)

CRITERIA = ["magnitude", "set", "snip"]
DENSITIES = [0.05, 0.1, 0.2]
PERIODS = [25, 50, 100, 200]
EPOCHS = [1, 2, 3]


def line(label: str, x: Sequence[float], offset: float = 0.0, std: bool = True) -> Series:
    y = [0.5 + 0.1 * i + offset for i in range(len(x))]
    return Series(label, x, y, [0.01] * len(x) if std else None)


def lines(x: Sequence[float], std: bool = True) -> list[Series]:
    return [line(c, x, 0.02 * i, std) for i, c in enumerate(CRITERIA)]


def assert_saved(fig: Figure, directory: Path, name: str) -> None:
    """Both files exist, the PNG has its magic bytes and the SVG parses as an <svg> document."""
    png, svg = save(fig, directory, name)
    assert (png.name, svg.name) == (f"{name}.png", f"{name}.svg")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert svg.stat().st_size > 0
    assert ET.parse(svg).getroot().tag.endswith("svg")


def title_of(fig: Figure) -> str:
    suptitle = fig.get_suptitle()
    return suptitle or fig.axes[0].get_title()


def texts(ax: Axes) -> list[str]:
    return [t.get_text() for t in ax.texts]


def xs(ln: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(ln.get_xdata(), dtype=float)]


def ys(ln: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(ln.get_ydata(), dtype=float)]


def x_base(ax: Axes) -> float:
    return ax.xaxis.get_transform().base  # type: ignore[attr-defined]


# -- Series and its sources ----------------------------------------------------------------


def test_series_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        Series("a", [1, 2], [0.5])
    with pytest.raises(ValueError, match="std"):
        Series("a", [1, 2], [0.5, 0.6], [0.1])


def test_history_series_averages_seeds_and_cuts_to_the_shortest() -> None:
    a = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.8}]
    b = [{"epoch": 1, "val_acc": 0.7}, {"epoch": 2, "val_acc": 0.9}]
    s = history_series("magnitude", [a, b], "val_acc")
    assert s.x == [1, 2]
    assert s.y == pytest.approx([0.6, 0.8])
    assert s.std == pytest.approx([np.std([0.5, 0.7], ddof=1)] * 2)
    assert history_series("one seed", [a], "val_acc").std is None
    with pytest.raises(ValueError, match="no histories"):
        history_series("none", [], "val_acc")


def test_a_diverged_seed_is_a_gap_in_the_curve_not_an_error() -> None:
    """A seed whose loss went NaN at epoch 2: that epoch has no mean and no band."""
    a = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": math.nan}]
    b = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}]
    s = history_series("magnitude", [a, b], "train_loss")
    assert s.y[0] == 0.75 and s.std is not None and s.std[0] == pytest.approx(0.5**0.5 / 2)
    assert math.isnan(s.y[1]) and math.isnan(s.std[1])
    gap = [[{"epoch": 1, "loss_gap": math.inf}], [{"epoch": 1, "loss_gap": -math.inf}]]
    both = history_series("gap", gap, "loss_gap")  # either loss diverged: fmean would raise
    assert math.isnan(both.y[0]) and both.std is not None and math.isnan(both.std[0])


def row(
    criterion: str, growth: str, density: float, mean: float | None, std: float | None
) -> dict[str, Any]:
    config = {
        "sparsity.mode": "dst",
        "sparsity.criterion": criterion,
        "sparsity.growth": growth,
        "sparsity.density": density,
    }
    return {"config": config, "n": 2, "test_acc_mean": mean, "test_acc_std": std}


def test_result_series_groups_rows_into_sorted_lines() -> None:
    rows = [
        row("magnitude", "random", 0.2, 0.8, 0.01),
        row("magnitude", "random", 0.1, 0.7, None),
        row("set", "random", 0.1, 0.6, None),
        row("set", "random", 0.2, None, None),  # no trial recorded it
        row("magnitude", "gradient", 0.1, 0.1, 0.1),  # filtered out
    ]
    magnitude, set_ = result_series(
        rows, x="sparsity.density", label="sparsity.criterion", where={"sparsity.growth": "random"}
    )
    assert (magnitude.label, magnitude.x, magnitude.y) == ("magnitude", [0.1, 0.2], [0.7, 0.8])
    assert magnitude.std == [0.0, 0.01]  # one missing std draws a zero-width band there
    assert (set_.label, set_.x, set_.y, set_.std) == ("set", [0.1], [0.6], None)


# -- the figures -----------------------------------------------------------------------------


def test_accuracy_vs_density(tmp_path: Path) -> None:
    panels = {"random": lines(DENSITIES), "gradient": lines(DENSITIES)}
    static = Series("static", DENSITIES, [0.3, 0.4, 0.5])
    fig = accuracy_vs_density(panels, dense=0.9, static=static)
    assert len(fig.axes) == 2
    for ax, growth in zip(fig.axes, panels, strict=True):
        assert ax.get_xscale() == "log"
        assert len(ax.get_lines()) == len(CRITERIA) + 2  # + static + dense
        assert len(ax.collections) == len(CRITERIA)  # a ±std band per criterion
        assert growth in ax.get_title()
        assert list(ax.get_xticks()) == pytest.approx(DENSITIES)
    dense = fig.axes[0].get_lines()[-1]
    assert ys(dense) == [0.9, 0.9]
    assert "higher is better" in fig.axes[0].get_ylabel()
    assert title_of(fig)
    assert_saved(fig, tmp_path, "accuracy-vs-density")


def test_accuracy_vs_density_without_baselines_has_one_line_per_criterion() -> None:
    fig = accuracy_vs_density({"random": lines(DENSITIES, std=False)})
    assert len(fig.axes) == 1
    assert len(fig.axes[0].get_lines()) == len(CRITERIA)
    assert not fig.axes[0].collections
    with pytest.raises(ValueError, match="at least one panel"):
        accuracy_vs_density({})


def test_learning_curves(tmp_path: Path) -> None:
    loss = [Series(c, EPOCHS, [2.0, 1.0, 0.5]) for c in CRITERIA]
    fig = learning_curves(lines(EPOCHS), loss, dense_val_acc=0.95)
    accuracy, training = fig.axes
    assert len(accuracy.get_lines()) == len(CRITERIA) + 1  # + the dense model's best
    assert len(training.get_lines()) == len(CRITERIA)
    assert accuracy.get_xlabel() == training.get_xlabel() == "epoch"
    assert "lower is better" in training.get_ylabel()
    assert title_of(fig)
    assert_saved(fig, tmp_path, "learning-curves")
    assert len(learning_curves(lines(EPOCHS)).axes) == 1


def test_critical_distance(tmp_path: Path) -> None:
    ranks = {"magnitude": 1.5, "set": 2.0, "mest": 2.4, "snip": 4.1}
    cliques = [["magnitude", "set", "mest"], ["snip"]]
    fig = critical_distance(ranks, 1.234, cliques)
    (ax,) = fig.axes
    shown = " ".join(texts(ax))
    for name, rank in ranks.items():
        assert f"{name} ({rank:.2f})" in shown
    assert "CD = 1.23" in shown
    thick = [ln for ln in ax.get_lines() if ln.get_linewidth() == 4]
    assert len(thick) == 1  # the singleton clique is not drawn
    assert min(xs(thick[0])) < 1.5 and max(xs(thick[0])) > 2.4
    bar = [ln for ln in ax.get_lines() if ys(ln) == [CD_BAR_Y, CD_BAR_Y]]
    assert [xs(b) for b in bar] == [[1.0, pytest.approx(2.234)]]
    assert "lower rank is better" in title_of(fig)
    assert_saved(fig, tmp_path, "critical-distance")


def test_critical_distance_puts_the_better_half_on_the_left() -> None:
    ranks = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}
    (ax,) = critical_distance(ranks, 1.0).axes
    side = {t.get_text().split()[0]: t.get_horizontalalignment() for t in ax.texts}
    assert [side[n] for n in "bcad"] == ["right", "right", "left", "left"]


def test_critical_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="without a rank"):
        critical_distance({"a": 1.0, "b": 2.0}, 1.0, [["a", "zzz"]])
    with pytest.raises(ValueError, match="two criteria"):
        critical_distance({"a": 1.0}, 1.0)


def test_loss_gap_over_time(tmp_path: Path) -> None:
    baselines = [
        Series("dense", EPOCHS, [0.1, 0.3, 0.6]),
        Series("dense + dropout", EPOCHS, [0.1, 0.2, 0.3]),
        Series("static", EPOCHS, [0.1, 0.2, 0.4]),
    ]
    accuracy = {"magnitude": 0.81, "set": 0.8, "snip": 0.7}
    fig = loss_gap_over_time(lines(EPOCHS), baselines, accuracy)
    gap, points = fig.axes
    assert len(gap.get_lines()) == len(CRITERIA) + len(baselines)
    dense = gap.get_lines()[len(CRITERIA)]
    assert (dense.get_label(), dense.get_linestyle(), dense.get_color()) == ("dense", "--", "black")
    assert "validation − training" in gap.get_ylabel()
    assert [ys(p.lines[0]) for p in error_bars(points)] == [[0.81], [0.8], [0.7]]
    assert title_of(fig)
    assert_saved(fig, tmp_path, "loss-gap")


def error_bars(ax: Axes) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_figure_4s_accuracies_are_points_with_their_spread_not_bars_on_a_cut_axis() -> None:
    """0.90 ± 0.01 and 0.91 (one seed) on an axis cut to about 0.87-0.93: a bar of 0.91 would
    look twice as tall as one of 0.90; points with error bars carry no such height."""
    fig = loss_gap_over_time(
        lines(EPOCHS), [], {"magnitude": 0.90, "set": 0.91}, test_acc_std={"magnitude": 0.01}
    )
    _, points = fig.axes
    assert not [p for p in points.patches if isinstance(p, Rectangle)]
    magnitude, set_ = error_bars(points)
    assert ys(magnitude.lines[0]) == [0.90] and ys(set_.lines[0]) == [0.91]
    (segment,) = magnitude.lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([0.89, 0.91])
    assert not set_.has_yerr  # one seed: no spread to draw
    assert [t.get_text() for t in points.get_xticklabels()] == ["magnitude", "set"]


def test_accuracy_vs_update_period(tmp_path: Path) -> None:
    panels = {"density 0.1": lines(PERIODS), "density 0.2": lines(PERIODS)}
    fig = accuracy_vs_update_period(panels, static={"density 0.2": 0.42})
    first, second = fig.axes
    for ax in fig.axes:
        assert (ax.get_xscale(), x_base(ax)) == ("log", 2)
        assert "Δt" in ax.get_xlabel()
    assert len(first.get_lines()) == len(CRITERIA)  # no static value given for this panel
    assert len(second.get_lines()) == len(CRITERIA) + 1
    assert ys(second.get_lines()[-1]) == [0.42, 0.42]
    assert [first.get_title(), second.get_title()] == list(panels)
    assert title_of(fig)
    assert_saved(fig, tmp_path, "update-period")


def test_jaccard_heatmap(tmp_path: Path) -> None:
    matrix = [[1.0, 0.8, 0.3], [0.8, 1.0, 0.2], [0.3, 0.2, 1.0], [0.1, 0.15, 0.12]]
    std = [[0.0, 0.05, 0.02]] * 4
    rows = [*CRITERIA, "init"]
    fig = jaccard_heatmap(matrix, rows, CRITERIA, std, reference=0.118, reference_name="J_init")
    ax = fig.axes[0]
    image = ax.get_images()[0].get_array()
    assert image is not None
    np.testing.assert_allclose(np.asarray(image), np.asarray(matrix))
    assert [t.get_text() for t in ax.get_yticklabels()] == rows
    assert [t.get_text() for t in ax.get_xticklabels()] == CRITERIA
    assert "0.80\n±0.05" in texts(ax)
    assert "J_init = 0.118 (initial masks of different seeds)" in title_of(fig)
    assert_saved(fig, tmp_path, "jaccard")


def test_jaccard_heatmap_says_what_j_r_is_and_marks_cells_without_a_value() -> None:
    """J_r is named as the paper defines it (random removal sets from different
    initializations), not as a chance level; a pair whose sets were empty in every layer has
    no index: "n/a", not "nan"; a cell with one seed shows no "±nan"."""
    nan = float("nan")
    fig = jaccard_heatmap(
        [[1.0, nan], [nan, 1.0]], ["a", "b"], std=[[0.0, nan], [0.1, nan]], reference=0.05
    )
    title = title_of(fig)
    assert "J_r = 0.050 (random removal sets from different initializations)" in title
    assert "chance" not in title
    assert sorted(texts(fig.axes[0])) == ["1.00", "1.00\n±0.00", "n/a", "n/a"]


def test_jaccard_heatmap_checks_shapes() -> None:
    with pytest.raises(ValueError, match="2 × 2"):
        jaccard_heatmap([[1.0, 0.5]], ["a", "b"])
    with pytest.raises(ValueError, match="std"):
        jaccard_heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"], std=[[0.1]])
    fig = jaccard_heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"])
    assert "J_r" not in title_of(fig)  # no reference given
    assert "0.50" in texts(fig.axes[0])


def test_accuracy_vs_mest_lambda(tmp_path: Path) -> None:
    lambdas = [0.0, 0.1, 1.0, 10.0]
    series = [line("density 0.05", lambdas), line("density 0.1", lambdas, 0.1)]
    fig = accuracy_vs_mest_lambda(series, {"magnitude, density 0.05": 0.5})
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog"  # λ = 0 stays on the axis
    assert len(ax.get_lines()) == 3
    assert "λ" in ax.get_xlabel() and "λ" in title_of(fig)
    assert_saved(fig, tmp_path, "mest-lambda")
    positive = accuracy_vs_mest_lambda([line("density 0.1", [0.1, 1.0, 10.0])])
    assert positive.axes[0].get_xscale() == "log"


def test_itop_vs_update_period(tmp_path: Path) -> None:
    panels = {"random": lines(PERIODS, std=False), "gradient": lines(PERIODS, std=False)}
    fig = itop_vs_update_period(panels)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert (ax.get_xscale(), x_base(ax)) == ("log", 2)
        assert ax.get_ylim() == pytest.approx((0.0, 1.02))
        assert len(ax.get_lines()) == len(CRITERIA)
    assert "ITOP" in fig.axes[0].get_ylabel()
    assert title_of(fig)
    assert_saved(fig, tmp_path, "itop")


def test_jaccard_over_time(tmp_path: Path) -> None:
    steps = [3200.0, 6400.0, 9600.0]
    panels = {c: [line(o, steps, std=False) for o in CRITERIA if o != c] for c in CRITERIA[:2]}
    panels["magnitude"][0] = Series("set", steps, [0.4, float("nan"), 0.5])  # a gap
    fig = jaccard_over_time(panels, title="Jaccard over time")
    axes = fig.axes
    assert len(axes) == 2
    assert [ln.get_label() for ln in axes[0].get_lines()] == ["set", "snip"]  # no J_r line
    assert [ln.get_label() for ln in axes[1].get_lines()] == ["magnitude", "snip"]
    assert np.isnan(ys(axes[0].get_lines()[0])[1])
    assert [ax.get_title() for ax in axes] == ["trained with magnitude", "trained with set"]
    assert "Jaccard" in axes[0].get_ylabel() and title_of(fig) == "Jaccard over time"
    assert_saved(fig, tmp_path, "jaccard-over-time")


# -- saving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "sub/name"])
def test_save_rejects_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        save(Figure(), tmp_path, name)


def test_save_creates_the_directory(tmp_path: Path) -> None:
    fig = Figure()
    fig.add_subplot().set_title("empty")
    paths = save(fig, tmp_path / "a" / "b", "empty")
    assert [p.parent for p in paths] == [tmp_path / "a" / "b"] * 2
    assert all(p.stat().st_size > 0 for p in paths)
