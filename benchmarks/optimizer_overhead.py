"""The host's time in one MaskedSGD step, per kernel, with and without masks, side by side.

On a GPU a short training step is paced by the host: whatever Python and launches the
optimizer adds per step is added to the step. This measures that cost alone, on tensors so
small that their arithmetic is negligible, laid out as ResNet-50's parameters are (54 masked
weights, 107 unmasked biases and normalization parameters). On ``--device cuda`` it includes
the kernel launches.

    uv run python -m benchmarks.optimizer_overhead [--device cpu] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from benchmarks.step_overhead import sync, timed
from dst.kernels import KernelUnavailableError
from dst.optimizers import KERNELS, MaskedSGD

MASKED, UNMASKED = 54, 107  # ResNet-50: conv and fc weights; BN weights and biases, fc bias


def parameters(device: torch.device) -> tuple[list[nn.Parameter], dict[nn.Parameter, torch.Tensor]]:
    """Tiny parameters in ResNet-50's numbers, 20 %-dense masks on the weights, gradients set."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 8, generator=gen).to(device)) for _ in range(MASKED)]
    params += [nn.Parameter(torch.randn(8, generator=gen).to(device)) for _ in range(UNMASKED)]
    masks = {p: (torch.rand(p.shape, generator=gen) < 0.2).to(device) for p in params[:MASKED]}
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params, masks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"MaskedSGD step on {device}: {MASKED} masked and {UNMASKED} unmasked tiny tensors")
    for kernel in KERNELS:
        times = {}
        for label, with_masks in (("dense", False), ("masked", True)):
            params, masks = parameters(device)
            try:
                opt = MaskedSGD(params, lr=0.1, masks=masks if with_masks else None, kernel=kernel)
                opt.step()  # the first step builds what the kernel needs
            except KernelUnavailableError as error:  # a kernel this machine cannot run
                print(f"{kernel:<9} unavailable: {type(error).__name__}: {error}")
                break
            sync(device)
            rounds = [timed(opt.step, args.steps, device) for _ in range(args.rounds)]
            times[label] = statistics.median(rounds) * 1e3
        if len(times) == 2:
            print(
                f"{kernel:<9} dense {times['dense']:.3f} ms  masked {times['masked']:.3f} ms  "
                f"masks add {times['masked'] - times['dense']:+.3f} ms"
            )


if __name__ == "__main__":
    main()
