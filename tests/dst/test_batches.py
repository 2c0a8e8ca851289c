"""Global batches: W workers together see exactly the batches one worker sees."""

from __future__ import annotations

import pytest
import torch

from dst.batches import GlobalBatchSampler, SampleKeys, SeededSamples


def batches(n: int, b: int, world: int, epoch: int = 0, seed: int = 0) -> list[list[list[int]]]:
    """[rank][step] -> indices."""
    out = []
    for rank in range(world):
        sampler = GlobalBatchSampler(n, b, seed, rank, world)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_together_see_the_single_worker_batches(world: int) -> None:
    (single,) = batches(103, 16, 1)
    shared = batches(103, 16, world)
    assert len(single) == 7 and all(len(r) == 7 for r in shared)
    for step, whole in enumerate(single):
        parts = [shared[r][step] for r in range(world)]
        assert sorted(i for part in parts for i in part) == sorted(whole)
        assert parts[0] == whole[0::world]  # interleaved: rank r takes samples r, r+W, ...
    seen = [i for r in shared for batch in r for i in batch]
    assert sorted(seen) == list(range(103))  # every sample once, no padding


def test_each_epoch_has_its_own_order_and_repeats_it() -> None:
    first, second = batches(50, 10, 1, epoch=0)[0], batches(50, 10, 1, epoch=1)[0]
    assert first != second
    assert batches(50, 10, 1, epoch=1)[0] == second
    assert batches(50, 10, 1, epoch=1, seed=1)[0] != second


def test_loss_scale_makes_the_ddp_average_the_global_mean() -> None:
    s = GlobalBatchSampler(100, 32, 0, rank=1, world_size=2)
    assert [s.global_size(i) for i in range(len(s))] == [32, 32, 32, 4]
    assert s.loss_scale(0) == pytest.approx(2 / 32) and s.loss_scale(3) == pytest.approx(2 / 4)
    # one worker: the plain mean
    assert GlobalBatchSampler(100, 32, 0).loss_scale(3) == pytest.approx(1 / 4)
    # the DDP average of the two ranks' scaled sums equals the mean over the global batch
    values = torch.arange(100.0)
    ranks = [GlobalBatchSampler(100, 32, 0, r, 2) for r in range(2)]
    parts = [list(r)[3] for r in ranks]  # the last global batch, rank by rank
    ddp = sum(values[p].sum() * r.loss_scale(3) for p, r in zip(parts, ranks, strict=True)) / 2
    whole = [i for part in parts for i in part]
    assert float(ddp) == pytest.approx(float(values[whole].mean()))


def test_a_last_batch_smaller_than_the_world_is_dropped() -> None:
    assert len(GlobalBatchSampler(65, 32, 0, 0, 1)) == 3
    assert len(GlobalBatchSampler(65, 32, 0, 0, 2)) == 2  # 1 sample cannot feed 2 workers
    assert len(GlobalBatchSampler(66, 32, 0, 0, 2)) == 3


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        GlobalBatchSampler(10, 2, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="global batch of 2 cannot be split between 4"):
        GlobalBatchSampler(10, 2, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        GlobalBatchSampler(10, 0, 0)


class RandomDraw(torch.utils.data.Dataset):
    """A sample that is one draw from PyTorch's CPU generator (as a random crop is)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3) + i


def test_each_sample_draws_from_its_own_seed_and_leaves_the_stream_alone() -> None:
    samples = SeededSamples(RandomDraw(), seed=3)
    torch.manual_seed(0)
    stream = torch.rand(2)
    torch.manual_seed(0)
    first = samples[(1, 4)]
    assert torch.equal(torch.rand(2), stream)  # the caller's draws are what they would be
    assert torch.equal(samples[(1, 4)], first)  # the same sample of the same epoch: the same
    assert not torch.equal(samples[(2, 4)], first)  # another epoch: another draw
    assert not torch.equal(SeededSamples(RandomDraw(), seed=4)[(1, 4)], first)  # another run


def test_sample_keys_name_each_sample_with_its_epoch() -> None:
    sampler = GlobalBatchSampler(10, 4, seed=0, rank=1, world_size=2)
    sampler.set_epoch(5, start=1)
    keyed = list(SampleKeys(sampler))
    assert keyed == [[(5, i) for i in batch] for batch in sampler]
    assert len(SampleKeys(sampler)) == len(sampler)
