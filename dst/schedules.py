"""Prune-fraction schedules ρ_t and the update timetable (Section 3.1, Appendix A.2).

Topology updates happen every Δt steps (t = Δt, 2Δt, ...) while t < T. At step t a fraction
ρ_t of each layer's active weights is pruned (and as many grown back).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dst.registry import Registry

FractionFn = Callable[[float, int, int], float]  # (ρ, t, T) -> ρ_t

SCHEDULES: Registry[FractionFn] = Registry("schedule")


@SCHEDULES.register("cosine")
def cosine(rho: float, t: int, stop: int) -> float:
    """ρ_t = ½ ρ (1 + cos(tπ/T)), the paper's default."""
    return 0.5 * rho * (1.0 + math.cos(t * math.pi / stop))


@SCHEDULES.register("linear")
def linear(rho: float, t: int, stop: int) -> float:
    """ρ_t = ρ (1 - t/T)."""
    return rho * (1.0 - t / stop)


@SCHEDULES.register("constant")
def constant(rho: float, t: int, stop: int) -> float:
    """ρ_t = ρ."""
    return rho


@dataclass(frozen=True)
class PruneSchedule:
    """When to update the topology and which fraction of active weights to replace."""

    kind: str  # a name in SCHEDULES
    rho: float  # initial prune fraction ρ in (0, 1)
    period: int  # Δt >= 1, in optimizer steps
    stop: int  # T: no updates at or after this step

    def __post_init__(self) -> None:
        SCHEDULES.get(self.kind)
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"prune fraction ρ must be in (0, 1), got {self.rho}")
        if self.period < 1:
            raise ValueError(f"update period Δt must be >= 1, got {self.period}")
        if self.stop < 1:
            raise ValueError(f"stop step T must be >= 1, got {self.stop}")

    def fraction(self, step: int) -> float:
        """ρ_t at optimizer step ``step``."""
        return SCHEDULES.get(self.kind)(self.rho, step, self.stop)

    def is_update_step(self, step: int) -> bool:
        """True at t = Δt, 2Δt, ... while t < T."""
        return 0 < step < self.stop and step % self.period == 0
