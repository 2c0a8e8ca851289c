"""The FastAPI application: routes, lifespan (migrations, reconciler loop), wiring.

``create_app(settings, executor, tracker)`` builds the app around explicit collaborators (the
CLI and the tests pass their own); ``app_factory`` builds it from the environment alone, for
``uvicorn --factory service.main:app_factory`` on a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.analysis import AnalysisCache
from service.api.deps import require_database, require_token
from service.api.errors import install_error_handlers
from service.api.limits import BodySizeLimit
from service.api.routes import experiments, health, presets
from service.core.config import Settings
from service.db import make_engine, upgrade_database, upgrade_when_reachable
from service.dispatcher import Dispatcher
from service.lifecycle import Executor, Services, Tracker
from service.readiness import ReadinessProbe

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, executor: Executor | None = None, tracker: Tracker | None = None
) -> FastAPI:
    """The API over ``settings``; default executor and tracker come from the settings."""
    # one bounded attempt per MLflow call: the dispatcher's next pass is the retry
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.call_timeout_s)))
    if executor is None or tracker is None:
        if not settings.ray_address or not settings.mlflow_tracking_uri:
            raise ValueError(
                "DST_RAY_ADDRESS and DST_MLFLOW_TRACKING_URI must be set "
                "(or use `dst serve`, which starts local ones)"
            )
        from service.execution import RayExecutor
        from service.tracking import MlflowTracker

        executor = executor or RayExecutor.for_settings(
            settings, settings.ray_address, settings.job_python
        )
        tracker = tracker or MlflowTracker(settings.mlflow_tracking_uri, settings.mlflow_ui_url)
    engine = make_engine(settings.database_url)
    analyses = AnalysisCache()  # shared by the routes and the closing of parent runs
    services = Services(
        engine=engine,
        executor=executor,
        tracker=tracker,
        storage_path=settings.storage_path,
        analyses=analyses,
    )
    dispatcher = Dispatcher(services, settings.reconcile_interval_s)
    readiness = ReadinessProbe(services)

    database_ready, stopping = threading.Event(), threading.Event()

    def prepare_database() -> None:  # then start advancing experiments
        upgrade_when_reachable(engine, database_ready, stopping)
        if database_ready.is_set():
            dispatcher.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the first attempt before serving, so a reachable database is ready from the first
        # request; an unreachable one is retried in the background while the API answers
        # /healthz and 503 elsewhere
        try:
            await asyncio.to_thread(upgrade_database, engine)
        except Exception:
            threading.Thread(target=prepare_database, name="dst-schema", daemon=True).start()
        else:
            database_ready.set()
            dispatcher.start()
        try:
            yield
        finally:
            stopping.set()
            readiness.close()
            dispatcher.stop(wait=settings.shutdown_wait_s)
            engine.dispose()

    app = FastAPI(
        title="DST Lab",
        summary="Run dynamic sparse training studies as Ray Tune trials, tracked in MLflow.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services
    app.state.dispatcher = dispatcher
    app.state.database_ready = database_ready
    app.state.readiness = readiness
    app.state.analyses = analyses
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(health.router)
    protected = [Depends(require_token), Depends(require_database)]
    app.include_router(experiments.router, dependencies=protected)
    app.include_router(presets.router, dependencies=protected)
    return app


def app_factory() -> FastAPI:
    """The app configured from the environment (``DST_*``) only."""
    return create_app(Settings())
