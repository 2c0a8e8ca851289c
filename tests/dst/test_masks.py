"""Masks: exact densities, enforcement, compact save/load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dst.masks import (
    active_count,
    apply_masks,
    density,
    init_masks,
    layer_densities,
    load_masks,
    prunable_weights,
    save_masks,
)


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )


def test_only_conv_and_linear_weights_are_prunable() -> None:
    assert list(prunable_weights(net())) == ["0.weight", "3.weight"]


def test_active_count_is_round_half_up_and_never_zero() -> None:
    assert active_count(0.1, 1000) == 100
    assert active_count(0.25, 10) == 3  # 2.5 -> 3
    assert active_count(0.001, 10) == 1
    assert active_count(1.0, 7) == 7


def test_init_masks_have_exact_counts_and_are_seeded() -> None:
    weights = prunable_weights(net())
    dens = {"0.weight": 0.5, "3.weight": 0.1}
    a = init_masks(weights, dens, torch.Generator().manual_seed(0))
    b = init_masks(weights, dens, torch.Generator().manual_seed(0))
    assert int(a["0.weight"].sum()) == round(0.5 * 36)
    assert int(a["3.weight"].sum()) == round(0.1 * 1440)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert layer_densities(a)["0.weight"] == 0.5
    assert abs(density(a) - (18 + 144) / (36 + 1440)) < 1e-12


def test_apply_masks_zeroes_exactly_the_inactive_weights() -> None:
    weights = prunable_weights(net())
    masks = init_masks(weights, {n: 0.3 for n in weights}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in weights.values():
            w.fill_(1.0)
    apply_masks(weights, masks)
    for name, w in weights.items():
        assert torch.equal(w != 0, masks[name])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    weights = prunable_weights(net())
    masks = init_masks(weights, {n: 0.37 for n in weights}, torch.Generator().manual_seed(5))
    save_masks(masks, tmp_path / "m" / "masks.npz")
    loaded = load_masks(tmp_path / "m" / "masks.npz")
    assert loaded.keys() == masks.keys()
    for name in masks:
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], masks[name])


def test_saved_masks_use_packed_bits(tmp_path: Path) -> None:
    mask = torch.rand(1000, 1000, generator=torch.Generator().manual_seed(0)) < 0.5
    save_masks({"w": mask}, tmp_path / "big.npz")
    # one bit per weight (random bits do not compress): ~125 kB, not 1 MB of bools
    assert (tmp_path / "big.npz").stat().st_size < 130_000
    assert torch.equal(load_masks(tmp_path / "big.npz")["w"], mask)
