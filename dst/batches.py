"""Global training batches, shared out across data-parallel workers.

One epoch is one seeded permutation of the training set cut into global batches of
``batch_size`` (the last one may be smaller). With W workers, worker r takes every W-th
sample of each global batch, so the W workers together see exactly the batches a single
worker would, in the same order: a W-worker run and a 1-worker run of one spec perform the
same optimization (the loss is scaled so that DDP's gradient average equals the global
batch's mean, see :meth:`GlobalBatchSampler.loss_scale`). A last global batch smaller than W
would leave a worker without samples; it is dropped (only ever with W > 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields worker ``rank``'s share (``[r::W]``) of each global batch of one epoch."""

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch whose permutation the next iteration draws (same on all ranks),
        and the global batch it starts at (> 0 when resuming in the middle of an epoch)."""
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        """This epoch's order of the training set: [n] int64, a function of (seed, epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def __len__(self) -> int:
        """Global batches per epoch; each gives every rank at least one sample."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world_size)

    def global_size(self, step: int) -> int:
        """Samples in global batch ``step`` of an epoch (all but the last are full)."""
        return min(self.batch_size, self.n - step * self.batch_size)

    def loss_scale(self, step: int) -> float:
        """Factor turning this rank's summed loss into its share of the global mean: W / |B|.

        DDP averages gradients over the W ranks, so Σ_r (W/|B|)·∇sum_r / W = ∇(global sum)/|B|.
        """
        return self.world_size / self.global_size(step)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        for step in range(self.start, len(self)):
            start = step * self.batch_size
            batch = order[start : start + self.batch_size]  # [|B|]
            yield batch[self.rank :: self.world_size].tolist()
