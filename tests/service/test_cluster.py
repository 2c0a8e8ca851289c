"""The service on a multi-node Ray cluster: a head (dashboard, Jobs API, no CPUs) and
worker nodes, each a session of processes of its own on this machine.

- Two one-CPU workers: the trials of a study spread over both; SIGKILL one worker node
  mid-study and the study still succeeds, the trials it ran resumed from their checkpoints on
  the other node, with one child run each.
- A worker with one GPU (a logical GPU: Ray schedules and assigns it like a real one, and the
  trials, with device ``auto``, find no CUDA and train on the CPU): trials of half a GPU share
  it two at a time, each told it has GPU 0. SIGKILL that node mid-study: the experiment's
  notice says that its trials wait for a node that can hold them until a GPU node joins
  again; then they resume and the study succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors, list_nodes

from service.client import TERMINAL
from service.execution import RayExecutor
from service.local import free_ports, wait_until
from service.tracking import PARENT_TAG, TAG_GPUS, TAG_NODE, TAG_RESUMED, TAG_TRIAL
from tests.service.e2e import (
    api,
    cmdline,
    environ,
    processes_with,
    study,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.slow
EPOCHS = 120  # ~0.15 s each with four trials on two cores: the kill lands mid-trial
GPU_EPOCHS = 30  # long enough for two trials to overlap
WORKERS = ("node_a", "node_b")
RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]


@dataclass
class LocalCluster:
    """A Ray head and worker nodes started with ``ray start --block``, each in a session of
    its own, every port explicit (another Ray may run on this machine) and a short temporary
    directory per node. Every process started here, the job drivers the Jobs API starts in
    sessions of their own included, carries ``marker`` in its environment."""

    logs: Path
    marker: str = field(default_factory=lambda: f"dst-cluster-test-{uuid.uuid4().hex}")
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    temp_dirs: list[Path] = field(default_factory=list)
    gcs_port: int = 0
    address: str = ""  # the dashboard: Jobs API and state API
    node_ids: dict[str, str] = field(default_factory=dict)  # worker name -> Ray node id
    # what a worker offers (`ray start` arguments); one CPU where not named
    offers: dict[str, list[str]] = field(default_factory=dict)
    head_env: dict[str, str] = field(default_factory=dict)  # the head's own, beside env()

    def env(self) -> dict[str, str]:
        return os.environ | {
            "DST_TEST_MARKER": self.marker,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # a local ray.init() leaves ~/.ray/auth_token behind, which turns token
            # authentication on for a new head but not for the nodes that join it
            "RAY_AUTH_MODE": "disabled",
            # the head sees a dead node after ~3 s rather than ~15 s
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        temp = Path(tempfile.mkdtemp(prefix="dstc-", dir="/tmp"))  # short: Ray's socket paths
        self.temp_dirs.append(temp)
        node, objects, agent, agent_grpc, runtime_env, metrics = free_ports(6)
        ports = [
            f"--node-manager-port={node}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers bind ports the OS picks
        ]  # fmt: skip
        cmd = [
            *RAY_START, *args, *ports, f"--temp-dir={temp}", "--disable-usage-stats",
            f"--object-store-memory={100 * 2**20}",
        ]  # fmt: skip
        env = self.env() | (self.head_env if name == "head" else {})
        with (self.logs / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes[name] = proc
        return proc

    def start(self, workers: tuple[str, ...]) -> None:
        """A head that runs no trials (no CPUs) with the dashboard, then the workers (what
        ``offers`` says, else one CPU), each with a custom resource of its name; returns once
        every worker is alive."""
        try:
            self.address = self._start_head()
        except RuntimeError:
            if self.nodes["head"].poll() is None:
                raise
            self.kill("head")  # its `ray start` gave up (see _alive): once more
            self.address = self._start_head()
        attempts = dict.fromkeys(workers, 1)
        for name in workers:
            self._start_worker(name, 1)
        self.node_ids = wait_for(
            lambda: self._alive(workers, attempts), "the worker nodes to join", 180
        )

    def _start_head(self) -> str:
        """Start the head; its dashboard address once the Jobs API answers."""
        self.gcs_port, dashboard, client = free_ports(3)
        head = self._start("head", [
            "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
        ])  # fmt: skip
        address = f"http://127.0.0.1:{dashboard}"
        wait_until(lambda: _ok(f"{address}/api/jobs/"), "the Ray Jobs API", 120, head)
        return address

    def _start_worker(self, name: str, attempt: int) -> None:
        resources = {name: 1, f"{name}_try{attempt}": 1}  # tells the tries apart
        offer = self.offers.get(name, ["--num-cpus=1"])
        self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", *offer,
                           f"--resources={json.dumps(resources)}"])  # fmt: skip

    def _alive(self, workers: tuple[str, ...], attempts: dict[str, int]) -> dict[str, str] | None:
        """The workers' node ids once all are alive. ``ray start`` gives up when its raylet
        has not registered within 30 s, which a loaded machine can take: start it again."""
        for name in workers:
            if self.nodes[name].poll() is None:
                continue
            if attempts[name] == 3:
                raise AssertionError(f"{name} exited:\n{self.log(name)}")
            self.kill(name)  # what the failed try left behind
            attempts[name] += 1
            self._start_worker(name, attempts[name])
        found = {
            name: node.node_id
            for node in list_nodes(address=self.address)
            for name in workers
            if node.state == "ALIVE" and f"{name}_try{attempts[name]}" in node.resources_total
        }
        return found if len(found) == len(workers) else None

    def restart(self, name: str) -> None:
        """Start the worker ``name`` again after :meth:`kill` (a new node, offering what the
        first did); returns once it is alive."""
        attempts = {name: 1}
        self._start_worker(name, 1)
        self.node_ids |= wait_for(
            lambda: self._alive((name,), attempts), f"{name} to join again", 180
        )

    def node_state(self, name: str) -> str | None:
        """ALIVE or DEAD, as the head sees the worker ``name``."""
        node_id = self.node_ids[name]
        nodes = list_nodes(address=self.address)
        return next((n.state for n in nodes if n.node_id == node_id), None)

    def trial_actors(self) -> Counter[str]:
        """Alive Tune trial actors (function trainables) by the name of their node."""
        names = {node_id: name for name, node_id in self.node_ids.items()}
        return Counter(
            names.get(actor.node_id, actor.node_id)
            for actor in list_actors(address=self.address, limit=10_000)
            if actor.class_name == "ImplicitFunc" and actor.state == "ALIVE"
        )

    def trial_gpu_shares(self) -> list[float]:
        """The GPU share each alive Tune trial actor holds (Tune places a trial in a placement
        group: its share is named twice, ``GPU_group_<pg>`` and ``GPU_group_0_<pg>``)."""
        actors = list_actors(
            address=self.address,
            filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")],
            detail=True,
            limit=10_000,
        )
        return [
            max(
                (v for k, v in (actor.required_resources or {}).items() if k.startswith("GPU")),
                default=0.0,
            )
            for actor in actors
        ]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def kill(self, name: str) -> None:
        """SIGKILL everything of a node: its ``ray start`` session (raylet, agents, and the
        Ray workers, which the raylet puts in process groups of their own)."""
        proc = self.nodes.pop(name)
        deadline = time.monotonic() + 10
        while (members := _session(proc.pid)) and time.monotonic() < deadline:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.wait()

    def stop(self) -> None:
        """Kill every node, then whatever else carries the marker (job drivers)."""
        for name in list(self.nodes):
            self.kill(name)
        deadline = time.monotonic() + 10
        while (left := processes_with(self.marker, "environ")) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        self.temp_dirs.clear()


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies, already dead, left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


@contextlib.contextmanager
def running(local: LocalCluster, workers: tuple[str, ...]) -> Iterator[LocalCluster]:
    """``local`` started with ``workers``; every process it started is gone afterwards
    (node logs stay in its ``logs``)."""
    try:
        local.start(workers)
        yield local
    finally:
        local.stop()
    assert processes_with(local.marker, "environ") == [], "cluster processes left running"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A running head and the one-CPU workers ``WORKERS``."""
    with running(LocalCluster(logs=tmp_path), WORKERS) as local:
        yield local


