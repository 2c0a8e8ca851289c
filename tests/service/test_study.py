"""Study specs: grid validation, expansion into trials, baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dst.spec import RunSpec
from service.study import MAX_GRID, StudySpec, expand, grid_fields, stored_ranking


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
    ],
)
def test_bad_grids_name_the_field(grid: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(study(grid=grid))
    assert message in str(info.value)


def test_a_combination_no_value_alone_rules_out_is_refused_when_expanded() -> None:
    """Validation counts the grid without expanding it; expanding checks each combination."""
    spec = StudySpec.model_validate(
        study(grid={"dataset": ["digits", "breast_cancer"], "model": ["small-cnn"]})
    )
    assert spec.grid_size() == 2
    with pytest.raises(ValueError, match="grid combination"):
        expand(spec)


def test_an_oversized_grid_is_counted_not_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.study

    def no_expanding(*args: Any) -> None:
        raise AssertionError("validation expanded the grid")

    def no_checking(*args: Any) -> None:
        raise AssertionError("validation checked the values of a grid it could count")

    monkeypatch.setattr(service.study, "expand", no_expanding)
    monkeypatch.setattr(service.study, "_check_value", no_checking)
    densities = [round(0.05 * i, 2) for i in range(1, 21)]  # 0.05, 0.1, ..., 1.0
    huge = {"seed": list(range(10_000)), "sparsity.density": densities}
    with pytest.raises(ValidationError, match="expands to 200000 trials") as raised:
        StudySpec.model_validate(study(grid=huge))
    assert [e["loc"] for e in raised.value.errors()] == [("grid",)]


def test_repeated_grid_values_are_dropped_and_not_counted() -> None:
    """A value that makes the same run as an earlier one adds no trial: the grid keeps each
    value once (the first, in order), so its size counts the trials it can make."""
    spec = StudySpec.model_validate(
        study(grid={"seed": [1, 0, 1, 0.0], "density": [0.1, 0.1], "criterion": ["snip"]})
    )
    assert spec.grid == {"seed": [1, 0], "sparsity.density": [0.1], "sparsity.criterion": ["snip"]}
    assert spec.grid_size() == 2
    assert [p.spec.seed for p in expand(spec)] == [1, 0]
    # 10,000 seeds x 11 listed densities would be 110,000 > MAX_GRID, but it is 10,000 trials
    many = StudySpec.model_validate(
        study(grid={"seed": list(range(10_000)), "density": [0.2] * 11})
    )
    assert MAX_GRID == 100_000 and many.grid_size() == 10_000


def test_the_longest_study_name_leaves_every_trial_a_valid_run_spec() -> None:
    """Trials are named "<study name>/<index>": with a 200-character study name (the most
    allowed) each trial's stored spec must still validate as a run spec."""
    name = "n" * 200
    spec = StudySpec.model_validate(
        study(
            name=name,
            grid={"criterion": ["magnitude", "snip"], "seed": list(range(6))},
            baselines={"dense": True, "static": True},
        )
    )
    plans = expand(spec)
    assert len(plans) == 2 * 6 + 6 + 6  # the DST runs, a static and a dense run per seed
    for plan in plans:
        stored = RunSpec.model_validate_json(plan.spec.model_dump_json())
        assert stored.name == f"{name}/{plan.index}"
    # the largest index: 100,000 grid runs, each with a static, a dense and a dense + dropout
    # baseline, make 400,000 trials, the last numbered 399,999
    from service.study import MAX_TRIALS

    assert MAX_TRIALS == 400_000
    assert RunSpec.model_validate({**study(), "name": f"{name}/399999"}).name == f"{name}/399999"
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(study(name=name + "n"))
    assert [(e["loc"], e["ctx"]) for e in info.value.errors()] == [(("name",), {"max_length": 200})]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"name": "a\x00b"}, r"name: 'a\\x00b' contains a NUL character"),
        ({"tags": {"k\x00": "v"}}, r"tags\.k\\x00: 'k\\x00' contains a NUL character"),
        ({"tags": {"k": "v\x00"}}, r"tags\.k: 'v\\x00' contains a NUL character"),
        ({"data": {"root": "/data\x00"}}, r"data\.root: '/data\\x00' contains a NUL"),
        ({"grid": {"seed": [0, "\x00"]}}, r"grid\.seed\.1: '\\x00' contains a NUL"),
        ({"tags": {"\ud800": "v"}}, r"tags\.\\ud800: '\\ud800' is not valid Unicode"),
        ({"grid": {"\udfff": [1]}}, r"grid\.\\udfff: '\\udfff' is not valid Unicode"),
    ],
)
def test_text_that_cannot_be_stored_is_refused_naming_the_field_escaped(
    extra: dict[str, Any], message: str
) -> None:
    """NUL (PostgreSQL's text refuses it) and lone surrogates (no UTF-8 for them) anywhere,
    keys included; the error shows them escaped, so the error itself can be encoded."""
    with pytest.raises(ValidationError, match=message) as info:
        StudySpec.model_validate(study(**extra))
    str(info.value).encode("utf-8")


