"""Figures 1, 5, 7 and 11 (accuracy vs density, accuracy and ITOP vs update period, MEST λ)
per setting of everything else a study varies, each with the baselines of that same setting;
lines and panels named by the criterion and growth the runs used when the study does not vary
them; figure names that never coincide. Every expected number is worked out by hand from the
accuracies below."""

from __future__ import annotations

from typing import Any

import pytest

from service.analysis import FinishedTrial, analyze
from service.figures import build_figure, figure_names
from service.presets import preset_study
from service.study import StudySpec, expand

DST_BASE = {0.01: 0.80, 0.1: 0.40}  # by learning rate
CRITERION_BONUS = {"magnitude": 0.05, "snip": 0.0}
DENSE = {0.01: 0.97, 0.1: 0.50}
STATIC = {0.01: 0.70, 0.1: 0.30}  # plus density / 10


def accuracy(trial: Any) -> float:
    """A trial's hand-set final test accuracy: seed 1 is 0.02 below seed 0, so each mean over
    the two seeds is 0.01 below seed 0's value."""
    s, lr = trial.sparsity, trial.training.lr
    if s.mode == "dense":
        value = DENSE[lr]
    elif s.mode == "static":
        value = STATIC[lr] + s.density / 10
    else:
        value = DST_BASE[lr] + (0.1 if s.density == 0.5 else 0.0) + CRITERION_BONUS[s.criterion]
    return value - 0.02 * trial.seed


def finished_study(grid: dict[str, Any], baselines: dict[str, Any]) -> list[FinishedTrial]:
    study = StudySpec.model_validate(
        {
            "name": "figure-1",
            "model": "small-mlp",
            "dataset": "digits",
            "training": {"lr": 0.01},
            "grid": grid | {"sparsity.density": [0.1, 0.5], "seed": [0, 1]},
            "baselines": baselines,
        }
    )
    return [
        FinishedTrial(plan.spec, {"test_acc": accuracy(plan.spec)}, plan.index)
        for plan in expand(study)
    ]


def lines(analysis: Any, name: str) -> dict[str, list[float]]:
    """Each line of the figure's one panel: its label -> its y values (a horizontal baseline
    has the same value twice)."""
    (ax,) = build_figure(analysis, name).axes
    return {str(line.get_label()): list(line.get_ydata()) for line in ax.get_lines()}


def test_one_figure_per_learning_rate_each_with_its_own_dense_and_static_runs() -> None:
    """lr 0.01: magnitude 0.80 + 0.05 - 0.01 = 0.84 at density 0.1, 0.94 at 0.5; snip 0.79,
    0.89; dense 0.97 - 0.01 = 0.96; static 0.70 + 0.01 - 0.01 = 0.70, 0.70 + 0.05 - 0.01 =
    0.74. lr 0.1: magnitude 0.44, 0.54; snip 0.39, 0.49; dense 0.49; static 0.30, 0.34."""
    trials = finished_study(
        {"training.lr": [0.01, 0.1], "sparsity.criterion": ["magnitude", "snip"]},
        {"dense": True, "static": True},
    )
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    names = [n for n in figure_names(analysis) if n.startswith("accuracy_vs_density")]
    assert names == ["accuracy_vs_density_lr-0.01", "accuracy_vs_density_lr-0.1"]
    assert lines(analysis, "accuracy_vs_density_lr-0.01") == {
        "magnitude": pytest.approx([0.84, 0.94]),
        "snip": pytest.approx([0.79, 0.89]),
        "static": pytest.approx([0.70, 0.74]),
        "dense": pytest.approx([0.96, 0.96]),
    }
    assert lines(analysis, "accuracy_vs_density_lr-0.1") == {
        "magnitude": pytest.approx([0.44, 0.54]),
        "snip": pytest.approx([0.39, 0.49]),
        "static": pytest.approx([0.30, 0.34]),
        "dense": pytest.approx([0.49, 0.49]),
    }
    figure = build_figure(analysis, "accuracy_vs_density_lr-0.1")
    assert figure.get_suptitle().endswith("(lr 0.1)")


