"""The API while it loads (runs in the API process).

Building the real app imports PyTorch (the registries behind spec validation), Ray's Jobs API
client and MLflow: seconds of work. :class:`DeferredApp` is an ASGI app that is up at once:
it answers ``/healthz`` immediately (the process is alive) and every other request with 503
and ``Retry-After`` until the real app, built on a thread in the background, has started;
then it hands everything to that app. ``/readyz`` is 503 until then, as it should be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class DeferredApp:
    """ASGI app that serves ``build()``'s app once built, and liveness until then."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self.app: ASGIApp | None = None
        self.error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._answer_while_loading(scope, send)

    async def _answer_while_loading(self, scope: Scope, send: Send) -> None:
        if scope["path"] == "/healthz":
            status, body = 200, {"status": "ok"}
        elif self.error is not None:
            status, body = 503, {"detail": f"the API failed to start: {self.error}"}
        else:
            status, body = 503, {"detail": "the API is starting; retry in a moment"}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup: answered at once, the real app loads behind
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._load_and_run())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        self._stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        await send({"type": "lifespan.shutdown.complete"})

    async def _load_and_run(self) -> None:
        """Build the app on a thread, run its own lifespan, serve until shutdown."""
        assert self._stopping is not None
        try:
            app = await asyncio.to_thread(self._build)
            async with app.router.lifespan_context(app):
                self.app = app
                await self._stopping.wait()
        except Exception as error:
            log.exception("the API failed to start")
            self.error = error
