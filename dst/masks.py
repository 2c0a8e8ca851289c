"""Binary masks over the prunable weights of a model (Section 3.1).

A mask is one boolean tensor per prunable weight: the ``weight`` of every ``nn.Linear`` and
``nn.Conv*`` layer. Biases and normalization layers stay dense. Densities are exact: a layer
of ``n`` weights at density ``d`` has ``round(d * n)`` active weights, never sampled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

Masks = dict[str, torch.Tensor]  # weight name -> bool tensor of the weight's shape
PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights that carry masks, by parameter name (``"features.0.weight"``), in model order."""
    weights: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_LAYERS):
            weights[f"{name}.weight" if name else "weight"] = module.weight  # type: ignore[assignment]
    return weights


def num_active(mask: torch.Tensor) -> int:
    """The number of True entries of a bool mask.

    On the CPU NumPy counts bytes about 30x faster than ``mask.sum()`` (which widens every bool
    to int64); topology updates count layers of millions of entries several times.
    """
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.detach().numpy()))
    return int(torch.count_nonzero(mask))


def active_counts(masks: Iterable[torch.Tensor]) -> list[int]:
    """:func:`num_active` of each mask, with one wait for each GPU rather than one per mask.

    A topology update needs every layer's count before it can choose anything; counted one
    layer at a time, a ResNet-50 update on a GPU waited for the device 54 times.
    """
    listed = list(masks)
    counts = {i: num_active(m) for i, m in enumerate(listed) if m.device.type == "cpu"}
    on_device: dict[torch.device, list[int]] = {}
    for i, m in enumerate(listed):
        if m.device.type != "cpu":
            on_device.setdefault(m.device, []).append(i)
    for positions in on_device.values():
        totals = torch.stack([torch.count_nonzero(listed[i]) for i in positions]).tolist()
        counts.update(zip(positions, totals, strict=True))
    return [counts[i] for i in range(len(listed))]


def true_indices(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (int64, ascending) of the True entries of a bool tensor.

    On the CPU NumPy finds them about 4x faster than ``torch.nonzero`` (5.2 vs 1.4 ms on a
    3M-entry layer); every topology update lists the active weights of every layer.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.detach().numpy()))
    return mask.flatten().nonzero().squeeze(1)


def active_count(density: float, size: int) -> int:
    """``round(density * size)`` (half up), but at least one weight so no layer is cut off."""
    return min(size, max(1, math.floor(density * size + 0.5)))


def random_mask(
    shape: torch.Size | tuple[int, ...], active: int, generator: torch.Generator
) -> torch.Tensor:
    """A bool mask with exactly ``active`` True entries at uniformly random positions."""
    size = math.prod(shape)
    flat = torch.zeros(size, dtype=torch.bool)
    flat[torch.randperm(size, generator=generator)[:active]] = True
    return flat.view(shape)


def init_masks(
    weights: dict[str, nn.Parameter], densities: dict[str, float], generator: torch.Generator
) -> Masks:
    """Random masks with the exact per-layer ``densities``, on each weight's device.

    The draws use only ``generator`` (CPU), so the same seed gives the same initial masks on any
    device and whatever pruning criterion will later be used (Appendix A.2).
    """
    return {
        name: random_mask(w.shape, active_count(densities[name], w.numel()), generator).to(w.device)
        for name, w in weights.items()
    }


@torch.no_grad()
def apply_masks(weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Zero every inactive weight in place (at initialization; during training
    :class:`dst.optimizers.MaskedSGD` keeps them zero inside every step)."""
    for name, w in weights.items():
        w.mul_(masks[name])


def density(masks: Masks) -> float:
    """Overall density D = sum_l d_l n_l / sum_l n_l of the masked weights (Section 3.1)."""
    active = sum(num_active(m) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return active / total if total else 1.0


def layer_densities(masks: Masks) -> dict[str, float]:
    """Per-layer density d_l = ||m_l||_0 / n_l."""
    return {name: num_active(m) / m.numel() for name, m in masks.items()}


def save_masks(masks: Masks, path: str | Path) -> None:
    """Write masks as a compressed ``.npz``: per layer, the packed bits and the shape."""
    arrays: dict[str, np.ndarray] = {}
    for name, m in masks.items():
        arrays[f"{name}::bits"] = np.packbits(m.detach().cpu().numpy().ravel())
        arrays[f"{name}::shape"] = np.asarray(m.shape, dtype=np.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def load_masks(path: str | Path) -> Masks:
    """Read masks written by :func:`save_masks` (bool tensors on the CPU)."""
    with np.load(path) as data:
        names = [key[: -len("::bits")] for key in data.files if key.endswith("::bits")]
        masks: Masks = {}
        for name in names:
            shape = tuple(int(s) for s in data[f"{name}::shape"])
            bits = np.unpackbits(data[f"{name}::bits"], count=math.prod(shape))
            masks[name] = torch.from_numpy(bits.astype(bool)).view(shape)
    return masks
