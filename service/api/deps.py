"""FastAPI dependencies: settings, database session, lifecycle services, authentication."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.analysis import AnalysisCache
from service.core.config import Settings
from service.core.security import check_bearer
from service.dispatcher import Dispatcher
from service.lifecycle import Services

_bearer = HTTPBearer(auto_error=False, description="the API token (DST_API_TOKEN)")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def get_analyses(request: Request) -> AnalysisCache:
    analyses: AnalysisCache = request.app.state.analyses
    return analyses


SettingsDep = Annotated[Settings, Depends(get_settings)]
AnalysesDep = Annotated[AnalysisCache, Depends(get_analyses)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    """A session per request; objects stay readable after a commit, so the answer to a write
    is built without another round trip (a stored experiment is never answered with a 5xx)."""
    with Session(services.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the request carries the configured bearer token."""
    check_bearer(credentials, settings.api_token)


def require_database(request: Request) -> None:
    """503 (retry later) until the database is reachable and its schema is up to date."""
    if not request.app.state.database_ready.is_set():
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the database is not reachable yet; retry in a moment",
            headers={"Retry-After": "2"},
        )