def test_grid_fields_cover_every_section() -> None:
    fields = grid_fields()
    for name in ("seed", "model", "sparsity.criterion", "sparsity.update_period", "training.lr"):
        assert name in fields


def test_dense_dropout_baseline_is_a_dense_run_per_seed_with_dropout() -> None:
    spec = StudySpec.model_validate(
        study(
            grid={"criterion": ["magnitude", "snip"], "density": [0.1, 0.2], "seed": [0, 1]},
            baselines={"dense": True, "dense_dropout": 0.05},
        )
    )
    plans = expand(spec)
    dense = [p for p in plans if p.spec.sparsity.mode == "dense"]
    assert len(dense) == 4  # (plain, dropout) x 2 seeds
    with_dropout = [p for p in dense if p.spec.training.dropout == 0.05]
    assert sorted(p.label for p in with_dropout) == [
        "dense dropout=0.05 seed=0",
        "dense dropout=0.05 seed=1",
    ]
    assert {p.spec.sparsity.density for p in with_dropout} == {1.0}
    assert all(p.spec.training.dropout == 0.0 for p in plans if p not in with_dropout)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"baselines": {"dense_dropout": 1.0}}, "baselines.dense_dropout"),
        ({"baselines": {"dense_dropout": True}}, "baselines.dense_dropout"),
        ({"training": {"dropout": -0.1}}, "training.dropout"),
        ({"training": {"dropout": 1}}, "training.dropout"),
        ({"sparsity": {"schedule_interval": 0}}, "sparsity.schedule_interval"),
        ({"sparsity": {"schedule_factor": 0}}, "sparsity.schedule_factor"),
        ({"sparsity": {"schedule_factor": 1.5}}, "sparsity.schedule_factor"),
    ],
)
def test_new_fields_out_of_range_name_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(study(**extra))
    locs = {".".join(str(p) for p in e["loc"]) for e in info.value.errors()}
    assert field in locs


def test_dropout_on_a_model_without_dropout_names_the_field_and_the_models() -> None:
    with pytest.raises(
        ValidationError, match=r"training\.dropout: model 'small-cnn' has no dropout"
    ):
        StudySpec.model_validate(study(model="small-cnn", training={"dropout": 0.05}))
    spec = StudySpec.model_validate(study(model="small-cnn", baselines={"dense_dropout": 0.05}))
    with pytest.raises(ValueError, match="available for small-mlp, large-mlp"):
        expand(spec)  # the baseline runs are built (and checked) when the study is expanded


def test_linear_schedule_parameters_only_split_linear_runs() -> None:
    spec = StudySpec.model_validate(
        study(grid={"schedule": ["cosine", "linear"], "schedule_interval": [300, 600]})
    )
    plans = expand(spec)
    assert sorted((p.spec.sparsity.schedule, p.spec.sparsity.schedule_interval) for p in plans) == [
        ("cosine", 600),
        ("linear", 300),
        ("linear", 600),
    ]


