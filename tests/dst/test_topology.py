"""Prune-and-grow invariants: exact density, zero-initialized growth, reset momentum."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from dst.criteria import CRITERIA, resolve_criterion
from dst.distributions import layer_densities
from dst.growth import GROWTH
from dst.masks import apply_masks, init_masks, prunable_weights, true_indices
from dst.optimizers import MaskedSGD
from dst.schedules import PruneSchedule
from dst.topology import TopologyUpdater, optimizer_state, per_layer


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
    """Local scope keeps every layer's active count; global scope keeps the total."""
    model, weights, masks, opt = setup()
    counts = {n: int(m.sum()) for n, m in masks.items()}
    up = updater(criterion, growth, scope)
    for step in range(1, 31):
        train_step(model, opt, step)
        before = {n: set(true_indices(m.flatten()).tolist()) for n, m in masks.items()}
        changes = up.update(weights, masks, opt, step)
        for name, change in changes.items():
            if scope == "local":
                assert len(change.pruned) == len(change.grown)
            # "new" connections are exactly grown \ old mask
            assert set(change.new.tolist()) == set(change.grown.tolist()) - before[name]
        assert sum(len(c.pruned) for c in changes.values()) == sum(
            len(c.grown) for c in changes.values()
        )
        opt.step()
        apply_masks(weights, masks)
        now = {n: int(m.sum()) for n, m in masks.items()}
        assert (now if scope == "local" else sum(now.values())) == (
            counts if scope == "local" else sum(counts.values())
        )
        assert up.active_counts(masks) == now  # the counts it remembers are the true ones
        for name, w in weights.items():
            assert not w[~masks[name]].any()


def deep_mlp() -> nn.Module:
    """Six layers of different sizes: ties (zero gradients of dead units), and k = 0 layers."""
    torch.manual_seed(0)
    widths = [20, 40, 3, 30, 50, 2, 10]
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_an_update_of_all_layers_at_once_is_the_update_layer_by_layer(criterion: str) -> None:
    """What a GPU runs (all layers at once) changes exactly what the CPU's layer-by-layer
    update changes: masks, weights, momentum and the reported changes, over a short run."""
    runs = []
    for together in (False, True):
        model = deep_mlp()
        weights = prunable_weights(model)
        masks = init_masks(weights, {n: 0.3 for n in weights}, torch.Generator().manual_seed(1))
        apply_masks(weights, masks)
        # plain SGD: momentum off the masks is not zero, so resetting it is seen
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        up = TopologyUpdater(
            resolve_criterion(criterion),
            GROWTH.get("gradient"),
            PruneSchedule("cosine", 0.5, 1, 12),
            "local",
            torch.Generator().manual_seed(3),
            together=together,
        )
        changes = []
        for step in range(1, 9):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 2, (16,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            change = up.update(weights, masks, opt, step)
            after = [w.detach().clone() for w in weights.values()]  # before the optimizer's
            after += [t.clone() for w in weights.values() for t in optimizer_state(opt, w)]
            changes.append((change, after))
            opt.step()
            apply_masks(weights, masks)
        momentum = [opt.state[w]["momentum_buffer"].clone() for w in weights.values()]
        runs.append((masks, [w.detach().clone() for w in weights.values()], momentum, changes))
    (masks_a, weights_a, momentum_a, changes_a), (masks_b, weights_b, momentum_b, changes_b) = runs
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(momentum_a, momentum_b, strict=True))
    for (step_a, after_a), (step_b, after_b) in zip(changes_a, changes_b, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(after_a, after_b, strict=True))
        for name, a in step_a.items():
            b = step_b[name]
            assert torch.equal(a.pruned, b.pruned) and torch.equal(a.grown, b.grown), name
            assert torch.equal(a.is_new, b.is_new), name


def test_all_layers_at_once_needs_a_local_scope_and_a_ranking_growth() -> None:
    args = (resolve_criterion("magnitude"), PruneSchedule("constant", 0.3, 1, 10))
    gen = torch.Generator()
    with pytest.raises(ValueError, match="scope 'local' and a growth that ranks"):
        TopologyUpdater(args[0], GROWTH.get("random"), args[1], "local", gen, together=True)
    with pytest.raises(ValueError, match="scope 'local' and a growth that ranks"):
        TopologyUpdater(args[0], GROWTH.get("gradient"), args[1], "global", gen, together=True)