def test_a_dst_only_field_splits_the_lines_and_the_baselines_stand_beside_every_setting() -> None:
    """The schedule is DST-only (dense and static runs have none): one figure per schedule,
    each line from its own schedule's runs only; the one dense run (0.96) and static line
    (0.70, 0.74) in both. The constant schedule's values are lowered by hand by 0.2."""
    trials = finished_study(
        {"sparsity.schedule": ["cosine", "constant"], "sparsity.criterion": ["magnitude", "snip"]},
        {"dense": True, "static": True},
    )
    for trial in trials:
        if trial.spec.sparsity.schedule == "constant" and trial.spec.sparsity.mode == "dst":
            trial.metrics["test_acc"] -= 0.2
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    baselines = {"static": pytest.approx([0.70, 0.74]), "dense": pytest.approx([0.96, 0.96])}
    assert lines(analysis, "accuracy_vs_density_schedule-cosine") == {
        "magnitude": pytest.approx([0.84, 0.94]),
        "snip": pytest.approx([0.79, 0.89]),
        **baselines,
    }
    assert lines(analysis, "accuracy_vs_density_schedule-constant") == {
        "magnitude": pytest.approx([0.64, 0.74]),
        "snip": pytest.approx([0.59, 0.69]),
        **baselines,
    }


def test_no_dense_line_rather_than_another_settings() -> None:
    """The lr 0.1 dense runs have not finished: its figure has no dense line (not lr 0.01's
    0.96); the dense + dropout runs are not Figure 1's dense line either."""
    trials = finished_study(
        {"training.lr": [0.01, 0.1], "sparsity.criterion": ["magnitude", "snip"]},
        {"dense": True, "dense_dropout": 0.05},
    )
    kept = [
        t
        for t in trials
        if not (t.spec.sparsity.mode == "dense" and t.spec.training.lr == 0.1)
        or t.spec.training.dropout
    ]
    analysis = analyze([t.spec for t in trials], kept, partial=False)
    names = [n for n in figure_names(analysis) if n.startswith("accuracy_vs_density")]
    # the dropout varies only through the dense + dropout baseline: it splits no figure
    assert names == ["accuracy_vs_density_lr-0.01", "accuracy_vs_density_lr-0.1"]
    assert lines(analysis, "accuracy_vs_density_lr-0.01")["dense"] == pytest.approx([0.96, 0.96])
    assert set(lines(analysis, "accuracy_vs_density_lr-0.1")) == {"magnitude", "snip"}


def test_settings_whose_names_would_coincide_get_a_hash_each() -> None:
    """Data roots ``/d/a b`` and ``/d/a/b`` both read ``root--d-a-b`` in a file name: each
    figure of theirs gets its setting's hash (the first 8 hex digits of the SHA-256 of the
    setting as sorted JSON), so neither file overwrites the other; ``/d/c`` keeps its name.
    Learning curves are drawn per setting of everything but the criterion: root and density."""
    specs = []
    for root in ("/d/a b", "/d/a/b", "/d/c"):
        for density in (0.1, 0.5):
            spec = finished_study({"sparsity.criterion": ["magnitude"]}, {})[0].spec
            data = spec.data.model_copy(update={"root": root})
            sparsity = spec.sparsity.model_copy(update={"density": density})
            specs.append(spec.model_copy(update={"data": data, "sparsity": sparsity}))
    epoch = {"epoch": 1, "step": 10.0, "val_acc": 0.5, "train_loss": 1.0, "loss_gap": 0.1}
    trials = [FinishedTrial(s, {"test_acc": 0.5}, i, [epoch]) for i, s in enumerate(specs)]
    analysis = analyze(specs, trials, partial=False)
    curves = [n for n in figure_names(analysis) if n.startswith("learning_curves")]
    assert len(set(curves)) == 6  # three roots × two densities
    from service.analysis import setting_hash

    assert setting_hash({"data.root": "/d/a b"}) == "c416057e"
    names = [n for n in figure_names(analysis) if n.startswith("accuracy_vs_density")]
    assert names == [
        f"accuracy_vs_density_root--d-a-b_{setting_hash({'data.root': '/d/a b'})}",
        f"accuracy_vs_density_root--d-a-b_{setting_hash({'data.root': '/d/a/b'})}",
        "accuracy_vs_density_root--d-c",
    ]
    first = {"sparsity.density": 0.1, "data.root": "/d/a b"}
    assert f"learning_curves_density-0.1_root--d-a-b_{setting_hash(first)}" in curves


