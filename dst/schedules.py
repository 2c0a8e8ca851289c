"""Prune-fraction schedules ρ_t and the update timetable (Section 3.1, Appendices A.2 and J).

Topology updates happen every Δt steps (t = Δt, 2Δt, ...) while t < T. At step t a fraction
ρ_t of each layer's active weights is pruned (and as many grown back). A schedule is a pure
function of the :class:`PruneSchedule` and the optimizer step t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dst.registry import Registry

FractionFn = Callable[["PruneSchedule", int], float]  # (schedule, t) -> ρ_t

SCHEDULES: Registry[FractionFn] = Registry("schedule")


@SCHEDULES.register("cosine")
def cosine(s: PruneSchedule, t: int) -> float:
    """ρ_t = ½ ρ (1 + cos(tπ/T)), the paper's default (Section 3.1)."""
    return 0.5 * s.rho * (1.0 + math.cos(t * math.pi / s.stop))


@SCHEDULES.register("linear")
def linear(s: PruneSchedule, t: int) -> float:
    """ρ_t = ρ · f^⌊t / I⌋: every I optimizer steps the rate is multiplied by f.

    Appendix J: "The linear schedule multiplies every 600 optimization steps the current decay
    rate by a constant factor (0.99)", so I = ``interval`` (600) and f = ``factor`` (0.99).
    """
    return s.rho * s.factor ** (t // s.interval)


@SCHEDULES.register("linear-to-zero")
def linear_to_zero(s: PruneSchedule, t: int) -> float:
    """ρ_t = ρ (1 - t/T): a straight line from ρ at t = 0 to zero at T."""
    return s.rho * (1.0 - t / s.stop)


@SCHEDULES.register("constant")
def constant(s: PruneSchedule, t: int) -> float:
    """ρ_t = ρ (Appendix J's constant schedule)."""
    return s.rho


@dataclass(frozen=True)
class PruneSchedule:
    """When to update the topology and which fraction of active weights to replace."""

    kind: str  # a name in SCHEDULES
    rho: float  # initial prune fraction ρ in (0, 1)
    period: int  # Δt >= 1, in optimizer steps
    stop: int  # T: no updates at or after this step
    interval: int = 600  # I of the linear schedule, in optimizer steps (Appendix J)
    factor: float = 0.99  # f of the linear schedule, in (0, 1] (Appendix J)

    def __post_init__(self) -> None:
        SCHEDULES.get(self.kind)
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"prune fraction ρ must be in (0, 1), got {self.rho}")
        if self.period < 1:
            raise ValueError(f"update period Δt must be >= 1, got {self.period}")
        if self.stop < 1:
            raise ValueError(f"stop step T must be >= 1, got {self.stop}")
        if self.interval < 1:
            raise ValueError(f"schedule interval must be >= 1, got {self.interval}")
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"schedule factor must be in (0, 1], got {self.factor}")

    def fraction(self, step: int) -> float:
        """ρ_t at optimizer step ``step``."""
        return SCHEDULES.get(self.kind)(self, step)

    def is_update_step(self, step: int) -> bool:
        """True at t = Δt, 2Δt, ... while t < T."""
        return 0 < step < self.stop and step % self.period == 0
