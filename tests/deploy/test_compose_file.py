"""Static checks of what the compose deployment ships: ``docker-compose.yml`` against the
compose specification, every reference in it resolvable (services, volumes, build targets,
scripts, variables, settings), ``.env.example`` documenting exactly the variables it uses,
the documented setup giving each secret its own value, MLflow accepting the UI address it
documents, the image owning its volumes' mount points and refusing a version Ray would refuse,
the health checks' probes, and ``deploy/Dockerfile`` clean under hadolint. Fast: no container
is started."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from email.message import Message
from functools import cache
from importlib.machinery import SourceFileLoader
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.core.config import Settings
from service.execution import DRIVER_SECRETS, driver_env
from tests.deploy.mlflow_security import mlflow_refusals
from tests.deploy.stack import REPO, podman_compose, podman_env

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
BIN = REPO / "deploy" / "bin"
SECRETS = ("DST_API_TOKEN", "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
TOOL = Path(sys.executable).parent


@cache
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def env_values(path: Path) -> dict[str, str]:
    """The variables of an env file (``.env.example``, ``.env``) and their values."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k.strip(): v for k, *rest in pairs if rest and not k.startswith("#") for v in rest}


def documented() -> dict[str, str]:
    """``.env.example``'s variables and their example values."""
    return env_values(ENV_EXAMPLE)