def study_trials(
    grid: dict[str, Any],
    score: Any,
    baselines: dict[str, Any] | None = None,
    sparsity: dict[str, Any] | None = None,
) -> list[FinishedTrial]:
    """The trials of a study over ``grid`` (seeds 0 and 1), each finished with ``score(spec)``
    (a dict of final metrics) less 0.02 for seed 1: every mean over the two seeds is 0.01
    below seed 0's value."""
    study = StudySpec.model_validate(
        {
            "name": "figures",
            "model": "small-mlp",
            "dataset": "digits",
            "training": {"lr": 0.01},
            "sparsity": sparsity or {},
            "grid": grid | {"seed": [0, 1]},
            "baselines": baselines or {},
        }
    )
    return [
        FinishedTrial(
            plan.spec,
            {k: v - 0.02 * plan.spec.seed for k, v in score(plan.spec).items()},
            plan.index,
        )
        for plan in expand(study)
    ]


def panels(analysis: Any, name: str) -> dict[str, dict[str, list[float]]]:
    """Each panel of the figure by its title: its lines' labels -> their y values."""
    return {
        ax.get_title(): {str(line.get_label()): list(line.get_ydata()) for line in ax.get_lines()}
        for ax in build_figure(analysis, name).axes
    }


def names_of(analysis: Any, stem: str) -> list[str]:
    return [n for n in figure_names(analysis) if n == stem or n.startswith(f"{stem}_")]


PERIOD_BASE = {0.01: 0.90, 0.1: 0.30}  # by learning rate
STATIC_BY_LR = {0.01: 0.70, 0.1: 0.20}


def period_score(spec: Any) -> dict[str, float]:
    """Static: its learning rate's value. DST: its learning rate's, + 0.05 for magnitude,
    + 0.01 at Δt = 50."""
    s, lr = spec.sparsity, spec.training.lr
    if s.mode == "static":
        return {"test_acc": STATIC_BY_LR[lr]}
    bonus = CRITERION_BONUS[s.criterion] + (0.01 if s.update_period == 50 else 0.0)
    return {"test_acc": PERIOD_BASE[lr] + bonus}


def test_figure_5_once_per_learning_rate_each_with_its_own_static_run() -> None:
    """lr 0.01: magnitude 0.90 + 0.05 - 0.01 = 0.94 at Δt 25, 0.95 at 50; snip 0.89, 0.90;
    static 0.70 - 0.01 = 0.69. lr 0.1: magnitude 0.34, 0.35; snip 0.29, 0.30; static 0.19.
    The density is not varied: the one panel is titled by it (0.1, the spec's default)."""
    trials = study_trials(
        {
            "training.lr": [0.01, 0.1],
            "sparsity.update_period": [25, 50],
            "sparsity.criterion": ["magnitude", "snip"],
        },
        period_score,
        {"static": True},
    )
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    assert names_of(analysis, "accuracy_vs_update_period") == [
        "accuracy_vs_update_period_lr-0.01",
        "accuracy_vs_update_period_lr-0.1",
    ]
    static = "static (no updates)"
    assert panels(analysis, "accuracy_vs_update_period_lr-0.01") == {
        "density 0.1": {
            "magnitude": pytest.approx([0.94, 0.95]),
            "snip": pytest.approx([0.89, 0.90]),
            static: pytest.approx([0.69, 0.69]),
        }
    }
    assert panels(analysis, "accuracy_vs_update_period_lr-0.1") == {
        "density 0.1": {
            "magnitude": pytest.approx([0.34, 0.35]),
            "snip": pytest.approx([0.29, 0.30]),
            static: pytest.approx([0.19, 0.19]),
        }
    }
    figure = build_figure(analysis, "accuracy_vs_update_period_lr-0.1")
    assert figure.get_suptitle().endswith("(lr 0.1)")


