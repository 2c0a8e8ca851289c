"""Where the per-step cost of DST goes: ways of keeping inactive weights at zero, side by side.

All variants train the same large-MLP on the same batch, interleaved in one process (each time
is the fastest of the rounds):
  dense            the dense model, plain SGD step
  sparse, no mask  the sparse model (90% zeros) with the same step: does sparsity itself cost?
  weight mask      the step, then weights *= mask (what dst.training does)
  gradient mask    grads *= mask before the step (enough for SGD when momentum is reset)
  grad hook        grads *= mask in a post-accumulate-grad hook, while the grad is hot

    uv run python -m benchmarks.mask_enforcement [--threads 1] [--rounds 7] [--steps 60]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.step_overhead import CIFAR10, make, timed
from dst.distributions import layer_densities
from dst.masks import apply_masks, init_masks, mask_factors, prunable_weights


def grad_masker(factor: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        assert param.grad is not None
        param.grad.mul_(factor)

    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, *CIFAR10.input_shape, generator=gen)  # [128, 3, 32, 32]
    y = torch.randint(0, 10, (128,), generator=gen)  # [128]

    models = {name: make("large-mlp", device) for name in ("dense", "sparse", "hooked")}
    factors = {}
    for name in ("sparse", "hooked"):
        weights = prunable_weights(models[name][0])
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        masks = init_masks(weights, layer_densities(shapes, args.density, "er"), gen)
        factors[name] = (weights, mask_factors(masks, weights))
        apply_masks(weights, factors[name][1])
    hooked_w, hooked_f = factors["hooked"]
    for n, w in hooked_w.items():
        w.register_post_accumulate_grad_hook(grad_masker(hooked_f[n]))

    def step(name: str, before_step: Callable[[], None] | None = None) -> None:
        model, opt = models[name]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()

    sparse_w, sparse_f = factors["sparse"]

    def weight_mask() -> None:
        step("sparse")
        apply_masks(sparse_w, sparse_f)

    def mask_grads() -> None:
        for n, w in sparse_w.items():
            w.grad.mul_(sparse_f[n])  # type: ignore[union-attr]

    variants: dict[str, Callable[[], None]] = {
        "dense": lambda: step("dense"),
        "sparse, no mask": lambda: step("sparse"),
        "weight mask": weight_mask,
        "gradient mask": lambda: step("sparse", mask_grads),
        "grad hook": lambda: step("hooked"),
    }
    for fn in variants.values():
        timed(fn, 3, device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, args.steps, device))
    dense = min(times["dense"])
    print(f"large-mlp batch=128 threads={args.threads} density={args.density}")
    for name, values in times.items():
        t = min(values)
        print(f"{name:<16} {t * 1e3:8.3f} ms   ratio {t / dense:.4f}")


if __name__ == "__main__":
    main()
