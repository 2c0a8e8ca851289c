"""The training recipe of Appendix A.2: SGD (momentum 0.9, Nesterov), weight decay, LR x decay
at 50% and 75% of the epochs, in dense, static-sparse or DST mode (Section 3.1).

Per step: forward, backward, a topology update every Δt steps (using this batch's gradients,
Section 5.1), then the optimizer step, which also enforces the masks (:mod:`dst.optimizers`).
Per epoch: train/val/test loss and accuracy, the loss gap (Fig. 4), density, ITOP ratio
(Appendix E), the number of new connections grown, and the test metrics of the epoch with the
best validation accuracy so far (what the paper's code reports).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dst.analysis import ItopTracker
from dst.batches import GlobalBatchSampler, SampleKeys, SeededSamples
from dst.criteria import resolve_criterion
from dst.datasets import DataConfig, DataInfo, default_data_root, load_dataset
from dst.distributed import World, all_sum, broadcast_buffers, check_masks_agree, shard
from dst.distributions import layer_densities
from dst.growth import GROWTH
from dst.masks import Masks, apply_masks, density, init_masks, prunable_weights
from dst.models import build_model
from dst.optimizers import MaskedSGD
from dst.schedules import PruneSchedule
from dst.spec import (
    RunSpec,
    TrainingConfig,
    resolve_init,
    resolve_model_options,
    resolve_training,
)
from dst.tensor_data import TensorBatches, TensorSplit, fixed_batches
from dst.topology import TopologyUpdater

log = logging.getLogger(__name__)

Metrics = dict[str, float]
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, ...], labels [B])


def seed_everything(seed: int) -> None:
    """Fix every RNG the run touches and make cuDNN deterministic (Appendix A.2)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for a missing CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
    return device


