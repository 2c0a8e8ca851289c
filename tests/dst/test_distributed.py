"""Data-parallel training on CPU (gloo, 2 processes): the same run as one worker, identical
masks on every rank, evaluation of each sample exactly once, loud failure on divergence."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from dst.criteria import CRITERIA
from dst.distributed import (
    MasksDivergedError,
    World,
    all_gather,
    check_masks_agree,
    mask_fingerprint,
)
from dst.growth import GROWTH
from dst.spec import RunSpec
from dst.training import Trainer
from tests.ddp import run_world, train

BASE: dict[str, Any] = {
    "model": "small-mlp",
    "dataset": "digits",
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.05, "optimizer_kernel": "eager"},
    "sparsity": {"mode": "dst", "density": 0.1, "update_period": 5},
}
COMBOS = list(itertools.product(CRITERIA.names(), GROWTH.names()))


def spec(**sparsity: Any) -> RunSpec:
    return RunSpec.model_validate({**BASE, "sparsity": {**BASE["sparsity"], **sparsity}})


def short(criterion: str, growth: str) -> RunSpec:
    data = {
        **BASE,
        "training": {**BASE["training"], "epochs": 1, "max_steps_per_epoch": 8},
        "sparsity": {**BASE["sparsity"], "criterion": criterion, "growth": growth},
    }
    data["sparsity"]["update_period"] = 2
    return RunSpec.model_validate(data)


def _scenarios(world: World) -> dict[str, Any]:
    """What each rank reports back to the test process."""
    out: dict[str, Any] = {}
    trainer = Trainer(spec(criterion="snip", growth="gradient"), world=world)
    out["stop"] = trainer.sparsity.updater.schedule.stop  # type: ignore[union-attr]
    out["steps_per_epoch"] = trainer.steps_per_epoch
    out["history"] = trainer.fit()
    out["masks"] = trainer.masks
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    out["grads"] = len(grads)
    out["grad_storages"] = len({g.untyped_storage().data_ptr() for g in grads})
    out["val_count"] = trainer.evaluate(trainer.val_loader) and trainer.last_count
    # a buffer each rank holds its own value of (as BatchNorm's statistics after a step)
    trainer.model.register_buffer("probe", torch.full((3,), float(world.rank + 1)))
    out["probe_before"] = trainer.model.probe.clone()
    trainer.evaluate(trainer.val_loader)
    out["probe"] = trainer.model.probe.clone()
    out["val_local"] = sum(len(y) for _, y in trainer.val_loader)
    out["fingerprints"] = {}
    for criterion, growth in COMBOS:
        t = Trainer(short(criterion, growth), world=world)
        t.fit()
        out["fingerprints"][criterion, growth] = mask_fingerprint(t.masks)
    masks = {n: m.clone() for n, m in trainer.masks.items()}
    # a divergence the check must catch on every rank, though the ranks' masks have the same
    # active count and the same sum of active indices in every layer (moves that cancel)
    first = next(iter(masks.values())).view(-1)
    pattern = [True, False, False, True] if world.rank == 0 else [False, True, True, False]
    first[:4] = torch.tensor(pattern)
    try:
        check_masks_agree(masks, world, step=99)
        out["diverged"] = None
    except MasksDivergedError as error:
        out["diverged"] = str(error)
    out["mid_epoch"] = _resume_mid_epoch(world)
    out["gathered"] = all_gather(("host", [str(world.rank)] * (world.rank + 1)), world)
    return out


def _resume_mid_epoch(world: World) -> dict[str, Any]:
    """Every rank restores rank 0's checkpoint from inside epoch 2 (as Train does after a
    worker-group restart) and trains on: the uninterrupted and the resumed run, per rank."""
    import copy

    import torch.distributed as dist

    data = {**BASE, "training": {**BASE["training"], "dropout": 0.1, "checkpoint_every_steps": 7}}
    data["sparsity"] = {**BASE["sparsity"], "criterion": "random"}
    s = RunSpec.model_validate(data)
    full = Trainer(s, world=world)
    states: list[dict[str, Any]] = []
    history = full.fit(on_checkpoint=lambda: states.append(copy.deepcopy(full.state_dict())))
    chosen = [next(st for st in states if st["epoch"] == 1)]
    dist.broadcast_object_list(chosen, src=0)
    resumed = Trainer(s, world=world)
    resumed.load_state_dict(chosen[0])
    return {
        "full": (history, full.masks),
        "resumed": (resumed.fit(), resumed.masks),
        "batch": chosen[0]["progress"]["batch"],
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_world(_scenarios, 2, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    trainer = Trainer(spec(criterion="snip", growth="gradient"))
    stop = trainer.sparsity.updater.schedule.stop  # type: ignore[union-attr]
    return {"stop": stop, "history": trainer.fit(), "masks": trainer.masks, "trainer": trainer}


def test_schedule_is_counted_in_global_steps(ranks: list, single: dict) -> None:
    # digits: 1,257 training samples, global batch 64 -> 20 steps per epoch on every rank
    assert [r["steps_per_epoch"] for r in ranks] == [20, 20]
    assert [r["stop"] for r in ranks] == [single["stop"]] * 2 == [60, 60]


def test_two_workers_do_what_one_worker_does(ranks: list, single: dict) -> None:
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "itop", "density")
    for rank in ranks:
        assert [h["step"] for h in rank["history"]] == [h["step"] for h in single["history"]]
        for mine, ref in zip(rank["history"], single["history"], strict=True):
            for key in keys:
                assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
        for name, mask in single["masks"].items():
            assert torch.equal(rank["masks"][name], mask), name


def test_gradients_are_views_of_ddps_buckets(ranks: list) -> None:
    """No copy of the all-reduced gradients out of DDP's buckets: they live in one storage."""
    for r in ranks:
        assert r["grads"] > 1 and r["grad_storages"] == 1, r


