"""Uniform, ER and ERK layer densities with redistribution (Section 3.1)."""

from __future__ import annotations

import math

import pytest

from dst.distributions import layer_densities


def test_er_hand_worked_with_redistribution() -> None:
    # raw ER: (2+4)/8 = 0.75 and (50+100)/5000 = 0.03; at D = 0.5 the first layer would need
    # density 12 -> dense; the rest: 2504 - 8 = 2496 active of 5000 -> 0.4992.
    d = layer_densities({"a": (4, 2), "b": (100, 50)}, 0.5, "er")
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(0.4992)


def test_erk_uses_kernel_dimensions() -> None:
    shapes = {"conv": (16, 8, 3, 3), "fc": (10, 64)}
    d = layer_densities(shapes, 0.2, "erk")
    raw_conv = (16 + 8 + 3 + 3) / (16 * 8 * 9)
    raw_fc = (10 + 64) / 640
    eps = 0.2 * (1152 + 640) / (raw_conv * 1152 + raw_fc * 640)
    assert d["conv"] == pytest.approx(eps * raw_conv)
    assert d["fc"] == pytest.approx(eps * raw_fc)


def test_er_ignores_kernel_dimensions() -> None:
    d = layer_densities({"conv": (16, 8, 3, 3), "fc": (10, 64)}, 0.2, "er")
    ratio = ((16 + 8) / (16 * 8)) / ((10 + 64) / 640)
    assert d["conv"] / d["fc"] == pytest.approx(ratio)


@pytest.mark.parametrize("method", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
def test_overall_density_is_the_requested_one(method: str, density: float) -> None:
    shapes = {
        "c1": (32, 3, 3, 3),
        "c2": (64, 32, 3, 3),
        "c3": (128, 64, 3, 3),
        "fc": (10, 128),
    }
    d = layer_densities(shapes, density, method)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(d[n] * sizes[n] for n in shapes)
    assert total == pytest.approx(density * sum(sizes.values()))
    assert all(0 < v <= 1 for v in d.values())


def test_uniform_gives_every_layer_the_same_density() -> None:
    assert set(layer_densities({"a": (3, 4), "b": (5, 6)}, 0.3, "uniform").values()) == {0.3}


def test_bad_density_and_unknown_method() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        layer_densities({"a": (2, 2)}, 0.0, "er")
    with pytest.raises(ValueError, match="valid init names: uniform, er, erk"):
        layer_densities({"a": (2, 2)}, 0.5, "erdos")