def loss_and_correct(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (or BCE for one-logit binary models) and the number of correct predictions."""
    if logits.shape[1] == 1:  # binary: one logit, as the paper's small-MLP on Higgs
        logit = logits.squeeze(1)  # [B]
        loss = nn.functional.binary_cross_entropy_with_logits(
            logit, target.float(), reduction=reduction
        )
        correct = ((logit > 0).long() == target).sum()
    else:
        loss = nn.functional.cross_entropy(logits, target, reduction=reduction)
        correct = (logits.argmax(1) == target).sum()
    return loss, correct


def with_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm layer a SyncBatchNorm (in place, keeping the same
    parameters and buffers, so the optimizer, masks and checkpoints are unaffected): in a
    data-parallel run each training forward then normalizes over the global batch, as a
    single worker does, instead of over the worker's share. PyTorch runs it on CUDA only."""
    if device.type != "cuda":
        raise ValueError(
            f"training.sync_batchnorm runs on CUDA only (PyTorch's SyncBatchNorm), and this "
            f"trial trains on {device}: set it to false"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The global torch seed of one rank's epoch (dropout, loader workers)."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) % 2**63


def checkpoint_seed(seed: int, rank: int, step: int) -> int:
    """The global torch seed after a mid-epoch checkpoint at global ``step``: from there on
    dropout draws are a function of (seed, rank, step), so a run resumed from that
    checkpoint draws what the uninterrupted one draws (on every rank)."""
    return (((seed * 1_000_003 + rank) * 10_007 + step) * 7 + 3) % 2**63


def best_validation(history: list[Metrics], latest: Metrics) -> Metrics:
    """The test metrics of the epoch with the best validation accuracy so far.

    What the paper's code reports (the checkpoint with the best validation accuracy); the
    earliest such epoch wins a tie. Derived from the history, so a resumed run agrees.
    """
    best = max([*history, latest], key=lambda m: m["val_acc"])
    return {
        "best_val_acc": best["val_acc"],
        "best_val_epoch": best["epoch"],
        "test_acc_at_best_val": best["test_acc"],
        "test_loss_at_best_val": best["test_loss"],
    }


@dataclass
class EpochProgress:
    """How far the current epoch has come: where a mid-epoch checkpoint resumes.

    ``loss`` and ``correct`` are sums on the device; at each mid-epoch checkpoint they are
    summed over ranks onto rank 0, so the one state rank 0 saves holds the whole epoch so far.
    """

    batch: int  # global batches done this epoch
    loss: torch.Tensor  # [] summed training loss
    correct: torch.Tensor  # [] number correct
    seen: int  # samples behind the sums

    @staticmethod
    def start(device: torch.device) -> EpochProgress:
        zero_loss = torch.zeros((), device=device)
        return EpochProgress(0, zero_loss, torch.zeros((), dtype=torch.long, device=device), 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "loss": self.loss.detach().cpu().clone(),
            "correct": self.correct.cpu().clone(),
            "seen": self.seen,
        }

    @staticmethod
    def from_state(state: dict[str, Any], device: torch.device) -> EpochProgress:
        loss, correct = state["loss"].to(device), state["correct"].to(device)
        return EpochProgress(state["batch"], loss, correct, state["seen"])


@dataclass
class Sparsity:
    """The sparse state of a run: masked weights, masks, the updater (DST only) and ITOP.

    The masks are edited in place (topology updates, checkpoint loads); the optimizer holds
    views of them and enforces them inside every step.
    """

    weights: dict[str, nn.Parameter]
    masks: Masks
    updater: TopologyUpdater | None
    itop: ItopTracker

    def masks_by_param(self) -> dict[nn.Parameter, torch.Tensor]:
        return {self.weights[name]: mask for name, mask in self.masks.items()}


class Trainer:
    """One run of a :class:`RunSpec`: builds data, model, masks and optimizer, then trains."""

    def __init__(
        self, spec: RunSpec, device: torch.device | None = None, world: World | None = None
    ) -> None:
        """Build everything for ``spec``. With ``world.size`` > 1 (an initialized process
        group, e.g. under Ray Train) this process is one DDP worker of the same run."""
        self.spec = spec
        self.config: TrainingConfig = resolve_training(spec)
        self.device = device or resolve_device(spec.device)
        self.world = world or World()
        seed_everything(spec.seed)
        # the loaders come first: everything derived from their length (steps per epoch, the
        # schedule's stop step T) is then counted in global batches, the same on every rank
        data = load_dataset(spec.dataset, self._data_config())
        self.info: DataInfo = data.info
        self.sampler = GlobalBatchSampler(
            len(data.train),  # type: ignore[arg-type]
            self.config.batch_size,
            spec.seed,
            self.world.rank,
            self.world.size,
        )
        self.train_loader: Iterable[Batch]
        self.val_loader: Iterable[Batch]
        self.test_loader: Iterable[Batch]
        if self.config.data_path == "tensor" and data.tensors is not None:
            self._setup_tensor_data(data.tensors)
        else:
            # each sample augmented from its own seed: the same batches with any number of
            # loader processes or workers, and after a resume inside an epoch
            train = SeededSamples(data.train, spec.seed)
            self.train_loader = self._loader(train, batch_sampler=SampleKeys(self.sampler))
            self.val_loader = self._loader(shard(data.val, self.world))
            self.test_loader = self._loader(shard(data.test, self.world))
        torch.manual_seed(spec.seed)  # same initial weights whatever the data pipeline drew
        self.model = build_model(spec.model, data.info, resolve_model_options(spec)).to(self.device)
        epochs = self.config.epochs
        self.steps_per_epoch = len(self.sampler)
        if self.config.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, self.config.max_steps_per_epoch)
        self.total_steps = epochs * self.steps_per_epoch
        self.mask_generator = torch.Generator().manual_seed(spec.seed + 1)
        # with analysis.removal_sets: criterion -> Jaccard with this run's removal set, at the
        # latest and at the first topology update
        self.removal_jaccard: dict[str, float] = {}
        self.first_removal_jaccard: dict[str, float] = {}
        # ... and per layer at the first update (criterion -> layer -> J), so a study can take
        # the std over seeds per layer, as Appendix K does for Figure 20
        self.first_removal_layers: dict[str, dict[str, float]] = {}
        self.sparsity = self._build_sparsity()
        self.optimizer = MaskedSGD(
            self.model.parameters(),
            lr=self.config.lr,
            momentum=self.config.momentum,
            nesterov=self.config.nesterov,
            weight_decay=self.config.weight_decay,
            masks=self.sparsity.masks_by_param() if self.sparsity else None,
            kernel=self.config.optimizer_kernel,
        )
        if self.sparsity:  # a kernel that cannot run here fails now, not at the first step
            for dtype in {w.dtype for w in self.sparsity.weights.values()}:
                self.optimizer.masked_kernel(self.device, dtype)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer,
            milestones=[math.ceil(0.5 * epochs), math.ceil(0.75 * epochs)],
            gamma=self.config.lr_decay,
        )
        self.initial_masks: Masks = (
            {n: m.cpu().clone() for n, m in self.sparsity.masks.items()} if self.sparsity else {}
        )
        self.net, self.eval_net = self._setup_forward(self.model)
        self.step = 0
        self.epoch = 0
        self.progress: EpochProgress | None = None  # set while an epoch is under way
        # grown weights that were inactive before, this epoch; counted on the device, so an
        # update never waits for a GPU, and read once per epoch
        self.new_connections = self._count(0)
        self.last_count = 0  # samples behind the last reported mean (all ranks)
        self.history: list[Metrics] = []

    # -- construction -------------------------------------------------------------------
    def _count(self, value: int) -> torch.Tensor:
        """An int64 counter on the training device."""
        return torch.full((), value, dtype=torch.long, device=self.device)

    def _data_config(self) -> DataConfig:
        d = self.spec.data
        root = Path(d.root).expanduser() if d.root else default_data_root()
        return DataConfig(root=root, download=d.download, augment=d.augment)

    def _loader(self, dataset: Dataset, batch_sampler: SampleKeys | None = None) -> DataLoader:
        """The training loader (its batches from ``batch_sampler``) or an evaluation loader.

        Samples are decoded and augmented in ``num_workers`` worker processes; batches are
        page-locked when ``pin_memory`` (by default on CUDA) so host-to-GPU copies overlap.
        """
        pin = self.config.pin_memory
        pin = self.device.type == "cuda" if pin is None else pin
        workers = self.config.num_workers
        if batch_sampler is not None:
            return DataLoader(
                dataset,
                batch_sampler=batch_sampler,
                num_workers=workers,
                pin_memory=pin,
            )
        return DataLoader(
            dataset, batch_size=self.config.eval_batch_size, num_workers=workers, pin_memory=pin
        )

    def _setup_tensor_data(self, splits: tuple[TensorSplit, TensorSplit, TensorSplit]) -> None:
        """The tensor data path: every split on the device, batches cut by indexing."""
        train, val, test = (s.to(self.device) for s in splits)
        size, w = self.config.eval_batch_size, self.world
        self.train_loader = TensorBatches(train, SampleKeys(self.sampler), self.spec.seed)
        self.val_loader = TensorBatches(val, fixed_batches(len(val), size, w.rank, w.size))
        self.test_loader = TensorBatches(test, fixed_batches(len(test), size, w.rank, w.size))

    def _setup_forward(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """What training steps and evaluation run forward through: the model, wrapped in DDP
        for training when this is one of several workers, each compiled when asked."""
        train_net = self._data_parallel(model)
        if not self.config.compile:
            return train_net, model
        eval_net = torch.compile(model)
        if train_net is model:
            return eval_net, eval_net  # type: ignore[return-value]
        return torch.compile(train_net), eval_net  # type: ignore[return-value]

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the device (channels-last for images when asked)."""
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> AbstractContextManager[object]:
        """bfloat16 autocast for the forward pass and loss when ``precision`` is bf16."""
        if self.config.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DDP when this is one of several workers, else ``model``.

        DDP all-reduces (averages) the gradients during backward, so the topology update
        and the optimizer see the same gradients on every rank. The gradients are views into
        DDP's all-reduce buckets (``gradient_as_bucket_view``): no copy of every gradient out
        of the buckets after each backward (a kernel per parameter on a GPU) and no second
        copy of the gradients in memory; the values are the same.
        """
        if not self.world.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.config.sync_batchnorm:
            model = with_sync_batchnorm(model, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def _build_sparsity(self) -> Sparsity | None:
        s = self.spec.sparsity
        if s.mode == "dense":
            return None
        weights = prunable_weights(self.model)
        shapes = {name: tuple(w.shape) for name, w in weights.items()}
        densities = layer_densities(shapes, s.density, resolve_init(self.spec))
        masks = init_masks(weights, densities, self.mask_generator)
        apply_masks(weights, masks)
        updater = None
        if s.mode == "dst":
            schedule = PruneSchedule(
                s.schedule,
                s.prune_fraction,
                s.update_period,
                s.stop_step or self.total_steps,
                s.schedule_interval,
                s.schedule_factor,
            )
            updater = TopologyUpdater(
                resolve_criterion(s.criterion, mest_lambda=s.mest_lambda),
                GROWTH.get(s.growth),
                schedule,
                s.scope,
                self.mask_generator,
            )
        return Sparsity(weights, masks, updater, ItopTracker(masks))

    # -- training -----------------------------------------------------------------------
    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, loss_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (masks enforced inside it, see :class:`MaskedSGD`).

        ``loss_scale`` turns this rank's summed loss into its share of the global batch's
        mean (:meth:`GlobalBatchSampler.loss_scale`; 1/|B| for a single worker). Returns the
        summed loss and number correct as tensors on the device, so a GPU is not
        synchronized every step (the epoch reads them once).
        """
        x, y = self._inputs(x), y.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.net(x)
            loss_sum, correct = loss_and_correct(logits.float(), y, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum * loss_scale).backward()
        self.step += 1
        sp = self.sparsity
        if sp and sp.updater and sp.updater.schedule.is_update_step(self.step):
            if self.spec.analysis.removal_sets:
                self._compare_removal_sets(sp, sp.updater.schedule.fraction(self.step))
            changes = sp.updater.update(sp.weights, sp.masks, self.optimizer, self.step)
            check_masks_agree(sp.masks, self.world, self.step)
            self.new_connections += torch.cat([c.is_new for c in changes.values()]).sum()
            sp.itop.update(sp.masks)
        self.optimizer.step()
        return loss_sum.detach(), correct

    def _compare_removal_sets(self, sp: Sparsity, fraction: float) -> None:
        """Section 5.4: the Jaccard index (Eq. 1, mean over layers) of the set this run's
        criterion prunes now with the set each other criterion would prune from the same
        network state: a row of Figure 18, and of Figure 6a at the first update (when every
        criterion of a seed still shares this state). Before the update changes anything."""
        from dst.criteria import CRITERIA
        from dst.structure import defined_mean, layer_jaccards, removal_sets

        s = self.spec.sparsity
        grads = {name: w.grad for name, w in sp.weights.items()}
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.step)
        sets = removal_sets(
            sp.weights, grads, sp.masks, CRITERIA.names(), fraction,
            scope=s.scope, mest_lambda=s.mest_lambda, generator=generator,
        )  # fmt: skip
        own = sets[s.criterion]
        layers = {name: layer_jaccards(own, other) for name, other in sets.items()}
        means = {name: defined_mean(js.values()) for name, js in layers.items()}  # Eq. (1)
        # an update that removes nothing (the prune fraction has decayed) has no index
        row = {name: j for name, j in means.items() if not math.isnan(j)}
        self.removal_jaccard = row
        if not self.first_removal_jaccard:
            self.first_removal_jaccard = dict(row)
            self.first_removal_layers = layers

    def train_epoch(
        self, progress: bool = False, on_checkpoint: Callable[[], None] | None = None
    ) -> tuple[float, float]:
        """One pass over (at most ``max_steps_per_epoch`` batches of) the training set, from
        where :attr:`progress` says when resuming in the middle of it.

        With ``checkpoint_every_steps`` = N, every N-th global step inside the epoch calls
        ``on_checkpoint`` (which may save :meth:`state_dict`) and reseeds the torch RNGs from
        (seed, rank, step), so a run resumed there continues exactly as this one does.
        """
        self.model.train()
        resuming = self.progress is not None
        p = self.progress or EpochProgress.start(self.device)
        self.progress = p
        if not resuming:
            self.new_connections = self._count(0)
            # dropout draws from here: fixed per (seed, rank, epoch), so a resumed run draws
            # what the uninterrupted one drew, and ranks draw differently (augmentation is
            # keyed per sample on both data paths: dst.batches, dst.tensor_data)
            torch.manual_seed(epoch_seed(self.spec.seed, self.world.rank, self.epoch))
        self.sampler.set_epoch(self.epoch, start=p.batch)  # a new order each epoch, every rank
        batches = iter(self.train_loader)  # (creating it may draw from the RNG)
        if resuming:
            torch.manual_seed(checkpoint_seed(self.spec.seed, self.world.rank, self.step))
        bar = tqdm(
            batches,
            initial=p.batch,
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}",
            leave=False,
            disable=not progress,
        )
        every = self.config.checkpoint_every_steps
        for x, y in bar:
            if p.batch >= self.steps_per_epoch:
                break
            loss_sum, correct = self.train_step(x, y, self.sampler.loss_scale(p.batch))
            p.loss += loss_sum
            p.correct += correct
            p.seen += len(y)
            p.batch += 1
            if every and self.step % every == 0 and p.batch < self.steps_per_epoch:
                self._gather_progress(p)
                if on_checkpoint is not None:
                    on_checkpoint()
                torch.manual_seed(checkpoint_seed(self.spec.seed, self.world.rank, self.step))
        self.progress = None
        self.scheduler.step()
        return self._mean_over_ranks(p.loss, p.correct, p.seen)

    def _gather_progress(self, p: EpochProgress) -> None:
        """Sum the epoch's partial sums over ranks onto rank 0 (the rank that checkpoints)."""
        if not self.world.distributed:
            return
        local = torch.stack([p.loss.double(), p.correct.double()])  # [2]
        count = torch.tensor([float(p.seen)], dtype=torch.float64, device=local.device)
        loss, correct, seen = all_sum(torch.cat([local, count]), self.world).tolist()
        mine = self.world.rank == 0
        p.loss.fill_(loss if mine else 0.0)
        p.correct.fill_(int(correct) if mine else 0)
        p.seen = int(seen) if mine else 0

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Batch]) -> tuple[float, float]:
        """Mean loss and accuracy over a whole split (each rank its shard, summed)."""
        self.model.eval()  # the plain module: ranks may run different numbers of batches
        broadcast_buffers(self.model, self.world)  # so with rank 0's normalization statistics
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        total_correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for x, y in loader:
            x, y = self._inputs(x), y.to(self.device)
            with self._autocast():
                logits = self.eval_net(x)
                loss, correct = loss_and_correct(logits.float(), y, reduction="sum")
            total_loss += loss
            total_correct += correct
            seen += len(y)
        mean_loss, accuracy = self._mean_over_ranks(total_loss, total_correct, seen)
        return mean_loss, accuracy

    def _mean_over_ranks(
        self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int
    ) -> tuple[float, float]:
        """(mean loss, accuracy) from this rank's sums and every other rank's: one host sync.

        Sets :attr:`last_count`, the number of samples the sums cover (all ranks).
        """
        local = torch.stack([loss_sum.double(), correct.double()])  # [2] on the device
        count = torch.tensor([float(seen)], dtype=torch.float64, device=local.device)
        loss, right, n = all_sum(torch.cat([local, count]), self.world).tolist()
        self.last_count = int(n)
        return loss / max(n, 1), right / max(n, 1)

    def run_epoch(
        self, progress: bool = False, on_checkpoint: Callable[[], None] | None = None
    ) -> Metrics:
        """Train one epoch, evaluate, and return the epoch's metrics."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, train_acc = self.train_epoch(progress, on_checkpoint)
        val_loss, val_acc = self.evaluate(self.val_loader)
        test_loss, test_acc = self.evaluate(self.test_loader)
        self.epoch += 1
        sp = self.sparsity
        metrics: Metrics = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "loss_gap": val_loss - train_loss,
            "density": density(sp.masks) if sp else 1.0,
            "itop": sp.itop.ratio() if sp else 1.0,
            "new_connections": int(self.new_connections),
            "epoch_time_s": time.perf_counter() - start,
        }
        metrics |= {f"removal_jaccard.{k}": v for k, v in self.removal_jaccard.items()}
        metrics |= {f"removal_jaccard_first.{k}": v for k, v in self.first_removal_jaccard.items()}
        metrics |= best_validation(self.history, metrics)
        self.history.append(metrics)
        return metrics

    def fit(
        self,
        on_epoch: Callable[[Metrics], None] | None = None,
        progress: bool = False,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> list[Metrics]:
        """Train from the current epoch to the last one, calling ``on_epoch`` after each
        (and ``on_checkpoint`` every ``checkpoint_every_steps`` steps inside an epoch)."""
        epochs = tqdm(
            range(self.epoch, self.config.epochs),
            initial=self.epoch,
            total=self.config.epochs,
            desc=self.spec.name or f"{self.spec.model}/{self.spec.dataset}",
            disable=not progress,
        )
        for _ in epochs:
            metrics = self.run_epoch(progress, on_checkpoint)
            epochs.set_postfix(
                loss=f"{metrics['train_loss']:.3f}", val_acc=f"{metrics['val_acc']:.3f}"
            )
            log.info("epoch %d: %s", self.epoch, metrics)
            if on_epoch is not None:
                on_epoch(metrics)
        return self.history

    @property
    def masks(self) -> Masks:
        """Current masks on the CPU (empty for a dense run)."""
        return {n: m.cpu().clone() for n, m in self.sparsity.masks.items()} if self.sparsity else {}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, LR schedule, masks, ITOP, counters,
        the mask generator and, inside an epoch, the epoch's progress. Rank 0's is the run's."""
        sp = self.sparsity
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "masks": self.masks,
            "itop": sp.itop.state_dict() if sp else {},
            "step": self.step,
            "epoch": self.epoch,
            "history": list(self.history),
            # the data order and dropout/augmentation draws are functions of (seed, rank,
            # epoch); the mask generator (random criterion and growth) is the only live stream
            "mask_rng": self.mask_generator.get_state(),
            "progress": self.progress.state_dict() if self.progress else None,
            "new_connections": int(self.new_connections),
            "removal_jaccard": (self.removal_jaccard, self.first_removal_jaccard),
            "removal_layers": self.first_removal_layers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this freshly built trainer."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        sp = self.sparsity
        if sp is not None:
            for name, m in state["masks"].items():
                sp.masks[name].copy_(m.to(self.device))
            sp.itop.load_state_dict(state["itop"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.history = list(state["history"])
        self.removal_jaccard, self.first_removal_jaccard = map(
            dict, state.get("removal_jaccard", ({}, {}))
        )
        self.first_removal_layers = dict(state.get("removal_layers", {}))
        self.mask_generator.set_state(state["mask_rng"])
        progress = state.get("progress")
        self.progress = EpochProgress.from_state(progress, self.device) if progress else None
        if self.progress is not None and self.world.rank != 0:
            # the saved sums are the whole world's (gathered onto rank 0 when it was saved)
            self.progress.loss.zero_()
            self.progress.correct.zero_()
            self.progress.seen = 0
        self.new_connections = self._count(state.get("new_connections", 0))
