"""Counter-based integer hashing: random-looking numbers that are a pure function of a key.

Used where every process must agree on a draw without sharing a generator's state: the
tensor data path's per-sample augmentation (a function of run seed, epoch and sample index,
so any number of data-parallel workers, and a resume anywhere, draw the same) and the
cross-rank mask fingerprint of data-parallel training.

The hash is Wellons' lowbias32 (xor-shifts and two multiplications mod 2^32), in three
implementations that agree bit for bit: :func:`mix32` on tensors (on their device, for masks
that live on a GPU), :func:`mix32_np` on host arrays (for keys the host already holds: a few
microseconds for a batch, where a dozen tiny tensor ops would cost a millisecond) and
:func:`mix32_int` on single integers.
"""

from __future__ import annotations

import numpy as np
import torch

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_GOLDEN = 0x9E3779B9  # 2^32 / φ: spreads the rows of keyed draws


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of each element of ``x`` (int64, taken mod 2^32), in [0, 2^32), int64: in
    int64 arithmetic that cannot overflow (products are split into 16-bit halves)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``x`` in [0, 2^32): each partial product stays below 2^49."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32_np(x: np.ndarray) -> np.ndarray:
    """:func:`mix32` on the host: ``x`` as uint32 (taken mod 2^32), whose arithmetic wraps."""
    x = np.asarray(x).astype(np.uint32)  # a copy: the caller's array is left alone
    x ^= x >> np.uint32(16)
    x *= np.uint32(_M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_M2)
    x ^= x >> np.uint32(16)
    return x


def mix32_int(x: int) -> int:
    """:func:`mix32` of one Python integer (keys the host combines: no array overhead)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def combine(*keys: int) -> int:
    """One 32-bit key from several integers (each taken mod 2^32), order-sensitive."""
    h = 0
    for k in keys:
        h = mix32_int(h ^ (k & MASK32))
    return h


def keyed_uniforms(key: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` uniform draws in [0, 1) for each of ``indices`` [B] (a CPU int64 tensor),
    [count, B] float32 on the CPU: a function of (``key``, index, row) only.

    Each draw is the top 24 bits of a hash, exactly representable in float32 (never 1.0).
    """
    sample = mix32_np(indices.numpy() ^ np.uint32(key & MASK32))  # [B] uint32
    row_keys = np.array([combine(key, j, _GOLDEN) for j in range(count)], dtype=np.uint32)
    rows = mix32_np(sample[None, :] + row_keys[:, None])  # [count, B], one pass
    return torch.from_numpy((rows >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24))
