"""Which k entries a topology update takes (Section 3.1): the k lowest keys, deterministically.

Pruning takes the k active weights with the lowest criterion scores (:func:`select_pruned`),
growth the k inactive ones with the lowest growth keys (:mod:`dst.growth`). Both break ties by
flat index, lowest first, so a selection is a function of the network state alone, the same on
any device. NaN ranks above +inf: positions a selection must not take (inactive weights when
pruning) are keyed NaN instead of being listed first.

On the CPU the selections find a threshold in O(n) with NumPy; on a GPU they sort, because
everything else there would wait for the device to count or list positions: with the sorts a
topology update only queues work. :class:`Segments` sorts all layers of a network at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dst.masks import num_active, true_indices


def _kth_smallest(values: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest (1-based) entry of a 1-D CPU tensor (NaN above every number).

    NumPy's introselect is about 20x faster than ``torch.topk`` or ``torch.kthvalue`` on
    millions of entries, and topology updates run over such layers. NumPy has no bfloat16:
    such values are widened to float32 first, which is exact.
    """
    if values.dtype == torch.bfloat16:
        values = values.float()
    return float(np.partition(values.detach().numpy(), k - 1)[k - 1])


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the ``k`` smallest of a 1-D tensor, ties to the lowest position.

    NaN ranks above +inf: a NaN position is taken only when fewer than k others exist. On the
    CPU: O(n), a selection for the threshold, then a scan, rather than a full sort. On a GPU,
    :func:`lowest_k_sorted`.
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if k >= len(values):
        return torch.arange(len(values), device=values.device)
    if values.device.type != "cpu":
        return lowest_k_sorted(values, k)
    kth = _kth_smallest(values, k)
    if math.isnan(kth):  # fewer than k numbers: all of them, then the first NaN positions
        chosen, tied = ~values.isnan(), true_indices(values.isnan())
    else:
        chosen = values <= kth  # [n], at least k True
        if num_active(chosen) == k:
            return true_indices(chosen)  # [k], ascending
        chosen = values < kth  # more ties at the threshold than places left: lowest first
        tied = true_indices(values == kth)  # [t], ascending
    chosen[tied[: k - num_active(chosen)]] = True
    return true_indices(chosen)  # [k], ascending


def lowest_k_sorted(values: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`lowest_k` by sorting, for GPUs: one stable radix sort, whose first k are exactly
    the k smallest (ties stay in position order, NaN last), then a sort of those k.

    Every shape is known in advance, so nothing waits for the device. (``torch.kthvalue``
    selects within one thread block per slice there: with it a ResNet-50 update took 300 ms on
    an H100, with this sort 140 ms.) On the CPU it is the reference the threshold selection is
    tested against.
    """
    first = torch.sort(values, stable=True).indices[:k]  # [k], the k smallest
    return torch.sort(first).values  # [k], ascending


def pruning_keys(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat keys whose k lowest are the k weights to prune: NaN scores (a diverged weight) as
    -inf, pruned first; inactive entries as NaN, never pruned while active ones remain."""
    keys = torch.nan_to_num(scores.detach().flatten(), -math.inf, math.inf, -math.inf)  # [n]
    return keys.masked_fill_(~mask.flatten(), math.nan)


def select_pruned(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (ascending) of the ``k`` active entries with the lowest scores.

    Ties go to the lowest flat index; NaN scores (a diverged weight) count as the lowest.
    Inactive entries are never chosen. On the CPU the active entries are listed and only they
    are ranked (a fifth of a layer at density 0.2); on a GPU, :func:`select_pruned_sorted`.
    """
    if mask.device.type != "cpu":
        return select_pruned_sorted(scores, mask, k)
    active_idx = true_indices(mask)  # [a]
    if k > len(active_idx):
        raise ValueError(f"cannot prune {k} weights: only {len(active_idx)} are active")
    s = scores.detach().flatten()[active_idx]  # [a], a copy
    s.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # NaN lowest, ±inf kept
    return active_idx[lowest_k(s, k)]


def select_pruned_sorted(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`select_pruned` for GPUs: listing the active entries would wait for the device,
    so every entry is ranked (:func:`pruning_keys`).

    The caller guarantees ``k`` <= the active count (counting here would wait as well);
    :func:`dst.topology.prune_count` of an active count does.
    """
    return lowest_k_sorted(pruning_keys(scores, mask), k)  # [k]


class Segments:
    """Consecutive segments (the flattened layers of a network, concatenated) of known sizes,
    and the k_l lowest keys of each segment l, all in one pass.

    Per layer, a selection on a GPU is a few sorts and some dozen small kernels; for the 54
    layers of ResNet-50 the host spends longer launching them than the GPU running them.
    Together they are two sorts of the concatenation: by key (stable, so ties keep position
    order), then, stably, by segment.
    """

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes, self.device = list(sizes), device
        self.starts = _exclusive_sums(self.sizes)
        ids = torch.arange(len(self.sizes), device=device)
        dtype = torch.int16 if len(self.sizes) <= 2**15 else torch.int32  # fewer radix passes
        total = sum(self.sizes)
        self.segment_of = torch.repeat_interleave(  # [N], each position's segment
            ids.to(dtype), _on(self.sizes, device), output_size=total
        )

    def lowest_k(self, keys: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
        """Positions in the concatenation (ascending) of the ``ks[l]`` lowest keys of each
        segment l, ties to the lowest position, NaN last: :func:`lowest_k_sorted` of every
        segment, offset by its start. ``keys`` is ``[N]``; nothing waits for a GPU."""
        if len(ks) != len(self.sizes):
            raise ValueError(f"need one k for each of {len(self.sizes)} segments, got {len(ks)}")
        if any(not 0 <= k <= n for k, n in zip(ks, self.sizes, strict=True)):
            raise ValueError(f"need 0 <= k <= size in every segment: k {ks}, sizes {self.sizes}")
        device, total = keys.device, sum(ks)
        order = torch.sort(keys, stable=True).indices  # [N], by key, ties by position
        order = order[torch.sort(self.segment_of[order], stable=True).indices]  # [N], by segment
        # segment l's first k_l sit at starts[l] .. starts[l] + k_l - 1 of the sorted order
        taken = _exclusive_sums(ks)
        skip = [start - before for start, before in zip(self.starts, taken, strict=True)]
        take = torch.repeat_interleave(_on(skip, device), _on(ks, device), output_size=total)
        take += torch.arange(total, device=device)  # [K]
        return torch.sort(order[take]).values  # [K], ascending: segment by segment

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[N]`` -> each segment's ``[n_l]`` view."""
        return flat.split(self.sizes)

    def local(self, positions: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Positions in the concatenation, ``ks[l]`` of them in segment l (what
        :meth:`lowest_k` returns) -> each segment's ``[k_l]`` positions within the segment."""
        starts = torch.repeat_interleave(
            _on(self.starts, positions.device), _on(ks, positions.device), output_size=sum(ks)
        )  # [K]
        return (positions - starts).split(list(ks))


def _exclusive_sums(values: Sequence[int]) -> list[int]:
    """[0, v0, v0 + v1, ...]: where each of consecutive runs of these lengths starts."""
    return [0, *np.cumsum(values)[:-1].tolist()] if values else []


def _on(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small int64 tensor on ``device`` without waiting for it (a plain copy to a GPU
    synchronizes: PyTorch waits for a copy from pageable memory unless told not to)."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
