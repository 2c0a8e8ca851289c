"""Real short trainings on digits: learning, determinism, modes, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dst.criteria import CRITERIA
from dst.kernels import KernelUnavailableError
from dst.masks import density
from dst.spec import RunSpec
from dst.training import Trainer, best_validation, with_sync_batchnorm

BASE = {
    "model": "small-mlp",
    "dataset": "digits",
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.05},
    "sparsity": {"mode": "dst", "density": 0.1, "update_period": 5},
}


def spec(**sparsity: object) -> RunSpec:
    data = {**BASE, "sparsity": {**BASE["sparsity"], **sparsity}}
    return RunSpec.model_validate(data)


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]


@pytest.mark.slow
def test_dst_on_digits_at_density_0_1_learns() -> None:
    s = RunSpec.model_validate({**BASE, "training": {**BASE["training"], "epochs": 25}})
    trainer = Trainer(s)
    history = trainer.fit()
    assert history[-1]["test_acc"] > 0.8  # chance is 0.1
    assert history[-1]["density"] == pytest.approx(density(trainer.initial_masks))
    assert history[-1]["itop"] > 0.1  # topology updates explored new weights


def test_same_seed_gives_identical_masks_and_metrics() -> None:
    runs = []
    for _ in range(2):
        trainer = Trainer(spec(criterion="snip", growth="gradient"))
        runs.append((strip_time(trainer.fit()), trainer.masks))
    (h1, m1), (h2, m2) = runs
    assert h1 == h2
    assert all(torch.equal(m1[n], m2[n]) for n in m1)


def test_initial_state_does_not_depend_on_the_criterion() -> None:
    a = Trainer(spec(criterion="magnitude", growth="random"))
    b = Trainer(spec(criterion="rsensitivity", growth="gradient"))
    assert all(torch.equal(a.initial_masks[n], b.initial_masks[n]) for n in a.initial_masks)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_exact_density_is_kept_through_training() -> None:
    trainer = Trainer(spec(criterion="set", growth="gradient"))
    counts = {n: int(m.sum()) for n, m in trainer.initial_masks.items()}
    trainer.fit()
    assert trainer.step >= 3 * 5  # several topology updates happened
    assert {n: int(m.sum()) for n, m in trainer.masks.items()} == counts
    assert trainer.sparsity is not None
    for name, w in trainer.sparsity.weights.items():
        assert not w[~trainer.sparsity.masks[name]].any()


def test_static_mode_keeps_the_initial_mask() -> None:
    trainer = Trainer(spec(mode="static"))
    history = trainer.fit()
    assert all(torch.equal(trainer.masks[n], trainer.initial_masks[n]) for n in trainer.masks)
    assert history[-1]["itop"] == pytest.approx(history[-1]["density"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto is CUDA here: fused runs")
def test_a_kernel_that_cannot_run_here_fails_when_the_trainer_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fused`` with ``device: auto`` passes validation; without CUDA the trainer refuses it
    when it is built, not at its first step."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data = {**BASE, "device": "auto", "training": {**BASE["training"], "optimizer_kernel": "fused"}}
    with pytest.raises(KernelUnavailableError, match="CUDA"):
        Trainer(RunSpec.model_validate(data))


def test_dense_mode_has_no_masks() -> None:
    trainer = Trainer(spec(mode="dense"))
    history = trainer.fit()
    assert trainer.masks == {}
    assert history[-1]["density"] == 1.0


def test_metrics_per_epoch() -> None:
    history = Trainer(spec()).fit()
    assert [m["epoch"] for m in history] == [1, 2, 3]
    for m in history:
        assert m["loss_gap"] == pytest.approx(m["val_loss"] - m["train_loss"])
        assert 0 <= m["test_acc"] <= 1 and 0 < m["itop"] <= 1


def test_lr_decays_at_half_and_three_quarters() -> None:
    s = RunSpec.model_validate({**BASE, "training": {**BASE["training"], "epochs": 4}})
    history = Trainer(s).fit()
    assert [round(m["lr"], 6) for m in history] == [0.05, 0.05, 0.005, 0.0005]


def test_resume_from_checkpoint_matches_uninterrupted_run() -> None:
    full = Trainer(spec(criterion="random", growth="random"))
    expected = strip_time(full.fit())
    first = Trainer(spec(criterion="random", growth="random"))
    first.run_epoch()
    state = first.state_dict()
    resumed = Trainer(spec(criterion="random", growth="random"))
    resumed.load_state_dict(state)
    assert strip_time(resumed.fit()) == expected
    assert all(torch.equal(resumed.masks[n], full.masks[n]) for n in full.masks)


def test_binary_task_uses_one_logit() -> None:
    s = RunSpec.model_validate(
        {
            "model": "small-mlp",
            "dataset": "breast_cancer",
            "training": {"epochs": 5, "batch_size": 32, "lr": 0.05},
            "sparsity": {"update_period": 10},
        }
    )
    trainer = Trainer(s)
    history = trainer.fit()
    assert list(trainer.model.parameters())[-1].shape == (1,)
    assert history[-1]["test_acc"] > 0.85  # majority class is 0.63


def test_best_validation_reports_the_test_metrics_of_the_best_val_epoch() -> None:
    def epoch(n: int, val: float, test: float) -> dict[str, float]:
        return {"epoch": n, "val_acc": val, "test_acc": test, "test_loss": 1 - test}

    history = [epoch(1, 0.5, 0.4), epoch(2, 0.8, 0.7), epoch(3, 0.6, 0.9)]
    best = best_validation(history, epoch(4, 0.8, 0.95))  # a tie keeps the earlier epoch
    assert best == {
        "best_val_acc": 0.8,
        "best_val_epoch": 2,
        "test_acc_at_best_val": 0.7,
        "test_loss_at_best_val": pytest.approx(0.3),
    }
    assert best_validation(history, epoch(4, 0.81, 0.2))["test_acc_at_best_val"] == 0.2


def test_each_epoch_records_both_test_accuracies_and_new_connections() -> None:
    trainer = Trainer(spec())
    history = trainer.fit()
    for i, m in enumerate(history):
        best = max(history[: i + 1], key=lambda h: h["val_acc"])
        assert m["best_val_epoch"] == best["epoch"]
        assert m["test_acc_at_best_val"] == best["test_acc"]
    # digits: 1,257 training samples, batch 64 -> 20 steps per epoch, Δt = 5 -> 4 updates
    assert all(m["new_connections"] > 0 for m in history)


def test_dense_dropout_run_trains_with_dropout_and_evaluates_without() -> None:
    s = RunSpec.model_validate(
        {**BASE, "training": {**BASE["training"], "dropout": 0.05}, "sparsity": {"mode": "dense"}}
    )
    trainer = Trainer(s)
    dropout = trainer.model.get_submodule("dropout")
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.05
    trainer.fit()
    assert not dropout.training  # the last thing an epoch does is evaluate
    x = next(iter(trainer.test_loader))[0]
    assert torch.equal(trainer.model(x), trainer.model(x))


def test_the_tensor_data_path_trains_exactly_like_the_loader() -> None:
    """digits has no augmentation: the same batches give the same run, bit for bit."""
    runs = []
    for path in ("loader", "tensor"):
        s = RunSpec.model_validate({**BASE, "training": {**BASE["training"], "data_path": path}})
        trainer = Trainer(s)
        runs.append((strip_time(trainer.fit()), trainer.masks))
    (h1, m1), (h2, m2) = runs
    assert h1 == h2
    assert all(torch.equal(m1[n], m2[n]) for n in m1)


def test_the_tensor_data_path_needs_data_in_memory() -> None:
    with pytest.raises(ValueError, match=r"training.data_path 'tensor' needs a dataset held"):
        RunSpec.model_validate(
            {"model": "small-cnn", "dataset": "tiny-imagenet", "training": {"data_path": "tensor"}}
        )


def with_training(base: dict, **training: object) -> RunSpec:
    return RunSpec.model_validate({**base, "training": {**base["training"], **training}})


def test_resume_from_a_mid_epoch_checkpoint_matches_uninterrupted_run() -> None:
    """Checkpoints every 7 steps (not on epoch boundaries); dropout and random criterion and
    growth draw from every RNG the run has. Resuming from one inside epoch 2 ends bit-identical.
    """
    base = {**BASE, "training": {**BASE["training"], "dropout": 0.1}}
    s = with_training(base, checkpoint_every_steps=7)
    s = s.model_copy(update={"sparsity": s.sparsity.model_copy(update={"criterion": "random"})})
    full = Trainer(s)
    states: list[dict] = []
    expected = strip_time(
        full.fit(on_checkpoint=lambda: states.append(copy.deepcopy(full.state_dict())))
    )
    steps = full.steps_per_epoch
    assert [st["step"] for st in states] == [k for k in range(7, 3 * steps, 7) if k % steps]
    middle = next(st for st in states if st["epoch"] == 1)  # inside the second epoch
    assert 0 < middle["progress"]["batch"] < steps and middle["progress"]["seen"] > 0
    resumed = Trainer(s)
    resumed.load_state_dict(middle)
    assert strip_time(resumed.fit()) == expected
    assert all(torch.equal(resumed.masks[n], full.masks[n]) for n in full.masks)
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_checkpointing_does_not_change_the_run() -> None:
    """The same spec trains the same whether or not anyone saves its checkpoints."""
    s = with_training(BASE, checkpoint_every_steps=5)
    saved = Trainer(s)
    calls: list[int] = []
    h1 = strip_time(saved.fit(on_checkpoint=lambda: calls.append(saved.step)))
    assert calls and strip_time(Trainer(s).fit()) == h1


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_state() -> None:
    trainer = Trainer(with_training(BASE, precision="bf16", epochs=2))
    dtypes: list[torch.dtype] = []
    layer = trainer.model.fc1  # type: ignore[union-attr]
    layer.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    history = trainer.fit()
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in history)
    sp = trainer.sparsity
    assert sp is not None
    for name, w in sp.weights.items():
        assert not w[~sp.masks[name]].any(), f"{name} has weights off its mask"
    fp32 = Trainer(with_training(BASE, epochs=2)).fit()
    assert history[-1]["test_acc"] == pytest.approx(fp32[-1]["test_acc"], abs=0.1)


CNN = {**BASE, "model": "small-cnn", "training": {**BASE["training"], "epochs": 1}}


def test_channels_last_feeds_nhwc_batches_and_trains_like_the_standard_layout() -> None:
    trainer = Trainer(with_training(CNN, channels_last=True))
    layouts: list[bool] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    trainer.model.register_forward_pre_hook(record)
    history = strip_time(trainer.fit())
    assert layouts and all(layouts)
    assert all(w.is_contiguous() for w in trainer.model.parameters())  # masks index them
    standard = strip_time(Trainer(with_training(CNN)).fit())
    for got, want in zip(history, standard, strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_channels_last_needs_images() -> None:
    with pytest.raises(ValueError, match=r"training.channels_last applies to image datasets"):
        RunSpec.model_validate(
            {"model": "small-mlp", "dataset": "higgs", "training": {"channels_last": True}}
        )


def test_sync_batchnorm_replaces_every_batchnorm_keeping_parameters_and_buffers() -> None:
    """The conversion only (its forward needs several GPUs): the same parameters and buffers,
    so the optimizer, the masks and checkpoints are unaffected."""
    from dst.datasets import get_dataset
    from dst.models import build_model

    model = build_model("resnet56", get_dataset("cifar10").info)
    before = dict(model.state_dict(keep_vars=True))
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    converted = with_sync_batchnorm(model, torch.device("cuda"))
    assert converted is model  # changed in place: the trainer's model is the one trained
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="sync_batchnorm runs on CUDA only"):
        with_sync_batchnorm(model, torch.device("cpu"))


def test_sync_batchnorm_needs_cuda_or_auto() -> None:
    data = {"model": "resnet56", "dataset": "cifar10", "training": {"sync_batchnorm": True}}
    with pytest.raises(ValueError, match=r"training.sync_batchnorm runs on CUDA only.*'cpu'"):
        RunSpec.model_validate(data)
    for device in ("auto", "cuda:1"):
        assert RunSpec.model_validate({**data, "device": device}).training.sync_batchnorm


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one() -> None:
    s = with_training(BASE, epochs=1, compile=True)
    compiled = Trainer(s)
    assert compiled.net is not compiled.model  # the forward runs through torch.compile
    history = strip_time(compiled.fit())
    eager = strip_time(Trainer(with_training(BASE, epochs=1)).fit())
    assert history[0] == pytest.approx(eager[0], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_resnet50_trains_on_an_imagenet_folder_with_decoding_in_loader_workers(
    tmp_path: Path,
) -> None:
    """The ImageNet pipeline end to end on a generated ImageFolder: JPEGs decoded and
    augmented (random resized crop 224, flip) in a loader worker, a DST step with gradient
    growth on ResNet-50, evaluation at resize 256 + center crop 224."""
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            for i in range(2):
                path = tmp_path / "imagenet" / split / wnid / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
    s = RunSpec.model_validate(
        {
            "model": "resnet50",
            "dataset": "imagenet",
            "data": {"root": str(tmp_path), "download": False},
            "training": {"epochs": 1, "batch_size": 2, "num_workers": 1, "eval_batch_size": 4},
            "sparsity": {"density": 0.2, "growth": "gradient", "update_period": 1},
        }
    )
    trainer = Trainer(s)
    (metrics,) = trainer.fit()
    assert trainer.info.input_shape == (3, 224, 224)
    assert metrics["step"] == 2 and trainer.last_count == 4  # the whole val set, once
    assert metrics["density"] == pytest.approx(0.2, abs=1e-3)
    assert metrics["new_connections"] > 0  # the topology update ran


def test_removal_sets_are_compared_at_every_update_without_changing_training() -> None:
    """MEST with λ = 0 scores exactly |θ|: it would prune the very set magnitude prunes."""
    measured = RunSpec.model_validate(
        {
            **spec(criterion="magnitude", mest_lambda=0.0).model_dump(),
            "analysis": {"removal_sets": True},
        }
    )
    plain = spec(criterion="magnitude", mest_lambda=0.0)
    trainer = Trainer(measured)
    history = trainer.fit()
    first = {
        k.split(".", 1)[1]: v
        for k, v in history[-1].items()
        if k.startswith("removal_jaccard_first.")
    }
    assert set(first) == set(CRITERIA.names())
    assert first["magnitude"] == 1.0 and first["mest"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert first["random"] < 0.5  # a random set barely overlaps a magnitude set
    assert "removal_jaccard.snip" in history[-1]
    # the first update per layer, for Appendix K's per-layer std; Eq. (1) is their mean
    layers = trainer.first_removal_layers
    assert set(layers) == set(first) and set(layers["snip"]) == set(trainer.masks)
    for criterion, per_layer in layers.items():
        assert first[criterion] == pytest.approx(sum(per_layer.values()) / len(per_layer))
    restored = Trainer(measured)
    restored.load_state_dict(trainer.state_dict())
    assert restored.first_removal_layers == layers
    # measuring changes nothing the run computes
    reference = Trainer(plain).fit()
    keep = ("test_acc", "train_loss", "itop", "new_connections")
    assert [{k: m[k] for k in keep} for m in history] == [
        {k: m[k] for k in keep} for m in reference
    ]


FRESH_PROCESS_RUN = """
import sys
from dst.spec import RunSpec
from dst.training import Trainer
for mode in ("dst", "static", "dense"):
    spec = RunSpec.model_validate({
        "model": "small-mlp", "dataset": "digits", "training": {"epochs": 2},
        "sparsity": {"mode": mode, "update_period": 5},
    })
    trainer = Trainer(spec)
    trainer.fit()
    Trainer(spec).load_state_dict(trainer.state_dict())