def test_figure_5_has_no_static_line_rather_than_another_settings() -> None:
    """The lr 0.1 static run has not finished: its figure has no static line (not lr 0.01's
    0.69)."""
    trials = study_trials(
        {
            "training.lr": [0.01, 0.1],
            "sparsity.update_period": [25, 50],
            "sparsity.criterion": ["magnitude", "snip"],
        },
        period_score,
        {"static": True},
    )
    kept = [
        t for t in trials if not (t.spec.sparsity.mode == "static" and t.spec.training.lr == 0.1)
    ]
    analysis = analyze([t.spec for t in trials], kept, partial=False)
    (lr_01,) = panels(analysis, "accuracy_vs_update_period_lr-0.1").values()
    assert set(lr_01) == {"magnitude", "snip"}
    (lr_001,) = panels(analysis, "accuracy_vs_update_period_lr-0.01").values()
    assert lr_001["static (no updates)"] == pytest.approx([0.69, 0.69])


def test_figure_5_plots_the_validation_accuracy() -> None:
    """As the paper's Figure 5: the final validation accuracy, here the test accuracy + 0.03
    (lr 0.01: magnitude 0.94 + 0.03 = 0.97 at Δt 25, 0.98 at 50; snip 0.92, 0.93; static
    0.69 + 0.03 = 0.72), not the test accuracy, and the y axis says so. Without validation
    accuracies (every other test here) it is the test accuracy, and the axis says that."""

    def validated(spec: Any) -> dict[str, float]:
        score = period_score(spec)
        return score | {"val_acc": score["test_acc"] + 0.03}

    grid = {"sparsity.update_period": [25, 50], "sparsity.criterion": ["magnitude", "snip"]}
    trials = study_trials(grid, validated, {"static": True})
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    assert panels(analysis, "accuracy_vs_update_period") == {
        "density 0.1": {
            "magnitude": pytest.approx([0.97, 0.98]),
            "snip": pytest.approx([0.92, 0.93]),
            "static (no updates)": pytest.approx([0.72, 0.72]),
        }
    }
    (ax,) = build_figure(analysis, "accuracy_vs_update_period").axes
    assert ax.get_ylabel().startswith("validation accuracy")
    untested = study_trials(grid, period_score, {"static": True})
    analysis = analyze([t.spec for t in untested], untested, partial=False)
    (ax,) = build_figure(analysis, "accuracy_vs_update_period").axes
    assert ax.get_ylabel().startswith("test accuracy (no validation accuracy recorded)")


ITOP_BASE = {0.01: 0.50, 0.1: 0.80}  # by learning rate


def itop_score(spec: Any) -> dict[str, float]:
    """ITOP: its learning rate's value, + 0.1 with gradient growth, + 0.05 at Δt = 50, + 0.02
    for snip; the test accuracy as for Figure 5."""
    s = spec.sparsity
    itop = ITOP_BASE[spec.training.lr] + (0.1 if s.growth == "gradient" else 0.0)
    itop += (0.05 if s.update_period == 50 else 0.0) + (0.02 if s.criterion == "snip" else 0.0)
    return period_score(spec) | {"itop": itop}