def interpolate(text: str, values: dict[str, str]) -> str:
    """``text`` with ``${VAR}`` and ``${VAR:-default}`` replaced as compose does, from
    ``values`` (an unset or empty variable takes the default)."""
    pattern = r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}"
    return re.sub(pattern, lambda m: values.get(m.group(1)) or m.group(2) or "", text)


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    command = [str(TOOL / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    config = REPO / "deploy" / "hadolint.yaml"
    command = [str(TOOL / "hadolint"), "--no-color", "--config", str(config), str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_compose_file_follows_the_compose_specification() -> None:
    done = check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = compose() | {"services": services() | {"api": services()["api"] | {"restart": 3}}}
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken | {"servics": {}}))
    done = check_jsonschema(tmp_path / "compose.yml")
    assert done.returncode != 0 and "servics" in done.stdout


def test_every_reference_resolves() -> None:
    volumes = set(compose()["volumes"])
    dockerfile = DOCKERFILE.read_text()
    for name, service in services().items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services(), f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith(("/", ".", "$")):
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        target = service.get("build", {}).get("target")
        if target:
            assert f" AS {target}\n" in dockerfile, f"{name} builds unknown target {target}"
        command = service.get("command") or []
        if command and command[0].startswith("dst-"):
            assert (BIN / command[0]).is_file(), f"{name} runs missing script {command[0]}"
            assert command[0] in dockerfile, f"the image does not install {command[0]}"


def test_every_variable_is_documented_and_every_documented_one_used() -> None:
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    assert used == set(documented()), (used - set(documented()), set(documented()) - used)


def test_secrets_are_required_and_never_defaulted() -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert re.search(rf"\$\{{{name}:\?[^}}]+\}}", text), f"{name} is not required"
        assert not re.search(rf"\$\{{{name}:?-", text), f"{name} has a default"
        assert documented()[name].startswith("change-me"), f".env.example holds a {name}"


def test_service_settings_are_real_settings() -> None:
    fields = {f"DST_{name.upper()}" for name in Settings.model_fields}
    for name, service in services().items():
        env = service.get("environment", {})
        unknown = {k for k in env if k.startswith("DST_")} - fields - {"DST_ROLE"}
        assert not unknown, f"{name} sets {unknown}, which the service does not read"


def test_the_ray_head_holds_what_the_job_drivers_record_with() -> None:
    """The API hands its job drivers no secret (``DST_DRIVER_SECRETS=head``): the head, where
    they run, has each one the API would hand on, with the same value; no worker has any,
    and the head runs no trial unless told to."""
    api = services()["api"]["environment"]
    head = services()["ray-head"]["environment"]
    assert api["DST_DRIVER_SECRETS"] == "head"
    settings = Settings(
        database_url=api["DST_DATABASE_URL"], mlflow_tracking_uri=api["DST_MLFLOW_TRACKING_URI"]
    )
    handed = {k: v for k, v in driver_env(settings).items() if k in DRIVER_SECRETS}
    assert set(handed) == {"DST_DATABASE_URL", "DST_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"}
    for name, value in handed.items():
        assert head.get(name) == value, name
    for worker in ("ray-worker", "ray-gpu-worker"):
        assert not set(services()[worker]["environment"]) & set(DRIVER_SECRETS), worker
    assert head["RAY_HEAD_NUM_CPUS"] == "${RAY_HEAD_NUM_CPUS:-0}"
    # nor GPUs, even on a host that has them (a driver on a head offering any refuses trials)
    script = (BIN / "dst-ray-node").read_text()
    start_head = script.split("ray start --head", 1)[1].split("\nfi\n", 1)[0]
    assert "--num-gpus=0" in start_head


def test_one_host_only_the_documented_ports_are_published() -> None:
    """The stack is one host's (deploy/README.md): the API, MLflow and the Ray dashboard are
    published, nothing else (no Ray port another host could join by), and no service leaves
    the project's network."""
    published = {name: s["ports"] for name, s in services().items() if "ports" in s}
    assert published == {
        "mlflow": ["${MLFLOW_PORT:-5000}:5000"],
        "ray-head": ["${RAY_DASHBOARD_PORT:-8265}:8265"],
        "api": ["${DST_API_PORT:-8000}:8000"],
    }
    assert not [name for name, s in services().items() if "network_mode" in s]


def test_each_ray_worker_offers_the_cpus_env_sets() -> None:
    """Scaled workers share one host's CPUs only if told how many each offers: the CPU and
    GPU workers each take theirs from a variable of .env (empty: all of the host's)."""
    for worker, variable in (
        ("ray-worker", "RAY_WORKER_NUM_CPUS"),
        ("ray-gpu-worker", "RAY_GPU_WORKER_NUM_CPUS"),
    ):
        cpus = services()[worker]["environment"]["RAY_WORKER_NUM_CPUS"]
        assert cpus == f"${{{variable}:-}}", worker
        assert documented()[variable] == "", variable
    assert '--num-cpus="${RAY_WORKER_NUM_CPUS:-' in (BIN / "dst-ray-node").read_text()


def mlflow_setup(values: dict[str, str]) -> tuple[str, str, str]:
    """With ``values`` as .env: the MLflow UI address the API hands out, and the allowed
    hosts and CORS origins the MLflow server runs with."""
    mlflow = services()["mlflow"]
    command = mlflow["command"]
    hosts = command[command.index("--allowed-hosts") + 1]
    origins = mlflow["environment"]["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"]
    ui_url = services()["api"]["environment"]["DST_MLFLOW_UI_URL"]
    return interpolate(ui_url, values), interpolate(hosts, values), interpolate(origins, values)


def test_mlflow_accepts_the_ui_address_the_api_hands_out() -> None:
    """With the compose file's defaults and with .env.example's values, a browser on the UI
    address passes MLflow's Host check and may send the UI's POSTs. A browser on another
    machine is refused (MLflow 3 answers 403) until .env.example's recipe is followed."""
    assert "--cors-allowed-origins" not in services()["mlflow"]["command"]  # would override env
    for values in ({}, documented()):
        assert mlflow_refusals(*mlflow_setup(values)) == []
    remote = "http://lab-host:5000"
    values = documented() | {"DST_MLFLOW_UI_URL": remote}
    assert mlflow_refusals(*mlflow_setup(values)) == ["Host lab-host:5000", f"Origin {remote}"]
    values["MLFLOW_ALLOWED_HOSTS"] += ",lab-host:5000"
    values["MLFLOW_CORS_ALLOWED_ORIGINS"] = remote
    assert mlflow_refusals(*mlflow_setup(values)) == []
    recipe = ENV_EXAMPLE.read_text()
    assert f"#   MLFLOW_CORS_ALLOWED_ORIGINS={remote}" in recipe
    assert "#   MLFLOW_ALLOWED_HOSTS=<the list below>,lab-host:5000" in recipe


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in services().items():
        assert "healthcheck" in service, f"{name} has no health check"
        role = service.get("environment", {}).get("DST_ROLE")
        if role:
            assert f'"{role}"' in (BIN / "dst-healthcheck").read_text(), role


def test_a_missing_secret_is_named_in_one_line(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}=x\n" for k in documented() if k != "POSTGRES_PASSWORD"))
    done = subprocess.run(
        [podman_compose(), "--env-file", str(env), "-p", "dstconfigcheck", "config"],
        cwd=REPO, env=podman_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "POSTGRES_PASSWORD" in last and ".env.example" in last


def test_the_dockerfile_passes_hadolint() -> None:
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("line", "rule"),
    [("RUN cd /tmp && make", "DL3003"), ("USER app", "DL3066"), ("FROM other:latest", "DL3007")],
)
def test_hadolint_rejects_what_it_should(tmp_path: Path, line: str, rule: str) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(DOCKERFILE.read_text() + f"\n{line}\n")
    done = hadolint(dockerfile)
    assert done.returncode != 0 and rule in done.stdout


def secrets_on_command_lines(data: dict[str, Any]) -> list[str]:
    """Services whose command names a secret (``ps`` on the host would show its value)."""
    found = []
    for name, service in data["services"].items():
        words = service.get("command") or []
        text = " ".join(words) if isinstance(words, list) else str(words)
        found += [f"{name}: {s}" for s in SECRETS if f"${{{s}" in text]
    return found


def test_no_secret_is_on_a_command_line() -> None:
    assert secrets_on_command_lines(compose()) == []
    leaky = {"services": {"mlflow": {"command": ["mlflow", "--uri", "x:${POSTGRES_PASSWORD}@db"]}}}
    assert secrets_on_command_lines(leaky) == ["mlflow: POSTGRES_PASSWORD"]


# --- the documented setup of .env -------------------------------------------------------------

SETUP_DOCS = (REPO / "README.md", REPO / "deploy" / "README.md", ENV_EXAMPLE)


def setup_command(doc: Path) -> str:
    """The shell command ``doc`` gives for making ``.env``: from its line that starts with
    ``cp .env.example .env`` to the first that runs openssl (in .env.example, its comment)."""
    lines = doc.read_text().splitlines()
    if doc == ENV_EXAMPLE:
        lines = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    (start,) = [i for i, line in enumerate(lines) if line.startswith("cp .env.example .env")]
    end = next(i for i in range(start, len(lines)) if "openssl rand" in lines[i])
    return "\n".join(lines[start : end + 1])


@pytest.mark.parametrize("doc", SETUP_DOCS, ids=lambda doc: str(doc.relative_to(REPO)))
def test_the_documented_setup_gives_each_secret_its_own_random_value(
    tmp_path: Path, doc: Path
) -> None:
    """Run as documented on a copy of .env.example, the setup command leaves no placeholder
    and gives each secret its own value (one value for all would hand the Ray token and the
    database password to whoever holds the API token); every other setting is left as it is."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    assert {k for k, v in documented().items() if v.startswith("change-me")} == set(SECRETS)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    done = subprocess.run(
        ["bash", "-c", setup_command(doc)], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = env_values(tmp_path / ".env")
    values = [env[name] for name in SECRETS]
    assert all(re.fullmatch(r"[0-9a-f]{48}", value) for value in values), values  # -hex 24
    assert len(set(values)) == len(SECRETS), "secrets share a value"
    assert not [name for name, value in env.items() if "change-me" in value]
    others = {k: v for k, v in documented().items() if k not in SECRETS}
    assert {k: v for k, v in env.items() if k not in SECRETS} == others


# --- the image ------------------------------------------------------------------------------


def app_stage() -> str:
    """The Dockerfile's ``app`` stage (the image every service but PostgreSQL runs), with its
    continuation lines joined as the builder joins them."""
    return DOCKERFILE.read_text().replace("\\\n", "").split("FROM base AS app\n", 1)[1]


def test_the_image_user_owns_every_named_volume_mount_point() -> None:
    """A new named volume takes its mount point's owner from the image, and Docker creates a
    missing mount point owned by root: every mount point of a named volume in the services
    that run our image is made in the image and owned by the user the containers run as."""
    image = compose()["x-image"]["image"]
    volumes = set(compose()["volumes"])
    targets = set()
    for service in services().values():
        if service.get("image") == image:
            for mount in service.get("volumes", []):
                # as compose reads it with DST_DATA_HOST_DIR empty: a named volume
                source, target = interpolate(mount, {}).split(":")[:2]
                if source in volumes:
                    targets.add(target)
    assert targets == {"/shared", "/data", "/mlartifacts"}
    stage = app_stage()
    (uid,) = re.findall(r"^USER (\d+)", stage, re.MULTILINE)
    users = [words.split() for words in re.findall(r"useradd ([^&]+)&&", stage)]
    (name,) = [w[-1] for w in users if w[w.index("--uid") + 1] == uid]
    made = {
        path for paths in re.findall(r"mkdir -p ((?:/\S+ *)+)", stage) for path in paths.split()
    }
    owned = {
        path
        for owner, paths in re.findall(r"chown (\w+)(?::\w+)? ((?:/\S+ *)+)", stage)
        if owner in (name, uid)
        for path in paths.split()
    }
    assert targets <= made, f"not made in the image: {targets - made}"
    assert targets <= owned, f"not owned by {name}: {targets - owned}"


def version_check() -> str:
    """The shell command with which the build checks ``DST_VERSION`` (the instruction after
    the app stage's ``ARG DST_VERSION``, comments skipped)."""
    stage = app_stage()
    assert stage.count("ARG DST_VERSION=") == 1
    after = stage.split("ARG DST_VERSION=dev\n", 1)[1].splitlines()
    run = next(line for line in after if not line.startswith("#"))
    assert run.startswith("RUN "), run
    return run.removeprefix("RUN ")


VERSIONS = {  # DST_VERSION: whether the build takes it (a Ray node label value)
    "latest": True,
    "dev": True,
    "1.0": True,
    "1.0_rc1": True,
    "v1.2.3-14-gdeadbee": True,
    "test-dsttest1a2b3c4d": True,
    "a" * 63: True,
    "1.0+build": False,
    "a" * 64: False,
    "v1.2.3-14-gdeadbee-dirty-" + "0123456789" * 4: False,
    "-1.0": False,
    "1.0-": False,
    "1.0 beta": False,
    "1.0,x=y": False,
    "feature/x": False,
    "": False,
}


def test_the_build_refuses_a_version_ray_would_refuse_as_a_label() -> None:
    """Every Ray node carries DST_IMAGE_VERSION (the build's DST_VERSION) as a label, which
    ``ray start`` validates and the job driver compares with its own DST_IMAGE_VERSION. The
    build takes exactly the versions Ray takes (an empty one neither: dst-ray-node would
    label it ``dev``), so that no node fails to start on its version."""
    from ray._private.label_utils import parse_node_labels_string

    def ray_start_takes(version: str) -> bool:  # what `ray start --labels` does with it
        try:
            labels = parse_node_labels_string(f"dst-lab-version={version}")
        except ValueError:
            return False
        return labels == {"dst-lab-version": version}

    command = version_check()
    assert "/app/.venv/bin/python" in command  # the image's Python, with the image's Ray
    command = command.replace("/app/.venv/bin/python", sys.executable)
    assert "DST_IMAGE_VERSION=${DST_VERSION}" in app_stage()
    for version, takes in VERSIONS.items():
        done = subprocess.run(
            ["sh", "-c", command], env=os.environ | {"DST_VERSION": version},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (done.returncode == 0) is takes, (version, done.stderr)
        assert takes is (ray_start_takes(version) and version != ""), version
        if not takes:
            assert f"DST_VERSION={version!r}" in done.stderr, done.stderr


# --- health checks ----------------------------------------------------------------------------

RAYLET = "http://127.0.0.1:52365/api/local_raylet_healthz"  # the node's dashboard agent
GCS = "http://127.0.0.1:8265/api/gcs_healthz"  # the head's dashboard


def run_healthcheck(
    monkeypatch: pytest.MonkeyPatch, role: str, answers: dict[str, int | None]
) -> tuple[int, list[tuple[str, float]]]:
    """dst-healthcheck's exit code as DST_ROLE ``role``, with ``answers`` as the HTTP status
    each URL answers (None: nothing listens), and the (URL, timeout) of each probe."""
    probes: list[tuple[str, float]] = []

    class Answer:
        def __init__(self, status: int) -> None:
            self.status = status

        def __enter__(self) -> Answer:
            return self

        def __exit__(self, *_: object) -> None:
            return None

    def urlopen(url: str, timeout: float) -> Answer:
        probes.append((url, timeout))
        status = answers.get(url)
        if status is None:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        if status >= 400:  # as urllib does
            raise urllib.error.HTTPError(url, status, "error", Message(), None)
        return Answer(status)

    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the health check runs a command: {args}")

    monkeypatch.setenv("DST_ROLE", role)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(subprocess, "run", run)
    loader = SourceFileLoader("dst_healthcheck", str(BIN / "dst-healthcheck"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module.main(), probes


@pytest.mark.parametrize(
    ("role", "answers", "healthy"),
    [
        ("ray-worker", {RAYLET: 200}, True),
        ("ray-worker", {RAYLET: 503}, False),  # the head says this node's raylet is dead
        ("ray-worker", {}, False),  # the raylet died and its agent with it
        ("ray-head", {RAYLET: 200, GCS: 200}, True),
        ("ray-head", {RAYLET: 200, GCS: 503}, False),
        ("ray-head", {GCS: 200}, False),
    ],
)
def test_a_ray_node_is_healthy_when_its_own_raylet_is(
    monkeypatch: pytest.MonkeyPatch, role: str, answers: dict[str, int | None], healthy: bool
) -> None:
    """A Ray node's health is its own raylet's (and on the head the GCS's too), asked of the
    node itself, not of the head: a worker whose raylet died is unhealthy, and a head that is
    down does not make every worker unhealthy."""
    code, probes = run_healthcheck(monkeypatch, role, answers)
    assert (code == 0) is healthy
    assert probes[0][0] == RAYLET


@pytest.mark.parametrize(
    ("service", "urls"),
    [
        ("ray-worker", [RAYLET]),
        ("ray-gpu-worker", [RAYLET]),
        ("ray-head", [RAYLET, GCS]),
        ("mlflow", ["http://127.0.0.1:5000/health"]),
        ("api", ["http://127.0.0.1:8000/healthz"]),
    ],
)
def test_each_health_check_probes_its_own_container_in_time(
    monkeypatch: pytest.MonkeyPatch, service: str, urls: list[str]
) -> None:
    """Each service's health check probes its own container only, and all its probes
    together time out within the time compose gives the check."""
    role = services()[service]["environment"]["DST_ROLE"]
    code, probes = run_healthcheck(monkeypatch, role, dict.fromkeys(urls, 200))
    assert code == 0 and [url for url, _ in probes] == urls
    allowed = float(services()[service]["healthcheck"]["timeout"].removesuffix("s"))
    assert sum(timeout for _, timeout in probes) <= allowed


def test_every_ray_node_serves_the_raylet_health_where_it_is_probed() -> None:
    """The health check asks the node's dashboard agent, on 52365: Ray's default, which
    dst-ray-node passes to the head and the workers alike, and which the KubeRay probes use."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    assert DEFAULT_DASHBOARD_AGENT_LISTEN_PORT == 52365
    assert RAYLET in (BIN / "dst-healthcheck").read_text()
    script = (BIN / "dst-ray-node").read_text().replace("\\\n", "")
    starts = [line for line in script.splitlines() if "ray start" in line]
    assert len(starts) == 2 and "--head" in starts[0]
    for start in starts:
        assert " --dashboard-agent-listen-port=52365 " in start, start
    kuberay = (REPO / "deploy" / "kuberay" / "raycluster.yaml").read_text()
    assert kuberay.count("localhost:52365/api/local_raylet_healthz") == 6  # 3 pods, 2 probes
