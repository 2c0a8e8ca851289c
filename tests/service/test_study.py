"""Study specs: grid validation, expansion into trials, baselines, aggregation over seeds."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.study import StudySpec, aggregate, expand, grid_fields


def study(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "s", "model": "small-mlp", "dataset": "digits"}
    return base | extra


def test_grid_is_a_cartesian_product_of_run_specs() -> None:
    spec = StudySpec.model_validate(
        study(
            grid={
                "criterion": ["magnitude", "snip"],
                "sparsity.density": [0.1, 0.2],
                "seed": [0, 1, 2],
            }
        )
    )
    plans = expand(spec)
    assert len(plans) == 2 * 2 * 3
    combos = {(p.spec.sparsity.criterion, p.spec.sparsity.density, p.spec.seed) for p in plans}
    assert len(combos) == 12
    assert [p.index for p in plans] == list(range(12))
    assert all(p.spec.name == f"s/{p.index}" for p in plans)


def test_baselines_are_added_once_per_density_and_seed() -> None:
    spec = StudySpec.model_validate(
        study(
            grid={
                "criterion": ["magnitude", "set", "snip"],
                "density": [0.05, 0.1],
                "seed": [0, 1],
            },
            baselines={"dense": True, "static": True},
        )
    )
    plans = expand(spec)
    modes = [p.spec.sparsity.mode for p in plans]
    assert modes.count("dst") == 12
    assert modes.count("static") == 4  # 2 densities x 2 seeds
    assert modes.count("dense") == 2  # 2 seeds
    dense = [p.spec for p in plans if p.spec.sparsity.mode == "dense"]
    assert {d.sparsity.density for d in dense} == {1.0}
    assert {p.label for p in plans if p.spec.sparsity.mode == "static"} == {
        "static density=0.05 seed=0", "static density=0.05 seed=1",
        "static density=0.1 seed=0", "static density=0.1 seed=1",
    }  # fmt: skip


def test_no_grid_is_one_trial() -> None:
    assert len(expand(StudySpec.model_validate(study()))) == 1


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"sparsity.colour": [1]}, "unknown grid field"),
        ({"criterion": []}, "empty list"),
        ({"criterion": ["magnitude", "nope"]}, "grid.sparsity.criterion[1]"),
        ({"density": [0.1, 1.5]}, "grid.sparsity.density[1]"),
        ({"dataset": ["digits", "breast_cancer"], "model": ["small-cnn"]}, "grid combination"),
    ],
)
def test_bad_grids_name_the_field(grid: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(study(grid=grid))
    assert message in str(info.value)


def test_grid_fields_cover_every_section() -> None:
    fields = grid_fields()
    for name in ("seed", "model", "sparsity.criterion", "sparsity.update_period", "training.lr"):
        assert name in fields


def test_aggregate_gives_mean_and_std_over_seeds() -> None:
    spec = StudySpec.model_validate(
        study(grid={"criterion": ["magnitude", "snip"], "seed": [0, 1]})
    )
    finished = []
    for plan in expand(spec):
        acc = {("magnitude", 0): 0.8, ("magnitude", 1): 0.6}.get(
            (plan.spec.sparsity.criterion, plan.spec.seed), 0.5
        )
        finished.append((plan.spec, {"test_acc": acc, "test_loss": 1.0 - acc}))
    rows = {r.criterion: r for r in aggregate(finished)}
    assert rows["magnitude"].seeds == 2
    assert rows["magnitude"].test_acc_mean == pytest.approx(0.7)
    assert rows["magnitude"].test_acc_std == pytest.approx(0.1414213562, rel=1e-6)  # sample std
    assert rows["snip"].test_acc_std == 0.0
    assert rows["snip"].test_loss_mean == pytest.approx(0.5)
