"""Prune-and-grow invariants: exact density, zero-initialized growth, reset momentum."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dst.criteria import CRITERIA, resolve_criterion
from dst.growth import GROWTH
from dst.masks import apply_masks, init_masks, prunable_weights
from dst.schedules import PruneSchedule
from dst.topology import TopologyUpdater


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


def updater(criterion: str, growth: str, scope: str = "local", rho: float = 0.5) -> TopologyUpdater:
    return TopologyUpdater(
        resolve_criterion(criterion),
        GROWTH.get(growth),
        PruneSchedule("constant", rho, 1, 10_000),
        scope,  # type: ignore[arg-type]
        torch.Generator().manual_seed(0),
    )


def setup(density: float = 0.3) -> tuple[nn.Module, dict, dict, torch.optim.Optimizer]:
    model = mlp()
    weights = prunable_weights(model)
    masks = init_masks(weights, {n: density for n in weights}, torch.Generator().manual_seed(1))
    apply_masks(weights, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return model, weights, masks, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    ("criterion", "growth", "scope"),
    list(itertools.product(CRITERIA.names(), GROWTH.names(), ["local", "global"])),
)
def test_exact_density_after_many_updates(criterion: str, growth: str, scope: str) -> None:
    model, weights, masks, opt = setup()
    counts = {n: int(m.sum()) for n, m in masks.items()}
    up = updater(criterion, growth, scope)
    for step in range(1, 31):
        train_step(model, opt, step)
        changes = up.update(weights, masks, opt, step)
        for change in changes.values():
            assert len(change.pruned) == len(change.grown)
        opt.step()
        apply_masks(weights, masks)
        assert {n: int(m.sum()) for n, m in masks.items()} == counts
        for name, w in weights.items():
            assert not w[~masks[name]].any()


def test_grown_weights_start_at_zero_with_reset_momentum() -> None:
    model, weights, masks, opt = setup()
    for step in range(3):  # build up momentum everywhere (dense gradients)
        train_step(model, opt, step)
        opt.step()
        apply_masks(weights, masks)
    before = {n: m.clone() for n, m in masks.items()}
    train_step(model, opt, 99)
    changes = updater("magnitude", "random").update(weights, masks, opt, 1)
    for name, w in weights.items():
        grown = changes[name].grown
        newly = grown[~before[name].flatten()[grown]]
        assert len(newly) > 0
        assert not w.detach().flatten()[grown].any()
        assert not opt.state[w]["momentum_buffer"].flatten()[grown].any()
        assert masks[name].flatten()[grown].all()


def test_gradient_growth_picks_the_largest_inactive_gradients() -> None:
    w = nn.Parameter(torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.7, 0.1, 0.0, 0.0]]))
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    w.grad = torch.tensor([[9.0, 9.0, 0.5, 3.0], [9.0, 9.0, 2.0, 1.0]])
    up = updater("magnitude", "gradient", rho=0.25)  # prune 1 of 4 active: 0.1 at (1, 1)
    changes = up.update({"w": w}, {"w": mask}, None, 1)["w"]
    assert changes.pruned.tolist() == [5]
    # inactive after pruning: 2, 3, 5, 6, 7 with |g| 0.5, 3, 9, 2, 1 -> the largest is 5
    assert changes.grown.tolist() == [5]
    up2 = updater("magnitude", "gradient", rho=0.5)  # prune 2: 0.1 (5) and 0.7 (4)
    mask2 = torch.tensor([[True, True, False, False], [True, True, False, False]])
    w.grad = torch.tensor([[9.0, 9.0, 0.5, 3.0], [0.0, 0.0, 2.0, 1.0]])
    changes2 = up2.update({"w": w}, {"w": mask2}, None, 1)["w"]
    assert set(changes2.pruned.tolist()) == {4, 5}
    assert changes2.grown.tolist() == [3, 6]


def test_random_growth_is_uniform_over_inactive_positions() -> None:
    mask = torch.zeros(100, dtype=torch.bool)
    mask[:10] = True
    hits = torch.zeros(100)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        hits[GROWTH.get("random").select(None, mask, 9, gen)] += 1
    assert hits[:10].sum() == 0
    assert hits[10:].min() > 120 and hits[10:].max() < 290  # expectation 200


def test_global_scope_uses_one_threshold_across_layers() -> None:
    small = nn.Parameter(torch.full((4, 4), 0.01))
    large = nn.Parameter(torch.full((4, 4), 1.0))
    weights = {"small": small, "large": large}
    masks = {n: torch.ones(4, 4, dtype=torch.bool) for n in weights}
    up = updater("magnitude", "random", scope="global", rho=0.25)
    sets = up.prune_sets(weights, masks, 0.25)
    assert len(sets["small"]) == 8 and len(sets["large"]) == 0
    local = updater("magnitude", "random", scope="local", rho=0.25)
    sets = local.prune_sets(weights, masks, 0.25)
    assert len(sets["small"]) == 4 and len(sets["large"]) == 4


def test_prune_count_is_fraction_of_active_weights() -> None:
    _, weights, masks, _ = setup(0.5)
    sets = updater("magnitude", "random").prune_sets(weights, masks, 0.2)
    for name, idx in sets.items():
        assert len(idx) == round(0.2 * int(masks[name].sum()))
