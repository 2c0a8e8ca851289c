"""Bad run specs are rejected before training, naming the field and the allowed values."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from dst.spec import RunSpec, apply_overrides, resolve_init, resolve_training

OK: dict[str, Any] = {"model": "small-mlp", "dataset": "digits"}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(data)
    return str(info.value)


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ({"model": "mlp"}, "model", "'small-mlp'"),
        ({"dataset": "mnist"}, "dataset", "'digits'"),
        ({"sparsity": {"criterion": "taylor"}}, "sparsity.criterion", "'magnitude'"),
        ({"sparsity": {"growth": "momentum"}}, "sparsity.growth", "'gradient'"),
        ({"sparsity": {"init": "kaiming"}}, "sparsity.init", "'erk'"),
        ({"sparsity": {"schedule": "exp"}}, "sparsity.schedule", "'cosine'"),
        ({"sparsity": {"density": 0}}, "sparsity.density", "greater than 0"),
        ({"sparsity": {"density": 1.5}}, "sparsity.density", "less than or equal to 1"),
        ({"sparsity": {"prune_fraction": 1.0}}, "sparsity.prune_fraction", "less than 1"),
        ({"sparsity": {"prune_fraction": 0}}, "sparsity.prune_fraction", "greater than 0"),
        (
            {"sparsity": {"update_period": 0}},
            "sparsity.update_period",
            "greater than or equal to 1",
        ),
        ({"sparsity": {"mode": "sparse"}}, "sparsity.mode", "'dst'"),
        ({"device": "gpu"}, "device", "cpu, cuda"),
        ({"training": {"lr": -1}}, "training.lr", "greater than 0"),
        ({"training": {"optimizer_kernel": "cuda"}}, "training.optimizer_kernel", "'native'"),
        (
            {"training": {"optimizer_kernel": "native"}, "device": "cuda"},
            "training.optimizer_kernel",
            "CPU only",
        ),
        (
            {"training": {"optimizer_kernel": "fused"}, "device": "cpu"},
            "training.optimizer_kernel",
            "CUDA only",
        ),
        ({"training": {"momentum": 0}}, "training", "nesterov needs momentum > 0"),
        ({"sparsity": {"densty": 0.1}}, "sparsity.densty", "Extra inputs"),
    ],
)
def test_bad_fields_are_named(patch: dict[str, Any], field: str, message: str) -> None:
    text = error_of({**OK, **patch})
    assert field in text and message in text


def test_a_run_name_has_room_for_a_trial_index_after_a_full_study_name() -> None:
    """A study's trial is named "<study name>/<index>": 200 characters of study name, a slash
    and an index below 10**6 are 207 characters, the most a run's name may have."""
    longest = "n" * 200 + "/999999"
    assert RunSpec.model_validate({**OK, "name": longest}).name == longest
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate({**OK, "name": longest + "9"})
    assert [(e["loc"], e["ctx"]) for e in info.value.errors()] == [(("name",), {"max_length": 207})]


def test_incompatible_model_and_dataset() -> None:
    text = error_of({"model": "small-cnn", "dataset": "breast_cancer"})
    assert "small-cnn" in text and "breast_cancer" in text and "image" in text


def test_defaults_come_from_appendix_a2() -> None:
    s = RunSpec.model_validate({"model": "resnet56", "dataset": "cifar10"})
    cfg = resolve_training(s)
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.epochs) == (128, 0.1, 1e-4, 200)
    assert (cfg.momentum, cfg.nesterov, cfg.lr_decay) == (0.9, True, 0.1)
    assert s.sparsity.update_period == 800 and s.sparsity.prune_fraction == 0.5
    assert s.sparsity.schedule == "cosine" and s.sparsity.scope == "local"
    assert resolve_init(s) == "erk"
    assert resolve_init(RunSpec.model_validate(OK)) == "er"


def test_overrides_parse_values_as_yaml() -> None:
    data = apply_overrides(dict(OK), ["sparsity.density=0.05", "training.nesterov=false"])
    s = RunSpec.model_validate(data)
    assert s.sparsity.density == 0.05 and s.training.nesterov is False
    with pytest.raises(ValueError, match=r"key\.path=value"):
        apply_overrides({}, ["density"])


def test_naming_and_checking_a_run_imports_no_torch() -> None:
    """The spec, the REST API and the job driver validate specs and list the registries'
    names without training anything: none of that may pay torch's seconds of import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dst.spec import RunSpec, resolve_training, resolve_init\n"
        "from dst import criteria, datasets, growth, models\n"
        "spec = RunSpec.model_validate({'model': 'resnet56', 'dataset': 'cifar10',"
        " 'sparsity': {'criterion': 'snip', 'growth': 'gradient'}})\n"
        "resolve_training(spec), resolve_init(spec), models.get_model('vgg16').defaults\n"
        "assert criteria.CRITERIA.get('snip').needs_grad and 'gradient' in growth.GROWTH\n"
        "assert datasets.get_dataset('imagenet').info.num_classes == 1000\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
