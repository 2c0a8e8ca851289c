"""Prune-fraction schedules and the update timetable."""

from __future__ import annotations

import pytest

from dst.schedules import PruneSchedule


def test_cosine_values() -> None:
    s = PruneSchedule("cosine", 0.5, 100, 1000)
    assert s.fraction(0) == pytest.approx(0.5)
    assert s.fraction(500) == pytest.approx(0.25)
    assert s.fraction(250) == pytest.approx(0.25 * (1 + 2**-0.5))
    assert s.fraction(1000) == pytest.approx(0.0)


def test_linear_multiplies_by_the_factor_every_interval() -> None:
    """Appendix J: every 600 steps the current rate is multiplied by 0.99."""
    s = PruneSchedule("linear", 0.5, 800, 10**6)
    assert (s.interval, s.factor) == (600, 0.99)
    assert s.fraction(0) == 0.5
    assert s.fraction(599) == 0.5
    assert s.fraction(600) == pytest.approx(0.495)
    assert s.fraction(1199) == pytest.approx(0.495)
    assert s.fraction(1200) == pytest.approx(0.49005)
    assert s.fraction(6000) == pytest.approx(0.5 * 0.99**10)  # 0.452190...
    assert s.fraction(6000) == pytest.approx(0.4521910)


def test_linear_interval_and_factor_are_configurable() -> None:
    s = PruneSchedule("linear", 0.4, 10, 100, interval=25, factor=0.5)
    assert [s.fraction(t) for t in (0, 24, 25, 50, 99)] == [0.4, 0.4, 0.2, 0.1, 0.05]
    assert PruneSchedule("linear", 0.4, 10, 100, factor=1.0).fraction(10**6) == 0.4


def test_linear_to_zero_and_constant() -> None:
    assert PruneSchedule("linear-to-zero", 0.4, 10, 100).fraction(25) == pytest.approx(0.3)
    assert PruneSchedule("constant", 0.4, 10, 100).fraction(99) == 0.4


def test_updates_every_period_until_stop() -> None:
    s = PruneSchedule("cosine", 0.5, 800, 3000)
    steps = [t for t in range(0, 5000) if s.is_update_step(t)]
    assert steps == [800, 1600, 2400]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 0.0}, "prune fraction"),
        ({"rho": 1.0}, "prune fraction"),
        ({"period": 0}, "update period"),
        ({"kind": "exp"}, "valid schedule names: cosine, linear, linear-to-zero, constant"),
        ({"interval": 0}, "schedule interval"),
        ({"factor": 0.0}, "schedule factor"),
        ({"factor": 1.01}, "schedule factor"),
    ],
)
def test_rejects_bad_values(kwargs: dict, message: str) -> None:
    args = {"kind": "cosine", "rho": 0.5, "period": 10, "stop": 100} | kwargs
    with pytest.raises(ValueError, match=message):
        PruneSchedule(**args)
