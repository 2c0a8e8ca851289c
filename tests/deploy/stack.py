"""The compose stack (``docker-compose.yml``) run for real with Podman and podman-compose.

:class:`Stack` builds the images from ``deploy/Dockerfile`` on a locally bootstrapped Debian
base (no registry is reachable), brings the stack up under a project name of its own on free
host ports, and tears it down leaving nothing behind: no container, network or volume of the
project and no image but the cached base. Used by the container test and the deployment
benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.local import free_port

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PROJECT_LABEL = "io.podman.compose.project"
# the host's CA bundle, handed to the build as a secret when it exists (TLS-inspecting proxies)
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
UV_CACHE = Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))
TOOLS = ("podman", "runc", "debootstrap")
INSTALL_HINT = "apt-get install podman runc debootstrap (`.ci/run` does it)"


# run in the head container (its Ray auth token is in its environment): polls the GCS until
# argv[1] nodes offering CPUs are alive or argv[2] seconds have passed; prints how many are
COUNT_WORKERS = """
import sys, time, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while True:
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(1)
print(len(alive))
"""


def podman_env() -> dict[str, str]:
    """This process's environment with the project's Podman settings (cgroupfs, runc)."""
    return os.environ | {"CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman_compose() -> str:
    """podman-compose from this virtual environment (a dev dependency)."""
    return str(Path(sys.executable).with_name("podman-compose"))


def missing_tools() -> list[str]:
    """What the container path needs and this machine lacks."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not Path(podman_compose()).exists():
        missing.append("podman-compose (uv sync)")
    return missing


