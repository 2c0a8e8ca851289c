"""Where the per-step cost of DST goes: ways of keeping inactive weights at zero, side by side.

All variants train the same large-MLP on the same batch, in blocks shuffled every round in one
process. Per variant it prints the whole step (forward, backward, optimizer) and the optimizer
step alone, each as the fastest and the median block, and the ratios to dense:
  dense              the dense model, PyTorch's fused SGD
  sparse, no mask    the sparse model (90% zeros), same step: does sparsity itself cost?
  fused SGD + w*=m   fused SGD, then weights *= float mask (a separate pass over the weights)
  MaskedSGD native   the mask inside one C loop built for this CPU (dst.training's default here)
  MaskedSGD compiled the same update through torch.compile
  MaskedSGD eager    fused SGD, then weights and momentum masked (the no-compiler fallback)

The optimizer-step column is the less noisy one: forward and backward are the same work in every
variant, so the difference between variants is in the step.

    uv run python -m benchmarks.mask_enforcement [--threads 1] [--rounds 80] [--steps 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.step_overhead import CIFAR10, interleaved, make, optimizer, sparsify
from dst.masks import Masks, prunable_weights


class MaskAfterStep(torch.optim.SGD):
    """Fused SGD followed by a separate ``weights *= mask`` pass (float masks, cached)."""

    def __init__(self, model: nn.Module, masks: Masks) -> None:
        super().__init__(
            model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
        )
        weights = prunable_weights(model)
        self.masked: list[torch.Tensor] = [weights[n] for n in masks]
        self.factors = [m.to(weights[n].dtype) for n, m in masks.items()]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        super().step()
        torch._foreach_mul_(self.masked, self.factors)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, *CIFAR10.input_shape, generator=gen)  # [128, 3, 32, 32]
    y = torch.randint(0, 10, (128,), generator=gen)  # [128]

    def sparse_model() -> tuple[nn.Module, Masks]:
        model = make("large-mlp", device)
        return model, sparsify(model, args.density, torch.Generator().manual_seed(1))

    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    dense = make("large-mlp", device)
    variants["dense"] = (dense, optimizer(dense, None, "auto"))
    model, _ = sparse_model()
    variants["sparse, no mask"] = (model, optimizer(model, None, "auto"))
    model, masks = sparse_model()
    variants["fused SGD + w*=m"] = (model, MaskAfterStep(model, masks))
    model, masks = sparse_model()
    variants["MaskedSGD native"] = (model, optimizer(model, masks, "native"))
    model, masks = sparse_model()
    variants["MaskedSGD compiled"] = (model, optimizer(model, masks, "compiled"))
    model, masks = sparse_model()
    variants["MaskedSGD eager"] = (model, optimizer(model, masks, "eager"))

    step_times: dict[str, list[float]] = {name: [] for name in variants}

    def block(name: str, steps: int) -> float:
        """Mean seconds per whole step; records the mean optimizer-step time on the side."""
        model, opt = variants[name]
        in_step, start = 0.0, time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            before = time.perf_counter()
            opt.step()
            in_step += time.perf_counter() - before
        step_times[name].append(in_step / steps)
        return (time.perf_counter() - start) / steps

    for name in variants:  # warm-up (and compile)
        block(name, 3)
    step_times = {name: [] for name in variants}
    totals = interleaved(
        {name: functools.partial(block, name, args.steps) for name in variants}, args.rounds
    )

    print(
        f"large-mlp batch=128 threads={args.threads} density={args.density} "
        f"rounds={args.rounds} steps/block={args.steps}; ms, fastest / median block"
    )
    header = ("variant", "whole step", "ratio", "optimizer step", "+ vs dense")
    print(f"{header[0]:<20} {header[1]:>17} {header[2]:>13} {header[3]:>17} {header[4]:>15}")
    d_tot = (min(totals["dense"]), statistics.median(totals["dense"]))
    d_opt = (min(step_times["dense"]), statistics.median(step_times["dense"]))
    for name in variants:
        tot = (min(totals[name]), statistics.median(totals[name]))
        opt = (min(step_times[name]), statistics.median(step_times[name]))
        print(
            f"{name:<20} {tot[0] * 1e3:8.3f} {tot[1] * 1e3:8.3f} "
            f"{tot[0] / d_tot[0]:6.3f} {tot[1] / d_tot[1]:6.3f} "
            f"{opt[0] * 1e3:8.3f} {opt[1] * 1e3:8.3f} "
            f"{(opt[0] - d_opt[0]) * 1e3:+7.3f} {(opt[1] - d_opt[1]) * 1e3:+7.3f}"
        )


if __name__ == "__main__":
    main()
