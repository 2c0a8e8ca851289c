"""Static checks of what the compose deployment ships: ``docker-compose.yml`` against the
compose specification, every reference in it resolvable (services, volumes, build targets,
scripts, variables, settings), ``.env.example`` documenting exactly the variables it uses,
MLflow accepting the UI address it documents, and ``deploy/Dockerfile`` clean under hadolint.
Fast: no container is started."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
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


def documented() -> dict[str, str]:
    """``.env.example``'s variables and their example values."""
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines())
    return {k.strip(): v for k, *rest in pairs if rest and not k.startswith("#") for v in rest}


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
