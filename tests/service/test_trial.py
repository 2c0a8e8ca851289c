"""The trial's own set-up on a Ray worker: its share of a GPU, and how it names its GPUs."""

from __future__ import annotations

import pytest
import torch

from service.trial import gpu_placement, keep_to_gpu_share


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
    ("workers", "shown"),
    [
        ([("a", ["0"])], "0"),  # a trial with a GPU (or a share of one) of its own
        ([("a", [])], ""),  # a CPU trial
        ([], ""),
        ([("a", ["2"]), ("a", ["3"])], "2,3"),  # two DDP workers on the trial's node
        ([("a", ["0"]), ("b", ["0"]), ("b", ["1"])], "0,b:0,b:1"),  # and on another host
        ([("b", ["0"]), ("b", ["1"])], "b:0,b:1"),  # all away from the trial's Tune process
        ([("a", []), ("a", [])], ""),  # CPU workers (gloo)
    ],
)
def test_a_trial_names_its_gpus_by_rank_and_the_hosts_other_than_its_node(
    workers: list[tuple[str, list[str]]], shown: str
) -> None:
    """The trial's ``node`` is "a", the host of its Tune process."""
    assert gpu_placement(workers, home="a") == shown
