"""Readiness (runs in the API process): are the database, the Ray Jobs API and the MLflow
server reachable, answered within a deadline however slow they are.

Each check runs on a small thread pool, all at once, and ``/readyz`` waits at most
:attr:`ReadinessProbe.deadline_s` for them: a check that has not answered by then counts as
not ready. A check still under way (a blackholed host holds it for the client's own timeout)
is not started again: the next probe waits on the same call, so a probe every second against
a hung dependency never piles up threads or queued calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from sqlalchemy import text

from service.lifecycle import Services

Check = Callable[[], bool]


class ReadinessProbe:
    """The readiness checks of one API process."""

    def __init__(self, services: Services, deadline_s: float = 3.0) -> None:
        self.deadline_s = deadline_s
        self.checks: dict[str, Check] = {
            "database": lambda: _database_answers(services),
            "ray": services.executor.ping,
            "mlflow": services.tracker.ping,
        }
        self._pool: ThreadPoolExecutor | None = None  # made on first use
        self._running: dict[str, Future[bool]] = {}
        self._closed = False
        self._lock = threading.Lock()

    def check(self, skip: frozenset[str] = frozenset()) -> dict[str, bool]:
        """Each check's answer (False for those in ``skip``, for any not done in time, and
        for all once the probe is closed: the app is stopping)."""
        if self._closed:
            return dict.fromkeys(self.checks, False)
        futures = {name: self._start(name) for name in self.checks if name not in skip}
        wait(futures.values(), timeout=self.deadline_s)
        answers = {name: _answer(future) for name, future in futures.items()}
        return {name: answers.get(name, False) for name in self.checks}

    def _start(self, name: str) -> Future[bool]:
        """The check's call under way, or a new one."""
        with self._lock:
            running = self._running.get(name)
            if self._closed:  # closed since this probe began: answer no, start nothing
                running = Future()
                running.set_result(False)
            elif running is None or running.done():
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(len(self.checks), thread_name_prefix="ready")
                running = self._running[name] = self._pool.submit(self.checks[name])
            return running

    def close(self) -> None:
        """Answer not ready from now on and let the threads go (calls under way end on
        their own timeouts)."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)


def _answer(future: Future[bool]) -> bool:
    """True only for a check that finished and said yes."""
    return (
        future.done()
        and not future.cancelled()
        and future.exception() is None
        and bool(future.result())
    )


def _database_answers(services: Services) -> bool:
    """``SELECT 1`` on a pooled connection."""
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        return False
    return True
