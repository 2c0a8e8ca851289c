"""Global training batches, shared out across data-parallel workers.

One epoch is one seeded permutation of the training set cut into global batches of
``batch_size`` (the last one may be smaller). With W workers, worker r takes every W-th
sample of each global batch, so the W workers together see exactly the batches a single
worker would, in the same order: a W-worker run and a 1-worker run of one spec perform the
same optimization (the loss is scaled so that DDP's gradient average equals the global
batch's mean, see :meth:`GlobalBatchSampler.loss_scale`). A last global batch smaller than W
would leave a worker without samples; it is dropped (only ever with W > 1).

On the loader data path each sample's random augmentation draws from a seed of its own,
(run seed, epoch, index): :class:`SampleKeys` names each sample of a batch with its epoch and
:class:`SeededSamples` seeds the draw. The augmented batches are then the same whichever
process loads a sample: with any number of loader processes, any number of data-parallel
workers, and after a resume in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields worker ``rank``'s share (``[r::W]``) of each global batch of one epoch."""

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < world_size:  # some rank would get empty batches
            raise ValueError(
                f"a global batch of {batch_size} cannot be split between {world_size} workers: "
                f"each needs at least one sample"
            )
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed``."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63


class SampleKeys(Sampler[list[tuple[int, int]]]):
    """The batches of a :class:`GlobalBatchSampler`, each sample as ``(epoch, index)``."""

    def __init__(self, batches: GlobalBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batches.epoch
        for batch in self.batches:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class SeededSamples(Dataset):
    """``base`` indexed by ``(epoch, index)`` keys: sample ``index`` is loaded (and randomly
    augmented) with PyTorch's CPU generator seeded from :func:`sample_seed`, and the
    generator's state is put back afterwards (the loading process's own draws, dropout's in
    a single process, are not disturbed)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        generator = torch.default_generator
        state = generator.get_state()  # (a third of fork_rng's cost: this runs per sample)
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.base[index]
        finally:
            generator.set_state(state)