def test_new_weights_start_at_zero_with_reset_momentum() -> None:
    model, weights, masks, opt = setup()
    for step in range(3):  # build up momentum everywhere (dense gradients)
        train_step(model, opt, step)
        opt.step()
        apply_masks(weights, masks)
    before = {n: m.clone() for n, m in masks.items()}
    train_step(model, opt, 99)
    changes = updater("magnitude", "random").update(weights, masks, opt, 1)
    for name, w in weights.items():
        new = changes[name].new
        assert len(new) > 0
        assert not before[name].flatten()[new].any()
        assert not w.detach().flatten()[new].any()
        assert not opt.state[w]["momentum_buffer"].flatten()[new].any()
        assert masks[name].flatten()[changes[name].grown].all()


def test_a_weight_pruned_and_regrown_at_once_keeps_its_value_and_momentum() -> None:
    """Hand-worked 4x4 case: magnitude prunes the two smallest active weights (flat 5: 0.1
    and 9: 0.3); gradient growth then takes the two largest |∇θ| among inactive positions,
    5 (just pruned, 9.0) and 7 (inactive before, 5.0). 5 keeps 0.1 and its momentum; 7 is
    new, at zero with zero momentum; 9 is pruned for good."""
    w = nn.Parameter(
        torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.7, 0.1, 0.0, 0.0], [0.5, 0.3, 0.0, 0.0], [0.0] * 4])
    )
    mask = w.detach() != 0  # active: 0, 1, 4, 5, 8, 9
    w.grad = torch.full((4, 4), 0.5)
    w.grad.view(-1)[5], w.grad.view(-1)[7], w.grad.view(-1)[9] = 9.0, 5.0, 0.2
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.where(mask, 0.25, 0.0)
    changes = updater("magnitude", "gradient", rho=1 / 3).update({"w": w}, {"w": mask}, opt, 1)
    change = changes["w"]
    assert sorted(change.pruned.tolist()) == [5, 9]
    assert sorted(change.grown.tolist()) == [5, 7]
    assert change.new.tolist() == [7]
    flat_w, flat_m = w.detach().view(-1), opt.state[w]["momentum_buffer"].view(-1)
    assert flat_w[5] == pytest.approx(0.1) and flat_m[5] == 0.25  # kept
    assert flat_w[7] == 0.0 and flat_m[7] == 0.0  # new
    assert flat_w[9] == 0.0 and not mask.view(-1)[9]  # pruned
    assert mask.view(-1).nonzero().flatten().tolist() == [0, 1, 4, 5, 7, 8]
    assert [flat_w[i].item() for i in (0, 1, 4, 8)] == pytest.approx([0.9, 0.8, 0.7, 0.5])


