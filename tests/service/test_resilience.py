"""A crashed trial resumes from its checkpoint; `dst demo` runs the product and cleans up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from service.tracking import TAG_RESUMED
from tests.service.e2e import api, processes_with, wait_for, wait_terminal

pytestmark = pytest.mark.slow
EPOCHS = 120


def test_a_crashed_trial_resumes_from_its_last_checkpoint(
    local_ray: str, mlflow_sqlite: str, storage: Path
) -> None:
    spec = {
        "name": "crash-me",
        "model": "small-mlp",
        "dataset": "digits",
        "training": {"epochs": EPOCHS, "batch_size": 64, "lr": 0.05},
        "sparsity": {"density": 0.1, "update_period": 10},
        "resources": {"cpus_per_trial": 0.5},
    }
    with api(
        storage / "crash", f"sqlite:///{storage / 'crash.db'}", local_ray, mlflow_sqlite
    ) as client:
        created = client.submit(spec)
        wait_for(lambda: client.trials(created["id"])[0]["epoch"] >= 3, "three epochs", 180)
        workers = processes_with("ray::ImplicitFunc")
        assert workers, "no Tune trial worker process found"
        for pid in workers:  # a hard crash: no exception, no cleanup
            os.kill(pid, signal.SIGKILL)
        final = wait_terminal(client, created["id"], timeout=300)
        assert final["status"] == "succeeded", final
        (trial,) = client.trials(created["id"])
        assert trial["state"] == "succeeded" and trial["epoch"] == EPOCHS
        run = MlflowClient(mlflow_sqlite).get_run(trial["mlflow_run_id"])
        resumed_at = int(run.data.tags[TAG_RESUMED])
        assert 3 <= resumed_at < EPOCHS  # restarted from a checkpoint, not from scratch
        history = MlflowClient(mlflow_sqlite).get_metric_history(run.info.run_id, "test_acc")
        assert {m.step for m in history} == set(range(1, EPOCHS + 1))  # one child run, all epochs


def test_demo_finishes_and_leaves_nothing_running(tmp_path: Path) -> None:
    marker = f"dst-demo-test-{uuid.uuid4().hex}"
    env = os.environ | {"DST_STORAGE_PATH": str(tmp_path), "DST_TEST_MARKER": marker}
    dst = Path(sys.executable).parent / "dst"
    started = time.monotonic()
    demo = subprocess.Popen(
        [str(dst), "demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = demo.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        demo.terminate()  # SIGTERM: the demo stops what it started
        out, err = demo.communicate(timeout=60)
        pytest.fail(f"the demo did not finish in 420 s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        time.sleep(2)
        leftovers = processes_with(marker, "environ")
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    assert demo.returncode == 0, out[-3000:] + err[-3000:]
    assert leftovers == [], "the demo left processes running"
    assert "status: succeeded" in out and "MLflow UI: http://127.0.0.1:" in out
    rows = [
        line for line in out.splitlines() if line.split()[:1] in (["dense"], ["static"], ["dst"])
    ]
    assert len(rows) == 40  # 6 criteria x 2 growths x 3 densities + 3 static + 1 dense, one seed
    assert elapsed < 300, f"the demo took {elapsed:.0f} s"