@pytest.fixture
def gpu_cluster(tmp_path: Path, mlflow_sqlite: str) -> Iterator[LocalCluster]:
    """A running head and one worker ``gpu_node`` with two CPUs and one (logical) GPU. The
    head's environment holds the service's database URL (``tmp_path / "gpu.db"``) and MLflow
    server, as a deployment with ``DST_DRIVER_SECRETS=head`` sets them."""
    offers = {"gpu_node": ["--num-cpus=2", "--num-gpus=1"]}
    head_env = {
        "DST_DATABASE_URL": f"sqlite:///{tmp_path / 'gpu.db'}",
        "DST_MLFLOW_TRACKING_URI": mlflow_sqlite,
        "MLFLOW_TRACKING_URI": mlflow_sqlite,
    }
    local = LocalCluster(logs=tmp_path, offers=offers, head_env=head_env)
    with running(local, ("gpu_node",)) as started:
        yield started


def resumed_reports(storage: Path, experiment_id: str, index: int) -> list[dict[str, Any]]:
    """The reports of trial ``index`` made right after restoring a checkpoint (from Tune's
    result log on the storage)."""
    path = storage / "ray_results" / experiment_id / f"trial-{index}" / "result.json"
    reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in reports if r.get("dst_resumed_from_epoch") is not None]