@pytest.mark.parametrize(
    ("resources", "device", "message"),
    [
        ({"gpus_per_trial": 2}, "cuda", "a one-worker trial uses one GPU"),
        ({"gpus_per_trial": 1, "workers_per_trial": 2}, "cuda", "one GPU per worker, so use 2"),
        ({"gpus_per_trial": 0.5, "workers_per_trial": 2}, "cuda", "one GPU per worker"),
        ({"gpus_per_trial": 0.25}, "cpu", "would leave the trial's GPU idle"),
        ({"gpus_per_trial": 1}, "cuda:1", "use 'cuda'"),
        ({}, "cuda", "device 'cuda' needs resources.gpus_per_trial > 0"),
        ({"cpus_per_trial": 5000}, "cpu", "less than or equal to 1024"),
    ],
)
def test_gpu_resources_that_cannot_work_are_refused(
    resources: dict[str, Any], device: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        StudySpec.model_validate(study(resources=resources, device=device))


def test_fractional_gpus_share_a_gpu_and_ddp_trials_take_one_per_worker() -> None:
    shared = StudySpec.model_validate(study(resources={"gpus_per_trial": 0.25}, device="cuda"))
    assert shared.resources.bundles() == [{"CPU": 1.0, "GPU": 0.25}]
    ddp = StudySpec.model_validate(
        study(resources={"cpus_per_trial": 8, "gpus_per_trial": 4, "workers_per_trial": 4})
        | {"device": "auto"}
    )
    bundles = ddp.resources.bundles()
    assert bundles[0] == {"CPU": 0.01, "GPU": 0.0}  # the Tune process that waits on Train
    assert bundles[1:] == [{"CPU": 2.0, "GPU": 1.0}] * 4


@pytest.mark.parametrize(
    ("training", "grid", "smallest"),
    [
        ({"batch_size": 2}, {}, 2),
        ({"batch_size": 64}, {"training.batch_size": [64, 3]}, 3),
        ({}, {"model": ["small-mlp", "large-mlp"]}, 128),  # the models' default batch
    ],
)
def test_a_global_batch_smaller_than_the_workers_is_refused(
    training: dict[str, Any], grid: dict[str, Any], smallest: int
) -> None:
    """Each worker trains on its share of every global batch: it needs one sample at least."""
    data = study(resources={"workers_per_trial": 4}) | {"grid": grid}
    data["training"] = {**data.get("training", {}), **training}
    if smallest >= 4:
        assert StudySpec.model_validate(data).resources.workers_per_trial == 4
        data["resources"] = {"workers_per_trial": smallest + 1}
    with pytest.raises(ValidationError, match=f"training.batch_size = {smallest} with resources"):
        StudySpec.model_validate(data)


@pytest.mark.parametrize(
    ("training", "grid", "option"),
    [
        ({"optimizer_kernel": "fused"}, {}, "training.optimizer_kernel 'fused'"),
        ({}, {"training.optimizer_kernel": ["auto", "fused"]}, "optimizer_kernel 'fused'"),
        ({"sync_batchnorm": True}, {}, "training.sync_batchnorm"),
        ({}, {"training.sync_batchnorm": [False, "true"]}, "training.sync_batchnorm"),
    ],
)
def test_cuda_only_options_need_a_gpu_per_trial(
    training: dict[str, Any], grid: dict[str, Any], option: str
) -> None:
    """With no GPU for the trial, device 'auto' is the CPU inside Ray, where these fail: so
    they are refused at submission, not inside the worker."""
    data = study(device="auto", training=training, grid=grid)
    data["resources"] = {"workers_per_trial": 2}
    with pytest.raises(ValidationError, match=f"{option} runs on CUDA only.*gpus_per_trial"):
        StudySpec.model_validate(data)
    data["resources"] |= {"gpus_per_trial": 2}
    assert StudySpec.model_validate(data).resources.gpus_per_trial == 2


@pytest.mark.parametrize("key", ["mlflow.runName", "dst.experiment_id"])
def test_tags_of_mlflow_and_the_service_are_refused(key: str) -> None:
    """MLflow refuses some of its own tags on a new run and ours identify the parent run: a
    study that set them could never launch."""
    with pytest.raises(ValidationError, match=f"tag '{key}'.*choose another key"):
        StudySpec.model_validate(study(tags={key: "x"}))
    assert StudySpec.model_validate(study(tags={"figure": "1"})).tags == {"figure": "1"}


def test_every_shipped_study_is_valid() -> None:
    """The example studies (``dst submit``) validate and expand."""
    from dst.spec import read_spec_file

    examples = Path(__file__).resolve().parents[2] / "examples"
    for path in [*sorted((examples / "studies").glob("*.yaml")), examples / "demo.yaml"]:
        assert expand(StudySpec.model_validate(read_spec_file(path))), path


def test_the_ranking_metric_is_read_from_the_stored_spec() -> None:
    """A spec stored before studies had ``ranking`` ranks by the last epoch's test accuracy;
    the option is not a run field, so no trial's spec carries it."""
    ranked = StudySpec.model_validate(study(ranking={"metric": "test_acc_at_best_val"}))
    assert stored_ranking(ranked.model_dump_json()).metric == "test_acc_at_best_val"
    assert stored_ranking(json.dumps(study())).metric == "test_acc"
    assert "ranking" not in expand(ranked)[0].spec.model_dump()
    assert "ranking" not in grid_fields() and "ranking.metric" not in grid_fields()
