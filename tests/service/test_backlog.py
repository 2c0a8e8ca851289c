"""The job driver's backlogs: calls in order on one thread, bounded waits, pauses that end
with closing's time."""

from __future__ import annotations

import threading
import time

import pytest

from service.backlog import Backlog


def test_calls_run_in_order_and_a_failing_one_does_not_stop_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[int] = []
    backlog = Backlog("test-backlog")
    backlog.put(lambda: done.append(0))
    backlog.put(lambda: done.append(1 // 0))
    backlog.put(lambda: done.append(2))
    assert backlog.wait(timeout=10) and done == [0, 2]
    assert "test-backlog: a queued call failed" in caplog.text
    assert backlog.close(timeout=10)


def test_waiting_is_bounded_and_says_whether_the_calls_ended() -> None:
    release = threading.Event()
    backlog = Backlog("test-backlog")
    backlog.put(lambda: release.wait(20) and None)
    assert not backlog.wait(timeout=0.1)  # the call still runs
    release.set()
    assert backlog.wait(timeout=10)


def test_a_pause_ends_at_closings_time() -> None:
    """A retry's pause never outlasts closing: the call then sees it is overdue and stops."""
    seen: list[bool] = []
    backlog = Backlog("test-backlog")

    def retrying() -> None:
        seen.append(backlog.overdue())
        backlog.pause(30)  # a long pause between two tries
        seen.append(backlog.overdue())

    backlog.put(retrying)
    while not seen:  # the call has started
        time.sleep(0.01)
    started = time.monotonic()
    assert backlog.close(timeout=0.2, grace=5)
    assert time.monotonic() - started < 5 and seen == [False, True]


def test_a_pause_before_closing_sleeps_its_time() -> None:
    backlog = Backlog("test-backlog")
    started = time.monotonic()
    backlog.pause(0.2)
    assert time.monotonic() - started >= 0.2 and not backlog.overdue()
