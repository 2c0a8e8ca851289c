"""End to end over real HTTP with a real local Ray, a real MLflow server and a real database."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dst.masks import load_masks
from service.cli import follow_log
from service.execution import RayExecutor
from service.local import LocalServices
from service.tracking import EXPERIMENT_KIND, MODEL_TRAINING, PARENT_TAG, TAG_GPUS, TAG_NODE
from tests.service.e2e import api, study, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def check_mlflow(mlflow_uri: str, experiment: dict, n_trials: int, epochs: int) -> None:
    """One parent run with ``n_trials`` nested children carrying metrics and mask artifacts."""
    client = MlflowClient(mlflow_uri)
    parent_url = experiment["mlflow"]["parent_run_url"]
    parent_id = parent_url.rsplit("/", 1)[-1]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    # a model-training experiment: MLflow's UI opens it on the runs table
    assert client.get_experiment(parent.info.experiment_id).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert experiment["mlflow"]["experiment_url"].endswith(f"/{parent.info.experiment_id}/runs")
    study_json = client.download_artifacts(parent_id, "study.json")
    assert json.loads(Path(study_json).read_text())["name"] == experiment["name"]
    summary = json.loads(Path(client.download_artifacts(parent_id, "results.json")).read_text())
    assert sum(row["n"] for row in summary["rows"]) == n_trials
    assert summary["group_by"] == ["sparsity.criterion"]
    analysis = json.loads(Path(client.download_artifacts(parent_id, "analysis.json")).read_text())
    assert set(analysis["rankings"]["all"]["average_ranks"]) == {"magnitude", "snip"}
    figures = {a.path for a in client.list_artifacts(parent_id, "figures")}
    assert {"figures/critical_distance_all.png", "figures/critical_distance_all.svg"} <= figures
    (structure,) = analysis["structure"]  # end masks kept by the driver, compared per seed
    assert structure["jaccard"]["names"] == ["magnitude", "snip", "init"]
    assert structure["jaccard"]["n_seeds"] == 2 and 0 < structure["j_init"] < 1
    assert "figures/jaccard_end_masks.png" in figures
    # the runs compare removal sets at every update (analysis.removal_sets); the histories
    # the driver stored give the learning curves, the loss gap and the Jaccard over time
    assert {
        f"figures/{name}.png"
        for name in ("learning_curves", "loss_gap", "jaccard_first_update", "jaccard_over_time")
    } <= figures
    (removal,) = analysis["removal"]
    assert 0 <= removal["j_r"] < 1  # two seeds' initial masks
    assert removal["std_per_layer"] is True  # the driver kept each run's per-layer indices
    (over_time,) = analysis["over_time"]
    assert set(over_time["lines"]) == {"magnitude", "snip"}
    (curves,) = analysis["curves"]
    assert curves["lines"]["snip"]["epoch"] == list(range(1, epochs + 1))
    assert {"mean_test_acc.magnitude", "mean_test_acc.snip"} <= set(parent.data.metrics)
    table = Path(client.download_artifacts(parent_id, "results.txt")).read_text()
    assert table.splitlines()[0].split()[:2] == ["criterion", "n"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
    assert len(children) == n_trials
    for child in children:
        history = client.get_metric_history(child.info.run_id, "test_acc")
        assert [m.step for m in history] == list(range(1, epochs + 1))
        assert child.data.params["sparsity.density"] == "0.1"
        # where the trial ran: the local Ray's only node, no GPU
        assert (child.data.tags[TAG_NODE], child.data.tags[TAG_GPUS]) == (platform.node(), "")
        names = {a.path for a in client.list_artifacts(child.info.run_id, "masks")}
        assert names == {"masks/initial.npz", "masks/final.npz"}
        own = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert own == {"figures/learning_curves.png", "figures/jaccard_over_time.png"}
        curves = client.download_artifacts(child.info.run_id, "figures/learning_curves.png")
        assert Path(curves).read_bytes().startswith(b"\x89PNG")
        local = client.download_artifacts(child.info.run_id, "masks/final.npz")
        with np.load(local) as data:
            assert any(key.endswith("::bits") for key in data.files)


def run_study(client, mlflow_uri: str, name: str, ray: str, database_url: str) -> None:
    spec = study(name, analysis={"removal_sets": True})
    created = client.submit(spec, idempotency_key=f"key-{name}")
    again = client.submit(spec, idempotency_key=f"key-{name}")
    assert again["id"] == created["id"] and created["n_trials"] == 4
    listed = client.experiments()
    assert sum(1 for e in listed["items"] if e["id"] == created["id"]) == 1
    followed: list[str] = []  # the driver's log as `dst logs --follow` prints it
    follow_log(client, created["id"], 100_000, followed.append, poll=0.5)
    final = wait_terminal(client, created["id"])
    assert final["status"] == "succeeded", final
    assert final["trial_counts"] == {"succeeded": 4} or final["trial_counts"].get("succeeded") == 4
    trials = client.trials(created["id"])
    assert len(trials) == 4
    for trial in trials:
        assert trial["state"] == "succeeded" and trial["epoch"] == trial["epochs"] == 2
        assert 0 <= trial["metrics"]["test_acc"] <= 1 and trial["mlflow_run_id"]
        assert trial["params"]["sparsity.criterion"] in ("magnitude", "snip")
        assert trial["node"] == platform.node()  # the local Ray's only node: this machine
        assert trial["gpus"] is None  # it has no GPUs
    results = client.results(created["id"])
    assert results["group_by"] == ["sparsity.criterion"]
    rows = results["rows"]
    assert {(r["config"]["sparsity.criterion"], r["n"]) for r in rows} == {
        ("magnitude", 2),
        ("snip", 2),
    }
    for row in rows:
        assert row["test_acc_mean"] > 0.15 and row["test_acc_std"] >= 0  # chance: 0.1
        assert 0 <= row["test_acc_at_best_val_mean"] <= 1
    check_mlflow(mlflow_uri, final, 4, 2)
    job = RayExecutor(ray).client.get_job_info(created["id"])  # what anyone listing jobs sees
    assert database_url not in json.dumps(job.runtime_env)
    storage = Path(job.runtime_env["env_vars"]["DST_STORAGE_PATH"])
    assert list((storage / "secrets").glob("*")) == []  # the driver took its secrets file
    log = client.log(created["id"], tail=100_000)  # the driver's output, read through Ray
    assert "recording to the database at" in log and "4 trials done" in log
    assert client.log(created["id"], tail=2) == "".join(log.splitlines(keepends=True)[-2:])
    assert "".join(followed) == log  # every line once, in order, read as it was written
    figures = client.analysis(created["id"])["figures"]
    assert {"learning_curves", "loss_gap", "jaccard_over_time"} <= {f["name"] for f in figures}
    for figure in figures:  # drawn from what the real trials recorded
        png = client.figure(created["id"], f"{figure['name']}.png")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, figure["name"]


def test_study_end_to_end_on_sqlite(local_ray: str, mlflow_sqlite: str, storage: Path) -> None:
    db = f"sqlite:///{storage / 'e2e.db'}"
    with api(storage / "e2e", db, local_ray, mlflow_sqlite) as client:
        run_study(client, mlflow_sqlite, "e2e-sqlite", local_ray, db)
    # of Tune's own logs only the JSON result log is written (the recorder keeps the results)
    logs = {p.name for p in (storage / "e2e" / "ray_results").glob("*/trial-0/*") if p.is_file()}
    assert "result.json" in logs and not {"progress.csv"} & logs, logs
    assert not any(name.startswith("events.out.tfevents") for name in logs), logs


def test_study_end_to_end_on_postgres(
    local_ray: str, postgres_database: str, tmp_path: Path
) -> None:
    db = f"postgresql+psycopg://postgres@127.0.0.1:5432/{postgres_database}"
    with LocalServices() as services:
        mlflow_uri = services.start_mlflow(
            tmp_path / "mlflow",
            backend_store_uri=f"postgresql://postgres@127.0.0.1:5432/{postgres_database}",
        )
        with api(tmp_path / "storage", db, local_ray, mlflow_uri) as client:
            run_study(client, mlflow_uri, "e2e-postgres", local_ray, db)


def test_cancel_a_running_study(local_ray: str, mlflow_sqlite: str, storage: Path) -> None:
    db = f"sqlite:///{storage / 'cancel.db'}"
    with api(storage / "cancel", db, local_ray, mlflow_sqlite) as client:
        created = client.submit(study("cancel-me", epochs=500))
        wait_for(
            lambda: any(
                t["state"] == "running" and t["epoch"] >= 1 for t in client.trials(created["id"])
            ),
            "a trial to run",
        )
        cancelled = client.cancel(created["id"])
        assert cancelled["status"] in ("cancelling", "cancelled")
        final = wait_terminal(client, created["id"], timeout=60)
        assert final["status"] == "cancelled"
        trials = client.trials(created["id"])
        assert {t["state"] for t in trials} == {"cancelled"}
        executor = RayExecutor(local_ray)
        wait_for(lambda: executor.status(created["id"]) == "STOPPED", "Ray to stop the job", 60)
        mlflow = MlflowClient(mlflow_sqlite)
        assert mlflow.get_run(final["mlflow"]["parent_run_id"]).info.status == "KILLED"
        started = [t["mlflow_run_id"] for t in trials if t["mlflow_run_id"]]
        assert started  # at least the trial that ran an epoch
        assert {mlflow.get_run(run).info.status for run in started} == {"KILLED"}


def test_state_survives_an_api_restart(local_ray: str, mlflow_sqlite: str, storage: Path) -> None:
    db = f"sqlite:///{storage / 'restart.db'}"
    with api(storage / "restart", db, local_ray, mlflow_sqlite) as client:
        created = client.submit(study("restart-me", epochs=3))
        wait_for(  # launched in the background, within moments
            lambda: client.experiment(created["id"])["status"] in ("submitted", "running"),
            "the launch",
            60,
        )
    # the API is down while the job runs; Ray finishes it meanwhile
    executor = RayExecutor(local_ray)
    wait_for(lambda: executor.status(created["id"]) == "SUCCEEDED", "the job to finish", 240)
    with api(storage / "restart", db, local_ray, mlflow_sqlite) as client:
        final = wait_terminal(client, created["id"], timeout=30)
        assert final["status"] == "succeeded"
        assert final["name"] == "restart-me" and final["n_trials"] == 4
        assert all(t["state"] == "succeeded" for t in client.trials(created["id"]))


def test_ray_readiness_probe(local_ray: str) -> None:
    assert RayExecutor(local_ray).ping()
    assert not RayExecutor("http://127.0.0.1:9").ping()


def test_a_multi_worker_trial_runs_ddp(local_ray: str, mlflow_sqlite: str, storage: Path) -> None:
    """workers_per_trial > 1: a Ray Train TorchTrainer (DDP, gloo on CPU) runs the trial."""
    spec = study("ddp", resources={"cpus_per_trial": 1, "workers_per_trial": 2})
    spec["grid"] = {}
    with api(
        storage / "ddp", f"sqlite:///{storage / 'ddp.db'}", local_ray, mlflow_sqlite
    ) as client:
        created = client.submit(spec)
        final = wait_terminal(client, created["id"])
        assert final["status"] == "succeeded", final
        (trial,) = client.trials(created["id"])
        assert trial["state"] == "succeeded" and trial["epoch"] == 2
        assert trial["gpus"] is None  # two CPU workers (gloo)
        mlflow = MlflowClient(mlflow_sqlite)
        tags = mlflow.get_run(trial["mlflow_run_id"]).data.tags  # rank 0 named them: none
        assert (tags[TAG_NODE], tags[TAG_GPUS]) == (platform.node(), "")
        history = mlflow.get_metric_history(trial["mlflow_run_id"], "density")
        assert [m.step for m in history] == [1, 2] and {m.value for m in history} == {0.1}
        local = mlflow.download_artifacts(trial["mlflow_run_id"], "masks/final.npz")
        masks = load_masks(local)
        active = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs(active / total - 0.1) < 0.01


def test_a_gpu_study_on_a_cluster_without_gpus_fails_and_says_why(
    local_ray: str, mlflow_sqlite: str, storage: Path
) -> None:
    """Ray would keep such trials pending forever; the driver refuses them instead, once it
    has waited its while (here 2 s) for nodes that could hold them."""
    spec = study("gpu-on-cpu", resources={"gpus_per_trial": 0.5}, device="cuda")
    with api(
        storage / "gpu", f"sqlite:///{storage / 'gpu.db'}", local_ray, mlflow_sqlite,
        ray_nodes_wait_s=2,
    ) as client:  # fmt: skip
        created = client.submit(spec)
        final = wait_terminal(client, created["id"], timeout=120)
        assert final["status"] == "failed", final
        trials = client.trials(created["id"])
        assert {t["state"] for t in trials} == {"failed"}
        assert all("cannot run these trials" in t["error"] for t in trials)
        assert "{CPU: 1, GPU: 0.5}" in trials[0]["error"]
        assert "after waiting 2 s for nodes to join" in trials[0]["error"]
        assert "cannot run these trials" in client.log(created["id"])  # the driver said why


def test_a_driver_told_to_take_its_secrets_from_a_head_without_them_fails_naming_them(
    local_ray: str, mlflow_sqlite: str, storage: Path
) -> None:
    """``driver_secrets: head`` against a Ray whose head has no database URL: the driver
    stops before it could record anywhere else, and the experiment fails saying what the
    head lacks."""
    database = f"sqlite:///{storage / 'no-head-secrets.db'}"
    with api(
        storage / "no-head-secrets", database, local_ray, mlflow_sqlite, driver_secrets="head"
    ) as client:
        created = client.submit(study("no-head-secrets"))
        final = wait_terminal(client, created["id"], timeout=120)
    assert final["status"] == "failed", final
    assert "the Ray head's environment lacks DST_DATABASE_URL" in final["error"], final
    assert not (storage / "no-head-secrets" / "secrets").exists()
