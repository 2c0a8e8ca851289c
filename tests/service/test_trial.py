"""The trial's own set-up on a Ray worker: its share of a GPU, and how it names its GPUs."""

from __future__ import annotations

import pytest
import torch

from service.trial import GPUS, NODE, keep_to_gpu_share, placement


@pytest.mark.parametrize(
    ("gpus", "cuda", "capped"),
    [
        (0.25, True, [(0.25, 0)]),  # a quarter of the GPU: a quarter of its memory
        (0.5, True, [(0.5, 0)]),
        (1.0, True, []),  # a whole GPU (or several workers' GPUs): no cap
        (0.0, True, []),  # a CPU trial
        (0.5, False, []),  # no CUDA in this process: nothing to cap
    ],
)
def test_a_trial_keeps_to_its_share_of_the_gpu(
    monkeypatch: pytest.MonkeyPatch, gpus: float, cuda: bool, capped: list[tuple[float, int]]
) -> None:
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: calls.append((f, d))
    )
    keep_to_gpu_share(gpus)
    assert calls == capped


@pytest.mark.parametrize(
    ("workers", "node", "gpus"),
    [
        ([("a", ["0"])], "a", "0"),  # a trial with a GPU (or a share of one) of its own
        ([("a", [])], "a", ""),  # a CPU trial
        ([("a", ["2"]), ("a", ["3"])], "a", "2,3"),  # two DDP workers on one host
        ([("a", ["0"]), ("b", ["0"]), ("b", ["1"])], "a,b", "a:0,b:0,b:1"),  # on two hosts
        ([("b", ["1"]), ("a", ["0"]), ("b", ["0"])], "b,a", "b:1,a:0,b:0"),  # rank order
        ([("a", []), ("b", [])], "a,b", ""),  # CPU workers (gloo) on two hosts
    ],
)
def test_a_trial_names_its_hosts_and_its_gpus_in_rank_order(
    workers: list[tuple[str, list[str]]], node: str, gpus: str
) -> None:
    assert placement(workers) == {NODE: node, GPUS: gpus}
