"""Per-layer density distributions for sparse initialization (Section 3.1).

``uniform`` gives every layer the overall density D. ``er`` (Erdős-Rényi, Mocanu et al. 2018)
scales a layer's density as (n_in + n_out) / (n_in · n_out); ``erk`` (ER-Kernel, Evci et al.
2020) as (n_in + n_out + w + h) / (n_in · n_out · w · h). For both, a layer whose density
would exceed 1 is made dense and the remaining layers are rescaled, so that the overall density
is the requested D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from dst.registry import Registry

Shape = tuple[int, ...]  # (n_out, n_in) for Linear, (n_out, n_in, h, w) for Conv2d
RawFn = Callable[[Shape], float]

DISTRIBUTIONS: Registry[RawFn] = Registry("init")


@DISTRIBUTIONS.register("uniform")
def _uniform_raw(shape: Shape) -> float:
    return 1.0


@DISTRIBUTIONS.register("er")
def _er_raw(shape: Shape) -> float:
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


@DISTRIBUTIONS.register("erk")
def _erk_raw(shape: Shape) -> float:
    return sum(shape) / math.prod(shape)


def layer_densities(shapes: Mapping[str, Shape], density: float, method: str) -> dict[str, float]:
    """Per-layer densities d_l with sum_l d_l n_l = D · sum_l n_l.

    Iteratively: with the dense set fixed, solve for the scale ε of the sparse layers; if any
    ε · raw_l > 1, make the largest such layer dense and solve again.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    raw_fn = DISTRIBUTIONS.get(method)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: raw_fn(tuple(shape)) for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            return {name: 1.0 for name in shapes}
        free = budget - sum(sizes[name] for name in dense)
        eps = free / sum(raw[name] * sizes[name] for name in sparse)
        over = [name for name in sparse if eps * raw[name] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda name: raw[name]))
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