def podman(*args: str, check: bool = True, timeout: float = 600) -> str:
    """Run ``podman ARGS``; its standard output."""
    done = subprocess.run(
        ["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def ensure_base_image() -> float:
    """Bootstrap Debian bookworm into ``BASE_IMAGE`` unless it is cached; seconds spent."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=podman_env()).returncode == 0:
        return 0.0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dst-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=podman_env(),
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        tar.wait()
    return time.monotonic() - start


def image_ids() -> set[str]:
    return set(podman("images", "-a", "-q", "--no-trunc").split())


@dataclass
class Stack:
    """One compose project: its own name, image tag, host ports and secrets."""

    workdir: Path
    project: str = field(default_factory=lambda: f"dsttest{secrets.token_hex(4)}")
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    worker_cpus: int = 1
    context: Path = REPO  # the build context
    uv_cache: Path | None = None  # the build's uv cache; None: the host's, where it has one
    images_before: set[str] | None = None  # set by build(): what down() must not remove

    @property
    def image(self) -> str:
        return f"localhost/{self.project}"

    @property
    def version(self) -> str:
        return f"test-{self.project}"

    def tags(self) -> tuple[str, str]:
        """The PostgreSQL and application images, as the compose file names them."""
        return f"{self.image}-postgres:{self.version}", f"{self.image}:{self.version}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env_file(self) -> Path:
        """The stack's ``.env``: every variable ``.env.example`` documents that it needs."""
        values = {
            "DST_API_TOKEN": self.api_token,
            "RAY_AUTH_TOKEN": secrets.token_urlsafe(24),
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "DST_IMAGE": self.image,
            "DST_VERSION": self.version,
            "DST_API_PORT": str(self.api_port),
            "MLFLOW_PORT": str(self.mlflow_port),
            "RAY_DASHBOARD_PORT": str(self.dashboard_port),
            "DST_MLFLOW_UI_URL": self.mlflow_url,
            "RAY_SHM_SIZE": "512mb",
            "RAY_WORKER_NUM_CPUS": str(self.worker_cpus),
        }
        path = self.workdir / ".env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
        return path

    def build(self, no_cache: bool = False) -> dict[str, float]:
        """Build the PostgreSQL and application images; seconds each took."""
        if self.images_before is None:
            self.images_before = image_ids()
        common = [
            "build", "--format", "docker", "-f", str(self.context / "deploy" / "Dockerfile"),
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"DST_VERSION={self.version}",
        ]  # fmt: skip
        if no_cache:
            common.append("--no-cache")
        if CA_BUNDLE.is_file():
            common += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
        uv_cache = self.uv_cache or (UV_CACHE if UV_CACHE.is_dir() else None)
        if uv_cache is not None:  # wheels the host already has are not downloaded again
            uv_cache.mkdir(parents=True, exist_ok=True)
            common += ["-v", f"{uv_cache}:/cache/uv"]
        took = {}
        for target, tag in zip(("postgres", "app"), self.tags(), strict=True):
            start = time.monotonic()
            podman(*common, "--target", target, "-t", tag, str(self.context), timeout=1800)
            took[target] = time.monotonic() - start
        return took

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [podman_compose(), "--env-file", str(self.env_file()), "-p", self.project]
        return subprocess.run(
            [*command, *args], cwd=REPO, env=podman_env(), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def up(self, workers: int) -> None:
        done = self.compose("up", "-d", "--no-build", "--scale", f"ray-worker={workers}")
        if done.returncode != 0:
            raise RuntimeError(f"compose up failed: {done.stderr[-2000:]}")

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds until the API's ``/readyz`` says the database, Ray and MLflow are up."""
        start = time.monotonic()
        last = "no answer"
        while time.monotonic() - start < timeout:
            try:
                answer = httpx.get(f"{self.api_url}/readyz", timeout=5)
                if answer.status_code == 200:
                    return time.monotonic() - start
                last = answer.text
            except httpx.HTTPError as error:
                last = str(error)
            time.sleep(1)
        raise RuntimeError(f"the stack was not ready in {timeout:.0f} s: {last}\n{self.logs()}")

    def wait_workers(self, count: int, timeout: float = 240) -> float:
        """Seconds until ``count`` Ray nodes that offer CPUs have joined the head (``/readyz``
        answers once the head is up, before its workers join)."""
        start = time.monotonic()
        command = [
            "podman", "exec", self.container("ray-head"), "python", "-c", COUNT_WORKERS,
            str(count), str(timeout),
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, env=podman_env(), capture_output=True, text=True, timeout=timeout + 60
            )
            said = (done.stdout.strip().splitlines() or ["?"])[-1]
            problem = done.stderr.strip()[-2000:]
        except subprocess.TimeoutExpired:
            said, problem = "?", "the count did not return"
        if not said.isdigit() or int(said) < count:
            raise RuntimeError(
                f"{count} Ray workers did not join in {timeout:.0f} s (saw {said}): "
                f"{problem}\n{self.logs()}"
            )
        return time.monotonic() - start

    def container(self, service: str, number: int = 1) -> str:
        return f"{self.project}_{service}_{number}"

    def containers(self) -> list[dict[str, object]]:
        listed = podman(
            "ps", "-a", "--format", "json", "--filter", f"label={PROJECT_LABEL}={self.project}"
        )
        return list(json.loads(listed or "[]"))

    def logs(self, tail: int = 30) -> str:
        out = []
        for entry in self.containers():
            name = str((entry.get("Names") or ["?"])[0])  # type: ignore[index]
            text = podman("logs", "--tail", str(tail), name, check=False, timeout=30)
            out.append(f"--- {name} ({entry.get('State')})\n{text}")
        return "\n".join(out)

    def down(self) -> None:
        """``compose down -v``, then remove whatever of the project is left (scaled
        containers included) and every image the build made."""
        self.compose("down", "-v", "-t", "5", timeout=180)
        label = f"label={PROJECT_LABEL}={self.project}"
        ids = podman("ps", "-a", "-q", "--filter", label, check=False).split()
        if ids:
            podman("rm", "-f", "-t", "2", *ids, check=False)
        volumes = podman("volume", "ls", "-q", "--filter", label, check=False).split()
        if volumes:
            podman("volume", "rm", "-f", *volumes, check=False)
        networks = podman("network", "ls", "-q", "--filter", label, check=False).split()
        if networks:
            podman("network", "rm", "-f", *networks, check=False)
        if self.images_before is None:
            return
        for tag in self.tags():  # untagged even where the build reused an existing image
            podman("rmi", "-f", tag, check=False)
        made = image_ids() - self.images_before
        if made:
            podman("rmi", "-f", *made, check=False)

    def leftovers(self) -> list[str]:
        """What of this project is still on the machine."""
        label = f"label={PROJECT_LABEL}={self.project}"
        left = [f"container {c}" for c in podman("ps", "-a", "-q", "--filter", label).split()]
        left += [f"volume {v}" for v in podman("volume", "ls", "-q", "--filter", label).split()]
        left += [f"network {n}" for n in podman("network", "ls", "-q", "--filter", label).split()]
        if self.images_before is not None:
            left += [f"image {i}" for i in image_ids() - self.images_before]
            tagged = podman("images", "--format", "{{.Repository}}:{{.Tag}}").split()
            left += [f"image {t}" for t in self.tags() if t in tagged]
        return left