def dense_output_mlp() -> tuple[nn.Module, dict, dict]:
    """An MLP whose ER distribution at density 0.3 makes the output layer fully dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    model.append(nn.Linear(128, 4))
    weights = prunable_weights(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    densities = layer_densities(shapes, 0.3, "er")
    assert densities["4.weight"] == 1.0 and densities["0.weight"] < 1.0
    masks = init_masks(weights, densities, torch.Generator().manual_seed(1))
    apply_masks(weights, masks)
    return model, weights, masks


def trained_dense_output_mlp(update: tuple[str, str] | None) -> tuple[dict, dict, MaskedSGD]:
    """Three MaskedSGD steps, a fourth backward, an optional topology update, the fourth step."""
    model, weights, masks = dense_output_mlp()
    opt = MaskedSGD(
        model.parameters(), lr=0.05, momentum=0.9, masks={weights[n]: m for n, m in masks.items()}
    )
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 3 and update is not None:
            changes = updater(*update, rho=0.3).update(weights, masks, opt, 1)
            assert len(changes["4.weight"].pruned) > 0 and len(changes["4.weight"].new) == 0
            assert len(changes["0.weight"].new) > 0  # the sparse layers did change
        opt.step()
    return weights, masks, opt


@pytest.mark.parametrize(
    ("criterion", "growth"), list(itertools.product(CRITERIA.names(), GROWTH.names()))
)
def test_a_fully_dense_layer_is_bit_identical_after_an_update(criterion: str, growth: str) -> None:
    """In a dense layer every pruned weight is the only candidate for growth, so an update
    must leave its weights, mask and momentum exactly as a run without the update has them."""
    ref_weights, _, ref_opt = trained_dense_output_mlp(None)
    weights, masks, opt = trained_dense_output_mlp((criterion, growth))
    assert masks["4.weight"].all()
    w, ref = weights["4.weight"], ref_weights["4.weight"]
    assert torch.equal(w.detach(), ref.detach())
    assert torch.equal(opt.state[w]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"])


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


def test_gradient_growth_takes_nan_gradients_last_and_active_positions_never() -> None:
    mask = torch.tensor([True, False, True, False, False, True])
    grad = torch.tensor([9.0, math.nan, 9.0, 1.0, math.nan, 9.0])
    grow = GROWTH.get("gradient").select
    gen = torch.Generator()
    assert grow(grad, mask, 1, gen).tolist() == [3]
    assert grow(grad, mask, 3, gen).tolist() == [1, 3, 4]  # never the active 9s


def test_an_update_reports_which_grown_weights_are_new() -> None:
    w = nn.Parameter(torch.tensor([0.5, 0.1, 0.0, 0.0]))
    w.grad = torch.tensor([0.0, 5.0, 1.0, 2.0])  # 0.1 is pruned, then regrown (|g| = 5)
    mask = torch.tensor([True, True, False, False])
    change = updater("magnitude", "gradient", rho=0.5).update({"w": w}, {"w": mask}, None, 1)
    assert change["w"].pruned.tolist() == [1] and change["w"].grown.tolist() == [1]
    assert change["w"].is_new.tolist() == [False] and change["w"].new.tolist() == []
    assert w.tolist() == pytest.approx([0.5, 0.1, 0.0, 0.0])  # kept its value


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


def test_global_scope_grows_where_the_network_ranks_highest() -> None:
    """Appendix I: global pruning may change each layer's density. Magnitude pruning at
    ρ = 1/4 of the 24 active weights takes the 6 smallest, all in ``small`` (0.01 against
    1.0); gradient growth then takes the 6 largest inactive |∇θ| in the network, all in
    ``large`` (5.0 against 0.1): ``small`` goes from 16 to 10 active, ``large`` from 8 to 14."""
    small = nn.Parameter(torch.full((4, 4), 0.01))
    large = nn.Parameter(torch.full((4, 4), 1.0))
    weights = {"small": small, "large": large}
    masks = {
        "small": torch.ones(4, 4, dtype=torch.bool),
        "large": torch.ones(4, 4, dtype=torch.bool),
    }
    masks["large"].view(-1)[8:] = False
    with torch.no_grad():
        large.view(-1)[8:] = 0
    small.grad = torch.full((4, 4), 0.1)
    large.grad = torch.full((4, 4), 5.0)
    opt = torch.optim.SGD([small, large], lr=0.1, momentum=0.9)
    opt.state[large]["momentum_buffer"] = torch.ones(4, 4)
    changes = updater("magnitude", "gradient", scope="global", rho=0.25).update(
        weights, masks, opt, 1
    )
    assert [int(m.sum()) for m in masks.values()] == [10, 14]
    assert changes["small"].pruned.tolist() == [0, 1, 2, 3, 4, 5]  # ties: lowest index
    assert changes["small"].grown.tolist() == [] and changes["large"].pruned.tolist() == []
    assert changes["large"].grown.tolist() == [8, 9, 10, 11, 12, 13]
    assert not small.view(-1)[:6].any() and not large.view(-1)[8:].any()  # new start at 0
    buf = opt.state[large]["momentum_buffer"].view(-1)
    assert not buf[8:14].any() and buf[:8].eq(1).all()  # new momentum reset, the rest kept


def test_the_updater_counts_again_after_someone_else_edits_a_mask() -> None:
    """Counts are remembered across updates (they never change), not across outside edits."""
    _, weights, masks, _ = setup(0.5)
    up = updater("magnitude", "random")
    for w in weights.values():
        w.grad = torch.randn_like(w)
    up.update(weights, masks, None, 1)
    name = next(iter(masks))
    masks[name].view(-1)[true_indices(~masks[name])[:100]] = True  # in place: 100 more
    assert len(up.prune_sets(weights, masks, 0.2)[name]) == round(0.2 * int(masks[name].sum()))
    fresh = {n: m.clone() for n, m in masks.items()}  # new tensors, perhaps equal versions
    fresh[name].view(-1)[true_indices(fresh[name])[:50]] = False
    assert len(up.prune_sets(weights, fresh, 0.2)[name]) == round(0.2 * int(fresh[name].sum()))


def test_prune_count_is_fraction_of_active_weights() -> None:
    _, weights, masks, _ = setup(0.5)
    sets = updater("magnitude", "random").prune_sets(weights, masks, 0.2)
    for name, idx in sets.items():
        assert len(idx) == round(0.2 * int(masks[name].sum()))


def test_indices_into_the_concatenation_split_into_each_layers_own() -> None:
    """Layers of 3, 4, 5 and 2 weights start at 0, 3, 7 and 12."""
    chosen = torch.tensor([7, 0, 3, 9, 4])
    shares = per_layer(chosen, [3, 4, 5, 2])
    assert [s.tolist() for s in shares] == [[0], [0, 1], [0, 2], []]
