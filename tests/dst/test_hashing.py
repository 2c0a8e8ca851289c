"""Counter-based hashing: the tensor and host hashes are lowbias32, and keyed draws are
uniform and a function of their key alone."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from dst.hashing import combine, keyed_uniforms, mix32, mix32_int, mix32_np


def lowbias32(v: int) -> int:
    """The hash written out on Python integers."""
    v &= 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def test_the_tensor_array_and_integer_hashes_are_lowbias32() -> None:
    values = [0, 1, 2, 3, 65_535, 65_536, 2_359_295, 123_456_789, 2**32 - 1, 2**32 + 5]
    expected = [lowbias32(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == expected
    assert mix32_np(np.array(values, dtype=np.int64)).tolist() == expected
    assert [mix32_int(v) for v in values] == expected
    assert expected[1:4] == [1_753_845_952, 3_507_691_905, 1_408_362_973]


def test_combined_keys_depend_on_every_key_and_their_order() -> None:
    assert combine(3, 4) == combine(3, 4)
    assert len({combine(3, 4), combine(4, 3), combine(3, 5), combine(3), combine(3, 4, 0)}) == 5


def test_keyed_draws_depend_on_key_and_index_only() -> None:
    idx = torch.tensor([5, 9, 2, 7])
    draws = keyed_uniforms(11, idx, 3)  # [3, 4]
    assert draws.shape == (3, 4) and draws.dtype == torch.float32
    assert torch.equal(keyed_uniforms(11, idx[[2, 0]], 3), draws[:, [2, 0]])  # any batching
    assert not torch.equal(keyed_uniforms(12, idx, 3), draws)
    assert len(set(draws.flatten().tolist())) == 12  # rows differ from each other


def test_keyed_draws_are_uniform_and_below_one() -> None:
    draws = keyed_uniforms(3, torch.arange(90_000), 2)  # [2, N]
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    for row in draws:
        counts = torch.bincount((row * 9).long(), minlength=9)  # 10,000 expected per bin
        assert chisquare(counts.tolist()).pvalue > 0.001
    pairs = torch.bincount((draws[0] * 3).long() * 3 + (draws[1] * 3).long(), minlength=9)
    assert chisquare(pairs.tolist()).pvalue > 0.001  # the rows are independent


def test_negative_and_wide_keys_hash_alike_everywhere() -> None:
    """Every implementation takes its input mod 2^32 (two's complement for negatives)."""
    values = [-1, -(2**31), -123_456_789, 2**32, 2**40 + 17, 2**62]
    expected = [lowbias32(v % 2**32) for v in values]
    assert mix32(torch.tensor(values)).tolist() == expected
    assert mix32_np(np.array(values, dtype=np.int64)).tolist() == expected
    assert [mix32_int(v) for v in values] == expected
    assert combine(-1) == combine(2**32 - 1)
