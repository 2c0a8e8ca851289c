"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The API process is alive (answered on the event loop: no thread, no dependency)."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness}})
def readyz(request: Request, response: Response) -> Readiness:
    """The database (reachable and migrated), the Ray Jobs API and the MLflow server all
    answer; within a few seconds however slow they are (:mod:`service.readiness`)."""
    migrated = request.app.state.database_ready.is_set()
    answers = request.app.state.readiness.check(skip=frozenset() if migrated else {"database"})
    ready = all(answers.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(ready=ready, **answers)
