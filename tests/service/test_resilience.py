"""Crashed trials (one process, or one of several DDP workers) resume from their checkpoints;
`dst demo` runs the product and cleans up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dst.masks import load_masks
from service.tracking import TAG_RESUMED
from tests.ddp import run_world, train
from tests.service.e2e import api, cmdline, environ, processes_with, wait_for, wait_terminal

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
        # restarted from a checkpoint, not from scratch (the kill may land before Tune has
        # registered the checkpoint of the epoch the API already shows)
        assert 2 <= resumed_at < EPOCHS
        assert trial["resumed_from_epoch"] == resumed_at  # the API shows the resume too
        history = MlflowClient(mlflow_sqlite).get_metric_history(run.info.run_id, "test_acc")
        assert {m.step for m in history} == set(range(1, EPOCHS + 1))  # one child run, all epochs


DDP_EPOCHS = 20
DDP_SPEC: dict = {
    "name": "ddp-lose-a-worker",
    "model": "small-mlp",
    "dataset": "digits",
    # checkpoints inside some epochs too (every 50 steps; 20 steps an epoch), so the restart
    # may resume in the middle of one
    "training": {"epochs": DDP_EPOCHS, "batch_size": 64, "lr": 0.05, "checkpoint_every_steps": 50},
    "sparsity": {"density": 0.1, "update_period": 10, "criterion": "snip", "growth": "random"},
    "resources": {"cpus_per_trial": 1, "workers_per_trial": 2},
}


def ray_workers() -> list[int]:
    """PIDs of Ray worker processes (their command lines start with ``ray::``)."""
    return [pid for pid in processes_with("ray::") if cmdline(pid).startswith("ray::")]


def test_a_ddp_trial_survives_losing_a_worker(
    local_ray: str, mlflow_sqlite: str, storage: Path, tmp_path: Path
) -> None:
    """SIGKILL one of two DDP workers mid-trial: Train restarts the group from the last
    checkpoint and the trial ends bit-identical to an uninterrupted 2-worker run. No Ray
    worker ever sees the database URL."""
    database = f"sqlite:///{storage / 'ddp-kill.db'}"
    with api(storage / "ddp-kill", database, local_ray, mlflow_sqlite) as client:
        created = client.submit(DDP_SPEC)
        wait_for(lambda: client.trials(created["id"])[0]["epoch"] >= 2, "two epochs", 240)
        workers = [p for p in ray_workers() if "RayTrainWorker" in cmdline(p)]
        assert len(workers) == 2, [cmdline(p) for p in ray_workers()]
        # every worker but Ray's JobSupervisor, which starts the driver with its environment
        trial_side = [p for p in ray_workers() if "JobSupervisor" not in cmdline(p)]
        assert len(trial_side) >= 3  # the trial's Tune process and its two DDP workers
        leaked = [p for p in trial_side if b"DST_DATABASE_URL" in environ(p)]
        assert leaked == [], [cmdline(p) for p in leaked]
        os.kill(workers[1], signal.SIGKILL)
        final = wait_terminal(client, created["id"], timeout=400)
        assert final["status"] == "succeeded", final
        (trial,) = client.trials(created["id"])
        assert trial["epoch"] == DDP_EPOCHS and trial["resumed_from_epoch"] is not None
        mlflow = MlflowClient(mlflow_sqlite)
        masks = load_masks(mlflow.download_artifacts(trial["mlflow_run_id"], "masks/final.npz"))
        history = mlflow.get_metric_history(trial["mlflow_run_id"], "test_acc")
        assert sorted(m.step for m in history) == list(range(1, DDP_EPOCHS + 1))
    reference = run_world(partial(train, DDP_SPEC_RUN), 2, tmp_path)[0]
    expected = reference["history"][-1]
    for key in ("train_loss", "val_acc", "test_acc", "test_loss", "itop", "density"):
        assert trial["metrics"][key] == expected[key], key
    assert masks.keys() == reference["masks"].keys()
    assert all(torch.equal(masks[n], reference["masks"][n]) for n in masks)


DDP_SPEC_RUN = {k: v for k, v in DDP_SPEC.items() if k not in ("name", "resources")}


def lingering(marker: str, grace: float = 5) -> list[int]:
    """Processes with ``marker`` in their environment still there ``grace`` seconds from now
    (one that was told to stop may take a moment to exit); each is killed."""
    deadline = time.monotonic() + grace
    while (left := processes_with(marker, "environ")) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def test_demo_finishes_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The demo's time is measured by ``benchmarks/startup.py --demo``; here it only has to end,
    within a bound far above it."""
    marker = f"dst-demo-test-{uuid.uuid4().hex}"
    env = os.environ | {"DST_STORAGE_PATH": str(tmp_path), "DST_TEST_MARKER": marker}
    dst = Path(sys.executable).parent / "dst"
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
        leftovers = lingering(marker)
    assert demo.returncode == 0, out[-3000:] + err[-3000:]
    assert leftovers == [], "the demo left processes running"
    assert "status: succeeded" in out and "MLflow UI: http://127.0.0.1:" in out
    rows = [
        line for line in out.splitlines() if line.split()[:1] in (["dense"], ["static"], ["dst"])
    ]
    assert len(rows) == 40  # 6 criteria x 2 growths x 3 densities + 3 static + 1 dense, one seed
