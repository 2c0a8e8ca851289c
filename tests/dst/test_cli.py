"""The ``dst`` CLI: run, inspect and the name listings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dst.cli import app
from dst.masks import load_masks
from dst.spec import RunSpec, read_spec_file

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_run_writes_metrics_and_masks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            str(EXAMPLES / "digits_dst.yaml"),
            "--out",
            str(out),
            "--set",
            "training.epochs=2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    initial, final = load_masks(out / "masks/initial.npz"), load_masks(out / "masks/final.npz")
    assert list(initial) == ["net.0.weight", "net.2.weight", "net.4.weight"] or len(initial) == 3
    assert initial.keys() == final.keys()
    assert all(int(initial[n].sum()) == int(final[n].sum()) for n in initial)
    assert "test_acc=" in result.output and "test_acc_at_best_val=" in result.output


def test_run_rejects_a_bad_spec_before_training(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            str(EXAMPLES / "digits_dst.yaml"),
            "--out",
            str(tmp_path / "x"),
            "--set",
            "sparsity.criterion=magnitud",
            "--set",
            "sparsity.density=2",
        ],
    )
    assert result.exit_code == 2
    assert "sparsity.criterion" in result.output and "'magnitude'" in result.output
    assert "sparsity.density" in result.output
    assert not (tmp_path / "x").exists()


def test_inspect_json_reports_layers_and_totals() -> None:
    result = runner.invoke(
        app, ["inspect", "small-mlp", "--dataset", "higgs", "--density", "0.05", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["total_params"] == 72_449
    assert report["prunable_params"] == 24 * 256 + 256 * 256 + 256
    assert [layer["shape"] for layer in report["layers"]] == [[256, 24], [256, 256], [1, 256]]
    for layer in report["layers"]:
        assert set(layer) == {"name", "shape", "params", "density", "active"}
    active = sum(layer["active"] for layer in report["layers"])
    assert abs(active - 0.05 * report["prunable_params"]) <= len(report["layers"])


def test_inspect_table_defaults_to_the_papers_dataset() -> None:
    result = runner.invoke(app, ["inspect", "resnet56"])
    assert result.exit_code == 0, result.output
    assert "cifar10" in result.output and "total params 855,770" in result.output


def test_inspect_unknown_model_lists_valid_names() -> None:
    result = runner.invoke(app, ["inspect", "resnet18"])
    assert result.exit_code == 2
    assert "valid model names" in result.output and "resnet56" in result.output


def test_listings() -> None:
    assert "lenet5-caffe" in runner.invoke(app, ["models"]).output
    assert "breast_cancer" in runner.invoke(app, ["datasets"]).output
    listed = runner.invoke(app, ["criteria"]).output
    for name in ("magnitude", "set", "mest", "sensitivity", "rsensitivity", "snip", "gradient"):
        assert name in listed


def test_every_shipped_run_spec_is_valid() -> None:
    """The example run specs (``dst run``) all validate."""
    for path in [*sorted((EXAMPLES / "paper").glob("*.yaml")), EXAMPLES / "digits_dst.yaml"]:
        RunSpec.model_validate(read_spec_file(path))


def test_run_whose_download_fails_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset server that cannot be reached: a line naming the URL and how to run without
    it, exit code 2, no traceback; nothing is trained."""
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: refused
    monkeypatch.setattr("dst.loaders.CIFAR_URL", "http://127.0.0.1:9/{}.tar.gz")
    spec = tmp_path / "run.yaml"
    spec.write_text(f"model: small-cnn\ndataset: cifar10\ndata: {{root: {tmp_path / 'data'}}}\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(spec), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"dataset 'cifar10': downloading {url} failed (")
    assert line.endswith(
        f"put cifar-10-batches-py/ (that archive unpacked) under the data root "
        f"{tmp_path / 'data'} (data.root, or $DST_DATA_DIR) and set data.download: false"
    )
    assert not (out / "metrics.jsonl").exists()