def test_figure_11_once_per_learning_rate_with_a_panel_per_growth() -> None:
    """Figure 11 draws the growth as its panels: one figure per learning rate. Figure 5 does
    not: one per learning rate and growth. ITOP means (Δt 25, 50), lr 0.01: random growth
    magnitude 0.50 - 0.01 = 0.49, 0.54; snip 0.51, 0.56; gradient growth magnitude 0.59, 0.64;
    snip 0.61, 0.66. lr 0.1: each 0.3 higher."""
    trials = study_trials(
        {
            "training.lr": [0.01, 0.1],
            "sparsity.growth": ["random", "gradient"],
            "sparsity.update_period": [25, 50],
            "sparsity.criterion": ["magnitude", "snip"],
        },
        itop_score,
    )
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    assert names_of(analysis, "itop_vs_update_period") == [
        "itop_vs_update_period_lr-0.01",
        "itop_vs_update_period_lr-0.1",
    ]
    assert names_of(analysis, "accuracy_vs_update_period") == [
        "accuracy_vs_update_period_lr-0.01_growth-gradient",
        "accuracy_vs_update_period_lr-0.01_growth-random",
        "accuracy_vs_update_period_lr-0.1_growth-gradient",
        "accuracy_vs_update_period_lr-0.1_growth-random",
    ]
    assert panels(analysis, "itop_vs_update_period_lr-0.01") == {
        "gradient growth": {
            "magnitude": pytest.approx([0.59, 0.64]),
            "snip": pytest.approx([0.61, 0.66]),
        },
        "random growth": {
            "magnitude": pytest.approx([0.49, 0.54]),
            "snip": pytest.approx([0.51, 0.56]),
        },
    }
    assert panels(analysis, "itop_vs_update_period_lr-0.1") == {
        "gradient growth": {
            "magnitude": pytest.approx([0.89, 0.94]),
            "snip": pytest.approx([0.91, 0.96]),
        },
        "random growth": {
            "magnitude": pytest.approx([0.79, 0.84]),
            "snip": pytest.approx([0.81, 0.86]),
        },
    }
    (gradient,) = panels(analysis, "accuracy_vs_update_period_lr-0.1_growth-gradient").values()
    assert gradient == {
        "magnitude": pytest.approx([0.34, 0.35]),
        "snip": pytest.approx([0.29, 0.30]),
    }


def test_lines_and_panels_name_the_criterion_and_growth_the_study_holds_fixed() -> None:
    """Only SNIP with gradient growth, over Δt and the density: Figure 1's panel is
    "gradient growth" (not "random growth") and its line "snip" (not "None"); so are Figure
    5's lines and Figure 11's. Accuracy 0.60, + 0.01 at Δt 50, + 0.1 at density 0.5; ITOP
    0.40, + 0.05 at Δt 50, + 0.1 at density 0.5; each mean 0.01 lower. Figure 1 is drawn
    once per Δt; Figure 11's panels name the density too (it has two)."""

    def score(spec: Any) -> dict[str, float]:
        s = spec.sparsity
        late, high = (s.update_period == 50), (s.density == 0.5)
        return {
            "test_acc": 0.60 + 0.01 * late + 0.1 * high,
            "itop": 0.40 + 0.05 * late + 0.1 * high,
        }

    trials = study_trials(
        {"sparsity.update_period": [25, 50], "sparsity.density": [0.1, 0.5]},
        score,
        sparsity={"criterion": "snip", "growth": "gradient"},
    )
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    assert panels(analysis, "accuracy_vs_density_update_period-25") == {
        "gradient growth": {"snip": pytest.approx([0.59, 0.69])}
    }
    assert panels(analysis, "accuracy_vs_density_update_period-50") == {
        "gradient growth": {"snip": pytest.approx([0.60, 0.70])}
    }
    assert panels(analysis, "accuracy_vs_update_period") == {
        "density 0.1": {"snip": pytest.approx([0.59, 0.60])},
        "density 0.5": {"snip": pytest.approx([0.69, 0.70])},
    }
    assert panels(analysis, "itop_vs_update_period") == {
        "density 0.1, gradient growth": {"snip": pytest.approx([0.39, 0.44])},
        "density 0.5, gradient growth": {"snip": pytest.approx([0.49, 0.54])},
    }


MEST_BASE = {0.01: 0.80, 0.1: 0.40}  # by learning rate


def mest_score(spec: Any) -> dict[str, float]:
    """Its learning rate's value, + 0.1 at density 0.5, - 0.05 at λ = 10."""
    s = spec.sparsity
    high, large = (s.density == 0.5), (s.mest_lambda == 10.0)
    return {"test_acc": MEST_BASE[spec.training.lr] + 0.1 * high - 0.05 * large}


