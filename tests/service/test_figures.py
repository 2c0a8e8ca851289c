"""Figure 1 (accuracy vs density, Section 4 of the paper) per setting of everything else a
study varies, each with the dense and static baselines of that same setting, and figure names
that never coincide. Every expected number is worked out by hand from the accuracies below."""

from __future__ import annotations

from typing import Any

import pytest

from service.analysis import FinishedTrial, analyze
from service.figures import build_figure, figure_names
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
    assert names == [
        "accuracy_vs_density_lr-0.01_dropout-0.0",
        "accuracy_vs_density_lr-0.1_dropout-0.0",
    ]
    assert lines(analysis, "accuracy_vs_density_lr-0.01_dropout-0.0")["dense"] == (
        pytest.approx([0.96, 0.96])
    )
    assert set(lines(analysis, "accuracy_vs_density_lr-0.1_dropout-0.0")) == {"magnitude", "snip"}


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
    from service.figures import setting_hash

    assert setting_hash({"data.root": "/d/a b"}) == "c416057e"
    names = [n for n in figure_names(analysis) if n.startswith("accuracy_vs_density")]
    assert names == [
        f"accuracy_vs_density_root--d-a-b_{setting_hash({'data.root': '/d/a b'})}",
        f"accuracy_vs_density_root--d-a-b_{setting_hash({'data.root': '/d/a/b'})}",
        "accuracy_vs_density_root--d-c",
    ]
    first = {"sparsity.density": 0.1, "data.root": "/d/a b"}
    assert f"learning_curves_density-0.1_root--d-a-b_{setting_hash(first)}" in curves
