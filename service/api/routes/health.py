"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from sqlalchemy import text

from service.api.deps import ServicesDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The API process is alive (answered on the event loop: no thread, no dependency)."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness}})
def readyz(services: ServicesDep, request: Request, response: Response) -> Readiness:
    """The database, the Ray Jobs API and the MLflow server are all reachable."""
    database = request.app.state.database_ready.is_set()  # reachable and migrated
    if database:
        try:
            with services.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            database = False
    ray, mlflow = services.executor.ping(), services.tracker.ping()
    ready = database and ray and mlflow
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(ready=ready, database=database, ray=ray, mlflow=mlflow)
