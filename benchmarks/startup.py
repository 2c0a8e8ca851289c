"""How long a user waits: the CLI's help, a local ``dst serve`` coming up, a small study from
submission to its trial running and to the end, and (with ``--demo``) the whole ``dst demo``.

Each figure is measured on this machine with real processes (``uv run dst ...``), printed with
the target it is held to:
  * ``dst --help``                                   < 1 s
  * ``dst serve`` until ``/healthz`` answers           < 3 s
  * ``dst serve`` until ``/readyz`` (Ray and MLflow up) < 20 s
  * submit -> first trial running, warm stack          < 5 s
  * ``dst demo`` end to end (40 trials)                < 60 s

    uv run python -m benchmarks.startup [--demo] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from service.client import parent_closed
from service.local import free_port, uncached_bytecode

STUDY = {
    "name": "startup-probe",
    "model": "small-mlp",
    "dataset": "digits",
    "training": {"epochs": 1, "batch_size": 64},
    "sparsity": {"density": 0.1, "update_period": 10},
    "resources": {"cpus_per_trial": 0.5},
}


def seconds_until(check: Callable[[], bool], timeout: float = 600) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("gave up waiting")
        time.sleep(0.02)
    return time.perf_counter() - start


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def trial_started(client: httpx.Client, path: str) -> bool:
    return bool(client.get(f"{path}/trials").json()[0]["state"] != "pending")


def study_ended(client: httpx.Client, path: str) -> bool:
    return client.get(path).json()["status"] in ("succeeded", "failed")


def settled(client: httpx.Client, path: str) -> bool:
    """The study's MLflow parent run is closed: the stack has nothing left to do for it."""
    return parent_closed(client.get(path).json())


def line(what: str, value: float, target: float) -> None:
    verdict = "ok" if value < target else "OVER"
    print(f"{what:<44} {value:7.2f} s   target < {target:g} s   {verdict}")


def cli_help(repeats: int) -> None:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(["uv", "run", "--frozen", "dst", "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - start)
    line("dst --help (median)", statistics.median(runs), 1)


def serve_and_submit(repeats: int) -> None:
    storage = Path(tempfile.mkdtemp(prefix="dst-startup-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"DST_STORAGE_PATH": str(storage), "DST_PORT": str(port)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["uv", "run", "--frozen", "dst", "serve"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seconds_until(lambda: answers(f"{url}/healthz"))
        line("dst serve -> /healthz", time.perf_counter() - start, 3)
        seconds_until(lambda: answers(f"{url}/readyz"))
        line("dst serve -> /readyz", time.perf_counter() - start, 20)
        token = (storage / "api-token").read_text().strip()
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
        to_running, to_end = [], []
        for i in range(repeats + 1):  # the first one warms the stack
            start = time.perf_counter()
            created = client.post("/experiments", json=STUDY | {"name": f"probe-{i}"}).json()
            path = f"/experiments/{created['id']}"
            seconds_until(partial(trial_started, client, path))
            running = time.perf_counter() - start
            seconds_until(partial(study_ended, client, path))
            ended = time.perf_counter()
            seconds_until(partial(settled, client, path))  # idle again: warm, not busy
            if i > 0:
                to_running.append(running)
                to_end.append(ended - start)
        line("submit -> trial running, warm (median)", statistics.median(to_running), 5)
        done = statistics.median(to_end)
        print(f"{'submit -> 1-epoch study done, warm (median)':<44} {done:7.2f} s")
    finally:  # SIGTERM, as a process manager stops it (a shell's `cmd &` ignores SIGINT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def demo() -> None:
    storage = Path(tempfile.mkdtemp(prefix="dst-demo-"))
    start = time.perf_counter()
    subprocess.run(
        ["uv", "run", "--frozen", "dst", "demo"],
        env=os.environ | {"DST_STORAGE_PATH": str(storage)},
        capture_output=True,
        check=True,
    )
    line("dst demo end to end", time.perf_counter() - start, 60)


def bytecode() -> str:
    """Whether processes started here compile their imports from source (seconds each)."""
    why = uncached_bytecode()
    return f"bytecode: {why}" if why else "bytecode: compiled, or cached on first import"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="also time `dst demo` (minutes)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; every figure from real processes started by uv run")
    print(bytecode())
    cli_help(args.repeats)
    serve_and_submit(args.repeats)
    if args.demo:
        demo()


if __name__ == "__main__":
    main()
