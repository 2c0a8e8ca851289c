"""A backlog: calls made in order on one background thread (in the Ray job driver).

The job driver records through backlogs, its database writes on one and its MLflow writes
on another (:class:`service.tracking.Outbox`), because Tune waits for its callbacks, and
with them for every trial's next report: a recorder that waited on a database restart or a
slow tracking server would stall the training itself. Calls queued here keep their order,
and each call decides for itself how long it retries (:meth:`Backlog.overdue` says when to
stop: closing's time is up).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Backlog:
    """Calls made one at a time, in the order :meth:`put` queued them, on a daemon thread
    named ``name``. A call that raises is logged and the next one goes on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._deadline: float | None = None  # set by close
        self._closing = threading.Event()  # wakes a pause once close is called
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def put(self, call: Callable[[], None]) -> None:
        """Queue ``call``; it runs after every call queued before it."""
        self._queue.put(call)

    def overdue(self) -> bool:
        """True once :meth:`close`'s time is up: a call should try once more at most."""
        return self._deadline is not None and time.monotonic() > self._deadline

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds`` before a retry, or less: never past closing's time."""
        end = time.monotonic() + seconds
        if self._closing.wait(seconds) and self._deadline is not None:
            time.sleep(max(0.0, min(end, self._deadline) - time.monotonic()))

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s until the calls queued so far are done; True if they
        were."""
        reached = threading.Event()
        self._queue.put(reached.set)
        return reached.wait(timeout)

    def close(self, timeout: float, grace: float = 0.0) -> bool:
        """Stop after the queued calls, waiting at most ``timeout`` s (plus ``grace`` for a
        call's last try to end); True if all were done. Calls still queued after that run
        on, each told it is :meth:`overdue`, while the process lives."""
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout + grace)
        return not self._thread.is_alive()

    def _drain(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                call()
            except Exception:  # a bug in one call must not stop the ones behind it
                log.exception("%s: a queued call failed; going on", self.name)