def job_log(address: str, experiment_id: str) -> str:
    """The end of the experiment's job driver output (for failure messages)."""
    return RayExecutor(address).logs(experiment_id)[-6000:]


def test_a_study_survives_losing_a_worker_node(
    cluster: LocalCluster, mlflow_sqlite: str, tmp_path: Path
) -> None:
    """Four trials of half a CPU fill both one-CPU workers, two each; SIGKILL node_a once
    every trial has checkpointed: its trials resume on node_b and the study succeeds."""
    storage = tmp_path / "storage"
    database = f"sqlite:///{tmp_path / 'cluster.db'}"
    with api(storage, database, cluster.address, mlflow_sqlite) as client:
        created = client.submit(study("lose-a-node", epochs=EPOCHS))
        experiment_id = created["id"]
        assert created["n_trials"] == 4
        wait_for(
            lambda: {t["state"] for t in client.trials(experiment_id)} == {"running"},
            "every trial to start",
            240,
        )
        placed = cluster.trial_actors()
        assert placed == {"node_a": 2, "node_b": 2}, placed
        wait_for(
            lambda: all(t["epoch"] >= 3 for t in client.trials(experiment_id)),
            "every trial to checkpoint three epochs",
            120,
        )
        cluster.kill("node_a")
        wait_for(lambda: cluster.node_state("node_a") == "DEAD", "node_a to be seen dead", 60)
        final = wait_terminal(client, experiment_id, timeout=240)
        assert final["status"] == "succeeded", (final, job_log(cluster.address, experiment_id))
        trials = client.trials(experiment_id)
    assert sorted(t["index"] for t in trials) == [0, 1, 2, 3]
    for trial in trials:
        assert trial["state"] == "succeeded" and trial["epoch"] == EPOCHS, trial
    resumed = {t["index"]: t["resumed_from_epoch"] for t in trials if t["resumed_from_epoch"]}
    assert 1 <= len(resumed) <= placed["node_a"], resumed
    for index, epoch in resumed.items():
        assert 2 <= epoch < EPOCHS, (index, epoch)  # from a checkpoint, not from scratch
        # the retried trial restored that checkpoint: its first epoch report is the next epoch
        reports = resumed_reports(storage, experiment_id, index)
        assert [(r["dst_resumed_from_epoch"], r["dst"]["epoch"]) for r in reports] == [
            (epoch, epoch + 1)
        ], index
    mlflow = MlflowClient(mlflow_sqlite)
    parent = mlflow.get_run(final["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(int(c.data.tags[TAG_TRIAL]) for c in children) == [0, 1, 2, 3]
    run_ids = {t["index"]: t["mlflow_run_id"] for t in trials}
    for child in children:
        index = int(child.data.tags[TAG_TRIAL])
        assert child.info.status == "FINISHED" and child.info.run_id == run_ids[index], index
        history = mlflow.get_metric_history(child.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), index
        expected = str(resumed[index]) if index in resumed else None
        assert child.data.tags.get(TAG_RESUMED) == expected, index


def test_trials_given_half_a_gpu_share_it_two_at_a_time(
    gpu_cluster: LocalCluster, mlflow_sqlite: str, tmp_path: Path
) -> None:
    """Four trials of a quarter CPU and half a GPU on a node of two CPUs and one GPU: the
    GPU, not the CPUs, holds them to two at a time. The driver accepts the study (the cluster
    offers a GPU), each trial is told it has GPU 0, and every trial succeeds.

    The driver takes its secrets from the head (``driver_secrets: head``): none is written
    to the storage, and no process of the worker node has the database URL."""
    resources = {"cpus_per_trial": 0.25, "gpus_per_trial": 0.5}
    spec = study("share-a-gpu", epochs=GPU_EPOCHS, resources=resources, device="auto")
    database, storage = gpu_cluster.head_env["DST_DATABASE_URL"], tmp_path / "storage"
    worker_node = gpu_cluster.nodes["gpu_node"].pid
    with api(
        storage, database, gpu_cluster.address, mlflow_sqlite, driver_secrets="head"
    ) as client:
        experiment_id = client.submit(spec)["id"]
        seen: list[list[float]] = []
        leaked: set[str] = set()
        deadline = time.monotonic() + 300
        while client.experiment(experiment_id)["status"] not in TERMINAL:
            assert time.monotonic() < deadline, "the study did not finish"
            with contextlib.suppress(Exception):  # the state API may time out on 2 busy cores
                seen.append(gpu_cluster.trial_gpu_shares())
            leaked |= {
                cmdline(p) for p in _session(worker_node) if b"DST_DATABASE_URL" in environ(p)
            }
            time.sleep(0.2)
        final = wait_terminal(client, experiment_id)
        driver_log = RayExecutor(gpu_cluster.address).logs(experiment_id)  # all of it
        assert final["status"] == "succeeded", (final.get("error"), driver_log[-6000:])
        trials = client.trials(experiment_id)
    assert "recording to the database at sqlite:///" in driver_log  # (the log is all there)
    assert "DST_DRIVER_SECRETS=head" not in driver_log  # the head runs no trial: no warning
    assert max(len(shares) for shares in seen) == 2, seen  # two at once, never more
    assert leaked == set(), leaked
    assert not (storage / "secrets").exists()
    assert {share for shares in seen for share in shares} == {0.5}
    for trial in trials:
        assert trial["state"] == "succeeded" and trial["epoch"] == GPU_EPOCHS, trial
        assert (trial["node"], trial["gpus"]) == (socket.gethostname(), "0"), trial
        tags = MlflowClient(mlflow_sqlite).get_run(trial["mlflow_run_id"]).data.tags
        assert (tags[TAG_NODE], tags[TAG_GPUS]) == (socket.gethostname(), "0"), trial


def test_trials_no_node_can_hold_after_a_node_leaves_are_named_until_one_joins(
    gpu_cluster: LocalCluster, mlflow_sqlite: str, tmp_path: Path
) -> None:
    """Two trials of half a GPU run on the only GPU node; SIGKILL it once both have
    checkpointed. Ray keeps the trials pending without a word; the experiment's notice (REST)
    says what they wait for, until the node is back; then they resume from their checkpoints,
    the notice is gone and the study succeeds."""
    resources = {"cpus_per_trial": 0.25, "gpus_per_trial": 0.5}
    spec = study("lose-the-gpu", epochs=EPOCHS, resources=resources, device="auto")
    spec["grid"] = {"seed": [0, 1]}
    database, storage = gpu_cluster.head_env["DST_DATABASE_URL"], tmp_path / "storage"
    with api(
        storage, database, gpu_cluster.address, mlflow_sqlite, driver_secrets="head"
    ) as client:
        experiment_id = client.submit(spec)["id"]
        wait_for(
            lambda: all(
                t["state"] == "running" and t["epoch"] >= 3 for t in client.trials(experiment_id)
            ),
            "both trials to checkpoint three epochs",
            240,
        )
        assert client.experiment(experiment_id)["notice"] is None
        gpu_cluster.kill("gpu_node")

        def both_waiting() -> str | None:  # (Tune may see one trial's node gone first)
            notice = client.experiment(experiment_id)["notice"]
            return notice if notice and notice.startswith("2 trials wait") else None

        notice = wait_for(both_waiting, "a notice naming both trials", 120)
        assert notice.startswith("2 trials wait for a node that can hold them, since "), notice
        assert "gpus_per_trial=0.5" in notice and "offer {CPU: 0, GPU: 0}" in notice, notice
        gpu_cluster.restart("gpu_node")
        wait_for(
            lambda: client.experiment(experiment_id)["notice"] is None, "the notice to go", 120
        )
        final = wait_terminal(client, experiment_id, timeout=240)
        driver_log = RayExecutor(gpu_cluster.address).logs(experiment_id)
        assert final["status"] == "succeeded", (final.get("error"), driver_log[-6000:])
        assert final["notice"] is None
        trials = client.trials(experiment_id)
    assert notice in driver_log  # the driver said it too
    for trial in trials:
        assert trial["state"] == "succeeded" and trial["epoch"] == EPOCHS, trial
        assert 3 <= trial["resumed_from_epoch"] < EPOCHS, trial