def test_figure_7_once_per_learning_rate_and_figure_1_labelled_mest() -> None:
    """As the fig7-mest-lambda preset (MEST alone, gradient growth) over two learning rates.
    Figure 7 (λ 0, 10), lr 0.01: density 0.1 at 0.80 - 0.01 = 0.79, 0.74; density 0.5 at
    0.89, 0.84. lr 0.1: 0.39, 0.34; 0.49, 0.44. Figure 1 (densities 0.1, 0.5) per learning
    rate and λ, its line "mest": lr 0.1 at λ 10: 0.34, 0.44."""
    trials = study_trials(
        {
            "training.lr": [0.01, 0.1],
            "sparsity.mest_lambda": [0.0, 10.0],
            "sparsity.density": [0.1, 0.5],
        },
        mest_score,
        sparsity={"criterion": "mest", "growth": "gradient"},
    )
    analysis = analyze([t.spec for t in trials], trials, partial=False)
    assert names_of(analysis, "accuracy_vs_mest_lambda") == [
        "accuracy_vs_mest_lambda_lr-0.01",
        "accuracy_vs_mest_lambda_lr-0.1",
    ]
    assert lines(analysis, "accuracy_vs_mest_lambda_lr-0.01") == {
        "0.1": pytest.approx([0.79, 0.74]),
        "0.5": pytest.approx([0.89, 0.84]),
    }
    assert lines(analysis, "accuracy_vs_mest_lambda_lr-0.1") == {
        "0.1": pytest.approx([0.39, 0.34]),
        "0.5": pytest.approx([0.49, 0.44]),
    }
    assert panels(analysis, "accuracy_vs_density_lr-0.1_mest_lambda-10.0") == {
        "gradient growth": {"mest": pytest.approx([0.34, 0.44])}
    }


def test_the_fig7_preset_keeps_its_figure_names_and_draws_no_other_criterion_as_mest() -> None:
    """One setting: Figure 7 keeps its single-setting name; Figure 1, drawn per λ, labels its
    line "mest" in a "gradient growth" panel. A λ sweep of magnitude alone (λ is no part of
    its score) has no Figure 7: its runs are not MEST's."""
    study = preset_study("fig7-mest-lambda", {"grid.seed": [0]})
    specs = [plan.spec for plan in expand(StudySpec.model_validate(study))]
    trials = [FinishedTrial(s, {"test_acc": 0.5}, i) for i, s in enumerate(specs)]
    analysis = analyze(specs, trials, partial=False)
    assert "accuracy_vs_mest_lambda" in figure_names(analysis)
    assert panels(analysis, "accuracy_vs_density_mest_lambda-1.0") == {
        "gradient growth": {"mest": pytest.approx([0.5, 0.5])}
    }
    magnitude = [
        s.model_copy(update={"sparsity": s.sparsity.model_copy(update={"criterion": "magnitude"})})
        for s in specs
    ]
    trials = [FinishedTrial(s, {"test_acc": 0.5}, i) for i, s in enumerate(magnitude)]
    analysis = analyze(magnitude, trials, partial=False)
    assert "accuracy_vs_density_mest_lambda-1.0" in figure_names(analysis)
    assert names_of(analysis, "accuracy_vs_mest_lambda") == []


def test_a_setting_too_long_for_a_file_name_is_named_by_its_hash() -> None:
    """A figure is written as a file: a 300-character data root would pass the 255 bytes a
    file name may have, so that setting's figure is named by its hash."""
    from service.analysis import MAX_SETTING_NAME, setting_hash, setting_names

    long = {"data.root": "/d/" + "x" * 300}
    names = setting_names("accuracy_vs_density", [long, {"data.root": "/d/y"}])
    assert names == [
        f"accuracy_vs_density_{setting_hash(long)}",
        "accuracy_vs_density_root--d-y",
    ]
    assert all(len(n) <= MAX_SETTING_NAME for n in names)
