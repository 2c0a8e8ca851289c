"""Data-parallel training (DDP): who this process is, and what its workers must agree on.

The training loop is the same for one worker and for W workers (Ray Train, torchrun): every
rank builds the same model and masks from the same seed, trains on its share of each global
batch (:mod:`dst.batches`), and takes topology updates from the all-reduced gradients with an
identically seeded generator, so the masks stay identical on every rank. That is checked after
each update (:func:`check_masks_agree`): a divergence fails the run loudly instead of silently
training W different networks. Evaluation covers each sample exactly once with rank 0's
buffers on every rank, and the sums are reduced across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from dst.hashing import mix32
from dst.masks import Masks

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel workers (0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def current(cls) -> World:
        """The initialized ``torch.distributed`` process group's world, else a single worker."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


class MasksDivergedError(RuntimeError):
    """Ranks hold different masks: the run would train different networks on each worker."""


def shard(dataset: Dataset, world: World) -> Dataset:
    """Rank r's samples r, r+W, r+2W, ...: every sample on exactly one rank, no padding."""
    if not world.distributed:
        return dataset
    return Subset(dataset, range(world.rank, len(dataset), world.size))  # type: ignore[arg-type]


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over all ranks (in place; unchanged when alone)."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather(value: T, world: World) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` alone).
    A collective: every rank must call it."""
    if not world.distributed:
        return [value]
    gathered: list[T] = [value] * world.size  # placeholders, replaced in rank order
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics and counters).

    DDP hands rank 0's buffers to every rank at the start of each training forward; then each
    rank updates them from its own share of the batch. Evaluation runs the plain module, so
    without this each rank would evaluate its shard with slightly different statistics; after
    it, every rank evaluates the model rank 0 checkpoints.
    """
    if not world.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def mask_fingerprint(masks: Masks) -> torch.Tensor:
    """Per layer: (active count, sum of active flat indices, sum of their hashes), [L, 3]
    int64 on the CPU.

    Equal masks give equal fingerprints. Sums alone are linear, so moves that cancel (one
    connection one place up, another one place down) would keep them; the hash
    (:func:`dst.hashing.mix32`) is not, so two different masks share a fingerprint only by a
    32-bit coincidence. Exact integer sums (below 2^62 for layers under 2^30 weights): no
    rounding can differ between ranks.
    """
    rows = []
    for mask in masks.values():
        flat = mask.flatten()  # [n] bool
        idx = torch.arange(flat.numel(), device=flat.device)  # [n]: not listed, no GPU wait
        on = flat.long()  # [n], 0 or 1
        rows.append(torch.stack([on.sum(), (idx * on).sum(), (mix32(idx) * on).sum()]))
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 3, dtype=torch.long)  # one wait


def check_masks_agree(masks: Masks, world: World, step: int) -> None:
    """Raise :class:`MasksDivergedError` unless every rank holds the same masks."""
    if not world.distributed:
        return
    mine = mask_fingerprint(masks)  # [L, 3], on the CPU
    backend_device = torch.device("cpu")  # gloo gathers CPU tensors; NCCL only CUDA ones
    if dist.get_backend() == "nccl":
        backend_device = torch.device("cuda", torch.cuda.current_device())
    local = mine.to(backend_device)
    everyone = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(everyone, local)
    differing = [r for r, other in enumerate(everyone) if not torch.equal(other.cpu(), mine)]
    if differing:
        raise MasksDivergedError(
            f"masks differ between rank {world.rank} and ranks {differing} after the topology "
            f"update at step {step}: updates must use all-reduced gradients, identical weights "
            "and identically seeded generators on every rank"
        )
