"""Background work of the API process: advancing experiments on Ray and MLflow.

Requests only validate and write the database; everything that talks to Ray or MLflow
(launch, stop, record the end of a job) runs here, on a few daemon threads, one
:func:`service.lifecycle.advance` call per experiment at a time. A slow launch holds up only
its own experiment, never a request, another experiment or the server's shutdown (the threads
are daemons and every Ray and MLflow call has a timeout). A ticker asks for a pass over every
live experiment (and every ended one whose MLflow parent run is still open) every
``interval`` seconds; :meth:`Dispatcher.request` asks for one at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from sqlalchemy.orm import Session

from service.lifecycle import Services, advance, to_advance

log = logging.getLogger(__name__)


class Dispatcher:
    """Advances experiments in the background; never the same experiment twice at once."""

    def __init__(self, services: Services, interval: float, threads: int = 4) -> None:
        self.services, self.interval, self.threads = services, interval, threads
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # queued or being advanced
        self._again: set[str] = set()  # asked for again while being advanced
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"dst-dispatch-{i}", daemon=True)
            for i in range(self.threads)
        ]
        self._workers = workers
        for thread in workers:
            thread.start()
        threading.Thread(target=self._tick, name="dst-dispatch-tick", daemon=True).start()

    def stop(self, wait: float = 0.0) -> bool:
        """Stop taking work and wait up to ``wait`` s for the calls in flight (every Ray and
        MLflow call has a timeout; a parent run being closed finishes its upload), so the
        process does not exit in the middle of one. True if none is left running."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for thread in self._workers:
            thread.join(max(deadline - time.monotonic(), 0.0))
        busy = [t.name for t in self._workers if t.is_alive()]
        if busy:
            log.warning("stopping with work in flight on %s", ", ".join(busy))
        return not busy

    def request(self, experiment_id: str) -> None:
        """Advance ``experiment_id`` soon (returns at once)."""
        with self._lock:
            if experiment_id in self._pending:
                self._again.add(experiment_id)
                return
            self._pending.add(experiment_id)
        self._queue.put(experiment_id)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                experiment_id = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                advance(self.services, experiment_id)
            except Exception:
                log.exception("advancing experiment %s failed (next pass retries)", experiment_id)
            with self._lock:
                if experiment_id in self._again:
                    self._again.discard(experiment_id)
                    self._queue.put(experiment_id)
                else:
                    self._pending.discard(experiment_id)

    def _tick(self) -> None:
        while not self._stop.is_set():
            try:
                with Session(self.services.engine) as session:
                    live = to_advance(session)
            except Exception:
                log.exception("listing the experiments to advance failed")
                live = []
            for experiment_id in live:
                self.request(experiment_id)
            self._stop.wait(self.interval)
