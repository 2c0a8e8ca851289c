"""Run a function on W local CPU processes joined in one gloo process group (a DDP world)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dst.distributed import World


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank(rank: int, size: int, port: int, out: str, task: Callable[[World], Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as a Ray Train worker with fewer than 2 CPUs
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        result: Any = task(World.current())
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_world(task: Callable[[World], Any], size: int, out: Path) -> list[Any]:
    """``task(world)`` on ``size`` spawned ranks (a picklable, top-level callable); each rank's
    return value, in rank order. A rank that raised fails here with its traceback."""
    mp.start_processes(_rank, args=(size, _free_port(), str(out), task), nprocs=size)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]
    for result in results:
        if isinstance(result, dict) and "error" in result:
            raise AssertionError(result["error"])
    return results


def train(spec: dict[str, Any], world: World) -> dict[str, Any]:
    """Train ``spec`` as one rank of ``world``: its history and final masks."""
    from dst.spec import RunSpec
    from dst.training import Trainer

    trainer = Trainer(RunSpec.model_validate(spec), world=world)
    return {"history": trainer.fit(), "masks": trainer.masks}
