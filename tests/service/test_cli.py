"""Service commands of the CLI: clear errors instead of tracebacks; tables of results."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app, results_table, trial_line

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


def test_a_trial_line_says_where_it_runs_and_whether_it_resumed() -> None:
    trial = {
        "index": 3, "state": "running", "epoch": 7, "epochs": 30, "label": "seed=1",
        "metrics": {"test_acc": 0.8765}, "node": None, "resumed_from_epoch": None,
    }  # fmt: skip
    words = ["3", "running", "epoch", "7/30", "seed=1", "test_acc=0.8765"]
    assert trial_line(trial).split() == words
    moved = trial | {"metrics": None, "node": "worker-2", "resumed_from_epoch": 4}
    assert trial_line(moved).endswith("seed=1  on worker-2  (resumed after epoch 4)")
    shared = moved | {"gpus": "0", "resumed_from_epoch": None}
    assert trial_line(shared).endswith("seed=1  on worker-2 (GPU 0)")


def test_the_cli_answers_without_importing_torch() -> None:
    """``dst --help`` and the service commands load neither PyTorch nor the registries."""
    import subprocess
    import sys

    heavy = "{'torch', 'ray', 'mlflow', 'httpx'}"
    code = f"import sys, service.cli; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "presses"),
    [(signal.SIGINT, 1), (signal.SIGINT, 2), (signal.SIGTERM, 1)],
    ids=["one-ctrl-c", "two-ctrl-c", "sigterm-to-the-group"],
)
def test_ctrl_c_stops_serve_and_everything_it_started(
    tmp_path: Path, signum: int, presses: int
) -> None:
    """As a terminal (SIGINT) or a process manager (SIGTERM) does it: the signal to the whole
    process group of `uv run dst serve`, which uv forwards to the server once more. The API,
    Ray and MLflow are all gone in seconds, whichever copy of the signal lands first."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    from service.local import free_port
    from tests.service.e2e import wait_for

    port = free_port()
    env = os.environ | {"DST_STORAGE_PATH": str(tmp_path), "DST_PORT": str(port)}
    proc = subprocess.Popen(
        ["uv", "run", "--frozen", "dst", "serve"],
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # with Ctrl-C's default action, as in a terminal, even when this suite runs as a
        # shell's background job (`cmd &` makes a child ignore SIGINT, and Python respects it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: set[int] = set()
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "dst serve with its Ray and MLflow", 240)
        started = alive(descendants(proc.pid))
        assert len(started) >= 4  # uv's child, Ray's head processes, MLflow
        for _ in range(presses):
            os.killpg(proc.pid, signum)
            time.sleep(0.3)
        proc.wait(timeout=30)
        wait_for(lambda: not alive(started), "every started process to end", 15)
    finally:  # on failure: what it started, listed before killing re-parents it to init
        leftover = started | descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in alive(leftover):
            os.kill(pid, signal.SIGKILL)
