"""The compose stack for real, in containers: images built here, PostgreSQL, MLflow, a Ray
head, two Ray workers and the API brought up with podman-compose. A DDP trial trains across
both worker containers (gloo between two hosts). A study submitted over the published port
loses a worker mid-study (SIGKILL) and still finishes, every trial succeeded, resumed from its
checkpoint on the surviving worker, recorded once in the database and MLflow; then the stack
is torn down and nothing of it is left.

This machine kind has no Docker engine; Podman (Debian's packages) runs the same images and
compose file. Without Podman the test fails, saying what to install: it never skips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from service.client import TERMINAL, ApiClient
from service.tracking import PARENT_TAG, TAG_GPUS, TAG_NODE
from tests.deploy.stack import INSTALL_HINT, Stack, ensure_base_image, missing_tools, podman
from tests.service.e2e import study, wait_for, wait_terminal

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

EPOCHS = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"the container test needs {', '.join(missing)}: {INSTALL_HINT}")
    ensure_base_image()
    stack = Stack(tmp_path_factory.mktemp("compose"))
    try:
        stack.build()
        stack.up(workers=2)
        stack.wait_ready()
        stack.wait_workers(2)
        yield stack
    finally:
        stack.down()
    left = stack.leftovers()
    assert not left, f"the stack left {left} behind"


def one_trial_per_worker(name: str) -> dict[str, Any]:
    """The suite's 4-trial study with single-CPU trials on 1-CPU workers (the head runs
    none): one trial per worker at a time."""
    return study(name, epochs=EPOCHS, resources={"cpus_per_trial": 1})


def running_trials(client: ApiClient, experiment_id: str, min_epoch: int) -> list[dict]:
    trials = client.trials(experiment_id)
    return [t for t in trials if t["state"] == "running" and t["epoch"] >= min_epoch]


def worker_hosts(stack: Stack, workers: int = 2) -> dict[str, str]:
    """Each Ray worker container's host name (what the API shows as a trial's node)."""
    names = [stack.container("ray-worker", n) for n in range(1, workers + 1)]
    return {podman("inspect", "--format", "{{.Config.Hostname}}", c).strip(): c for c in names}


def busy_worker(
    client: ApiClient, experiment_id: str, workers: dict[str, str]
) -> tuple[str, dict[str, Any]] | None:
    """A worker container running a trial that has checkpointed (epoch 2 or later) and has
    most of its epochs ahead (so it is still running when the kill lands)."""
    for trial in running_trials(client, experiment_id, min_epoch=2):
        if trial["epoch"] <= EPOCHS // 2 and trial["node"] in workers:
            return workers[trial["node"]], trial
    experiment = client.experiment(experiment_id)
    if experiment["status"] in TERMINAL:  # no point waiting on: say what happened
        raise AssertionError(f"the study ended before a worker could be lost: {experiment}")
    return None


def test_a_ddp_trial_spans_both_worker_containers_and_says_so(stack: Stack) -> None:
    """Two DDP workers of 0.6 CPU cannot share a 1-CPU worker: the trial trains with gloo
    across both containers (two hosts on the stack's network). It succeeds, and its ``node``
    (in the API and as its run's tag) names both worker hosts, not the head, where its Tune
    process could never run (the head offers no CPU) and not one host only.

    (Runs before the worker-loss test, which kills a worker; it checks both are up.)"""
    stack.wait_workers(2)
    workers = worker_hosts(stack)
    spec = study("compose-ddp", resources={"cpus_per_trial": 1.2, "workers_per_trial": 2})
    spec["grid"] = {}
    client = ApiClient(stack.api_url, stack.api_token)
    experiment_id = client.submit(spec)["id"]
    final = wait_terminal(client, experiment_id, timeout=400)
    assert final["status"] == "succeeded", f"{final}\n{stack.logs()}"
    (trial,) = client.trials(experiment_id)
    assert trial["epoch"] == 2 and trial["gpus"] is None, trial
    assert sorted(trial["node"].split(",")) == sorted(workers), (trial, workers)
    tags = MlflowClient(stack.mlflow_url).get_run(trial["mlflow_run_id"]).data.tags
    assert tags[TAG_NODE] == trial["node"] and tags[TAG_GPUS] == ""


def test_a_study_survives_losing_a_worker_container(stack: Stack) -> None:
    client = ApiClient(stack.api_url, stack.api_token)
    created = client.submit(one_trial_per_worker("compose-loss"), idempotency_key="compose-1")
    assert (
        client.submit(one_trial_per_worker("compose-loss"), idempotency_key="compose-1")["id"]
        == (created["id"])
    )
    experiment_id = created["id"]
    workers = worker_hosts(stack)
    assert len(workers) == 2, f"the workers' host names do not tell them apart: {workers}"
    # the worker running a trial past a checkpoint goes, whichever of the two it is
    try:
        victim, hit = wait_for(
            lambda: busy_worker(client, experiment_id, workers),
            "a trial running past its second epoch on a worker",
            timeout=240,
        )
    except AssertionError as error:  # timed out, or the study ended first
        raise AssertionError(
            f"{error}\nworkers: {workers}\ntrials: {client.trials(experiment_id)}\n{stack.logs()}"
        ) from None
    for worker in workers.values():  # the drivers' secrets stay on the head and the API
        assert processes_knowing(worker, "DST_DATABASE_URL") == "", worker
    assert "raylet" in processes_knowing(stack.container("ray-head"), "DST_DATABASE_URL")
    podman("kill", "--signal", "KILL", victim)
    lost_at = time.monotonic()
    log.info("killed %s running trial %d at epoch %d", victim, hit["index"], hit["epoch"])

    final = wait_terminal(client, experiment_id, timeout=600)
    assert final["status"] == "succeeded", f"{final}\n{stack.logs()}"
    assert final["trial_counts"] == {"succeeded": 4}
    trials = client.trials(experiment_id)
    assert sorted(t["index"] for t in trials) == [0, 1, 2, 3]
    assert all(t["epoch"] == EPOCHS for t in trials)
    resumed = {t["index"]: t for t in trials if t["resumed_from_epoch"]}
    assert hit["index"] in resumed, f"the trial on the killed worker did not resume: {trials}"
    assert all(1 <= t["resumed_from_epoch"] < EPOCHS for t in resumed.values())
    assert resumed[hit["index"]]["node"] in workers  # finished on a worker of the stack
    state = podman("inspect", "--format", "{{.State.Status}}", victim).strip()
    log.info(
        "worker lost for %.0f s of the study; its container is %s",
        time.monotonic() - lost_at,
        state,
    )
    check_mlflow(stack, final, {t["mlflow_run_id"] for t in trials})
    # the head's environment held them for the driver (DST_DRIVER_SECRETS=head): no file
    secrets = podman("exec", stack.container("api"), "ls", "-A", "/shared/dst")
    assert "secrets" not in secrets.split(), secrets


def processes_knowing(container: str, name: str) -> str:
    """The command lines of the processes in ``container`` whose environment sets ``name``."""
    script = (
        f"for p in /proc/[0-9]*; do grep -qs '{name}=' $p/environ && tr '\\0' ' ' "
        "< $p/cmdline && echo; done; true"
    )
    return podman("exec", container, "sh", "-c", script).strip()


def check_mlflow(stack: Stack, experiment: dict[str, Any], run_ids: set[str]) -> None:
    """One FINISHED parent with exactly the trials' four FINISHED children, every epoch."""
    mlflow = MlflowClient(stack.mlflow_url)
    parent_id = experiment["mlflow"]["parent_run_url"].rsplit("/", 1)[-1]
    assert experiment["mlflow"]["parent_run_url"].startswith(stack.mlflow_url)  # the UI address
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'"
    )
    assert {c.info.run_id for c in children} == run_ids and len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        history = mlflow.get_metric_history(child.info.run_id, "test_acc")
        assert {m.step for m in history} == set(range(1, EPOCHS + 1))
