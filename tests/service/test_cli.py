"""Service commands of the CLI: clear errors instead of tracebacks; tables of results."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from service.cli import app, results_table

runner = CliRunner()


def test_unreachable_api_is_a_clear_error() -> None:
    for args in (["status"], ["cancel", "abc"], ["results", "abc"]):
        result = runner.invoke(app, [*args, "--api", "http://127.0.0.1:9", "--token", "t"])
        assert result.exit_code == 2, result.output
        assert "cannot reach the API at http://127.0.0.1:9" in result.output
        assert "Traceback" not in result.output


def test_bad_yaml_is_a_clear_error(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: [unclosed\n")
    result = runner.invoke(app, ["submit", str(spec), "--api", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_results_table_has_one_line_per_row() -> None:
    row = {
        "config": {"sparsity.mode": "dst", "sparsity.criterion": "snip"}, "n": 3,
        "test_acc_mean": 0.91234, "test_acc_std": 0.01, "test_loss_mean": 0.3,
        "test_loss_std": 0.02, "test_acc_at_best_val_mean": 0.92, "test_acc_at_best_val_std": 0.0,
    }  # fmt: skip
    dense = row | {"config": {"sparsity.mode": "dense", "sparsity.criterion": None}}
    results = {"group_by": ["sparsity.mode", "sparsity.criterion"], "rows": [row, dense]}
    lines = results_table(results).splitlines()
    assert lines[0].split()[:3] == ["mode", "criterion", "n"]
    assert len(lines) == 4 and "0.9123 ± 0.0100" in lines[2] and "0.9200 ± 0.0000" in lines[2]
    assert lines[3].split()[:2] == ["dense", "-"]