print(" ".join(m for m in ("torch._dynamo", "sklearn", "torchvision") if m in sys.modules))
"""


def test_a_fresh_process_trains_without_importing_what_it_does_not_use() -> None:
    """torch._dynamo (imported by torch's optimizer wrappers on first call), scikit-learn
    (for two data files it ships) and torchvision cost seconds each in every new trial
    process; an uncompiled digits run needs none of them."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_RUN], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""


def cifar_run(root: Path, **training: object) -> RunSpec:
    """A DST run on generated CIFAR-10 files (90 training images), augmented, loader path."""
    return RunSpec.model_validate(
        {
            "model": "large-mlp",
            "dataset": "cifar10",
            "data": {"root": str(root), "download": False},
            "training": {"epochs": 3, "batch_size": 16, "lr": 0.05, **training},
            "sparsity": {"density": 0.1, "update_period": 4, "criterion": "random"},
        }
    )


def test_loader_processes_do_not_change_the_augmented_batches(tmp_path: Path) -> None:
    """Each sample's augmentation draws from its own seed: 0 or 2 loader processes train the
    same run."""
    from tests.dst.test_datasets import write_cifar

    write_cifar(tmp_path)
    runs = [Trainer(cifar_run(tmp_path, num_workers=n, epochs=2)) for n in (0, 2)]
    histories = [strip_time(t.fit()) for t in runs]
    assert histories[0] == histories[1]
    for name, value in runs[0].model.state_dict().items():
        assert torch.equal(runs[1].model.state_dict()[name], value), name


def test_a_mid_epoch_resume_with_loader_processes_and_augmentation_is_bit_identical(
    tmp_path: Path,
) -> None:
    from tests.dst.test_datasets import write_cifar

    write_cifar(tmp_path)
    s = cifar_run(tmp_path, num_workers=2, checkpoint_every_steps=4)
    full = Trainer(s)
    states: list[dict] = []
    expected = strip_time(
        full.fit(on_checkpoint=lambda: states.append(copy.deepcopy(full.state_dict())))
    )
    middle = next(st for st in states if st["epoch"] == 1 and st["progress"]["batch"] > 0)
    resumed = Trainer(s)
    resumed.load_state_dict(middle)
    assert strip_time(resumed.fit()) == expected
    for name, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_an_update_that_removes_nothing_has_no_removal_jaccard() -> None:
    """Late in training the prune fraction has decayed to nothing: no criterion removes any
    weight, and the index of two empty sets is undefined, so no pair gets a value (counting
    it as 1 would make every criterion, random included, look identical)."""
    measured = RunSpec.model_validate(
        {**spec(criterion="magnitude").model_dump(), "analysis": {"removal_sets": True}}
    )
    trainer = Trainer(measured)
    trainer.fit()
    assert trainer.removal_jaccard  # the run's updates removed weights
    assert trainer.sparsity is not None
    trainer._compare_removal_sets(trainer.sparsity, 0.0)
    assert trainer.removal_jaccard == {}
    assert set(trainer.first_removal_jaccard) == set(CRITERIA.names())  # the first stays
