"""The compose deployment, measured with Podman on this machine: image size, cold and cached
image builds, ``compose up`` until the API is ready, submit -> first trial running on the warm
cluster, and a 4-trial study undisturbed versus the same study losing one of its two workers
in the middle (printed as a ratio, measured side by side in this one run).

    uv run python -m benchmarks.deploy [--cold-downloads]

The build context is the committed tree (``git archive HEAD``). "Cold" builds use no layer
cache; their downloads come from the host's uv cache unless ``--cold-downloads`` gives the
build an empty one (then every wheel, several GB, is downloaded). "Code change" rebuilds after
one edit to a source file: only the project layers are rebuilt. Everything the benchmark
makes is removed at the end (the bootstrapped Debian base image stays cached).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from service.client import ApiClient
from tests.deploy.stack import (
    REPO,
    Stack,
    ensure_base_image,
    image_ids,
    missing_tools,
    podman,
)
from tests.service import e2e

log = logging.getLogger("benchmarks.deploy")
EPOCHS = 30


def export_tree(directory: Path) -> Path:
    """The committed tree (HEAD) as a build context in ``directory``."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True)
    directory.mkdir()
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def study(name: str, trials: int, epochs: int) -> dict[str, Any]:
    """The suite's digits study (4 trials, or 1) with single-CPU trials: one per worker."""
    spec = e2e.study(name, epochs=epochs, resources={"cpus_per_trial": 1})
    if trials == 1:
        spec["grid"] = {"seed": [0]}
    return spec


def wait(predicate: Any, what: str, timeout: float = 600, poll: float = 0.2) -> float:
    """Seconds until ``predicate()`` is true."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(what)
        time.sleep(poll)
    return time.monotonic() - start


def run_study(client: ApiClient, stack: Stack, name: str, kill_worker: bool) -> float:
    """Seconds from submission to the end of a 4-trial study; with ``kill_worker``, worker 1
    is SIGKILLed once both workers' trials are past their second epoch."""
    start = time.monotonic()
    experiment_id = client.submit(study(name, 4, EPOCHS))["id"]

    def busy() -> bool:
        trials = client.trials(experiment_id)
        return sum(t["state"] == "running" and t["epoch"] >= 2 for t in trials) == 2

    if kill_worker:
        wait(busy, "both workers busy")
        podman("kill", "--signal", "KILL", stack.container("ray-worker", 1))
    wait(lambda: client.experiment(experiment_id)["status"] == "succeeded", name, poll=0.5)
    return time.monotonic() - start


def first_trial_running(client: ApiClient, name: str) -> float:
    """Seconds from submitting a 1-trial study until its trial runs (then waits for its end)."""
    experiment_id = client.submit(study(name, 1, 2))["id"]

    def running() -> bool:
        return any(t["state"] != "pending" for t in client.trials(experiment_id))

    took = wait(running, "the first trial running")
    wait(lambda: client.experiment(experiment_id)["status"] == "succeeded", name, poll=0.5)
    return took


def measure(cold_downloads: bool) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    base = ensure_base_image()
    rows.append(("base image bootstrap (debootstrap + import)", f"{base:.0f} s (0: cached)"))
    with tempfile.TemporaryDirectory(prefix="dst-bench-") as tmp:
        context = export_tree(Path(tmp) / "context")
        uv_cache = Path(tmp) / "uv-cache" if cold_downloads else None
        stack = Stack(Path(tmp), context=context, uv_cache=uv_cache)
        before = image_ids()
        try:
            took = stack.build(no_cache=True)
            rows.append(("cold build, app image", f"{took['app']:.0f} s"))
            rows.append(("cold build, postgres image", f"{took['postgres']:.0f} s"))
            stack.build()  # layers of a --no-cache build are not kept as cache (buildah)
            took = stack.build()
            rows.append(("cached build (nothing changed), app", f"{took['app']:.1f} s"))
            (context / "service" / "__init__.py").write_text("# changed\n")
            took = stack.build()
            rows.append(("rebuild after a code change, app", f"{took['app']:.0f} s"))
            size = podman("image", "inspect", "--format", "{{.Size}}", stack.tags()[1]).strip()
            rows.append(("app image size", f"{int(size) / 1e9:.2f} GB"))
            size = podman("image", "inspect", "--format", "{{.Size}}", stack.tags()[0]).strip()
            rows.append(("postgres image size", f"{int(size) / 1e9:.2f} GB"))
            start = time.monotonic()
            stack.up(workers=2)
            stack.wait_ready()
            rows.append(("compose up -> API ready", f"{time.monotonic() - start:.0f} s"))
            stack.wait_workers(2)
            rows.append(("compose up -> both workers joined", f"{time.monotonic() - start:.0f} s"))
            client = ApiClient(stack.api_url, stack.api_token)
            cold = first_trial_running(client, "first")
            warm = first_trial_running(client, "second")
            rows.append(("submit -> trial running, first job", f"{cold:.1f} s"))
            rows.append(("submit -> trial running, warm cluster", f"{warm:.1f} s"))
            calm = run_study(client, stack, "undisturbed", kill_worker=False)
            lost = run_study(client, stack, "worker-lost", kill_worker=True)
            rows.append(("4-trial study, 2 workers, undisturbed", f"{calm:.0f} s"))
            rows.append(("same study, one worker SIGKILLed mid-study", f"{lost:.0f} s"))
            rows.append(("worker loss: extra time", f"{lost / calm:.2f}x ({lost - calm:+.0f} s)"))
        finally:
            stack.down()
            left = stack.leftovers() + [f"image {i}" for i in image_ids() - before]
            if left:
                log.error("left behind: %s", left)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold-downloads", action="store_true", help="empty uv cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    missing = missing_tools()
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}")
    rows = measure(args.cold_downloads)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        log.info("%s  %s", name.ljust(width), value)


if __name__ == "__main__":
    main()