def test_masks_agree_across_ranks_for_every_criterion_and_growth(ranks: list) -> None:
    for combo in COMBOS:
        assert torch.equal(ranks[0]["fingerprints"][combo], ranks[1]["fingerprints"][combo])


def test_evaluation_sees_every_sample_once(ranks: list, single: dict) -> None:
    n_val = len(single["trainer"].val_loader.dataset)
    assert [r["val_count"] for r in ranks] == [n_val, n_val]
    assert sum(r["val_local"] for r in ranks) == n_val  # shards, no padding


def test_every_rank_evaluates_with_rank_0s_buffers(ranks: list) -> None:
    assert [float(r["probe_before"][0]) for r in ranks] == [1.0, 2.0]
    for rank in ranks:
        assert torch.equal(rank["probe"], torch.full((3,), 1.0))


def test_every_rank_resumes_from_a_mid_epoch_checkpoint_bit_identically(ranks: list) -> None:
    for rank in ranks:
        out = rank["mid_epoch"]
        assert out["batch"] > 0  # inside an epoch, not at its end
        (h_full, m_full), (h_resumed, m_resumed) = out["full"], out["resumed"]
        drop_time = [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in h_full]
        assert [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in h_resumed] == (
            drop_time
        )
        assert all(torch.equal(m_full[n], m_resumed[n]) for n in m_full)


def test_a_divergence_fails_loudly_on_every_rank(ranks: list) -> None:
    for r in ranks:
        assert r["diverged"] is not None and "masks differ" in r["diverged"]


def test_every_rank_gathers_every_ranks_value_in_rank_order(ranks: list) -> None:
    expected = [("host", ["0"]), ("host", ["1", "1"])]
    assert [r["gathered"] for r in ranks] == [expected, expected]
    assert all_gather({"alone": 1}, World()) == [{"alone": 1}]


def test_masks_with_moves_that_cancel_have_different_fingerprints() -> None:
    """Same count and same index sum, different connections: the fingerprints differ."""
    a = {"w": torch.tensor([[True, False], [False, True]])}  # active 0, 3
    b = {"w": torch.tensor([[False, True], [True, False]])}  # active 1, 2
    assert torch.equal(mask_fingerprint(a)[:, :2], mask_fingerprint(b)[:, :2])
    assert not torch.equal(mask_fingerprint(a), mask_fingerprint(b))
    assert torch.equal(mask_fingerprint(a), mask_fingerprint({"w": a["w"].clone()}))


@pytest.mark.parametrize("data_path", ["loader", "tensor"])
def test_two_workers_do_what_one_worker_does_with_augmentation(
    tmp_path: Path, data_path: str
) -> None:
    """CIFAR-10 files, random crop and flip: each sample's draws are keyed on (seed, epoch,
    index) on both data paths, so the two workers' augmented shares make up the one worker's
    batches, and the runs agree (masks exactly)."""
    from tests.dst.test_datasets import write_cifar
    from tests.dst.test_training import cifar_run

    write_cifar(tmp_path)
    spec = cifar_run(tmp_path, data_path=data_path, optimizer_kernel="eager").model_dump()
    single = train(spec, World())
    for rank in run_world(functools.partial(train, spec), 2, tmp_path):
        for mine, ref in zip(rank["history"], single["history"], strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "test_acc", "itop"):
                assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
        for name, mask in single["masks"].items():
            assert torch.equal(rank["masks"][name], mask), name
