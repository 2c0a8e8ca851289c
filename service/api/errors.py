"""Error answers that can always be sent: a 422 names the field and says why, and echoes the
offending input only when it is small and representable as JSON (not NaN, not Infinity, not
a lone surrogate), so the answer to bad input is never itself a 500."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_ECHO = 200  # characters of an offending input echoed back


def safe_error(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as plain JSON: ``loc``, ``msg``, ``type`` and, when safe, ``input``."""
    out: dict[str, Any] = {
        "loc": [_safe_text(p) if isinstance(p, str) else p for p in error.get("loc", ())],
        "msg": _safe_text(str(error.get("msg", ""))),
        "type": str(error.get("type", "value_error")),
    }
    echo = _echo(error.get("input"))
    if echo is not None:
        out["input"] = echo
    return out


def _echo(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": named, as text
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError):
        return None
    return value if len(text) <= MAX_ECHO else None


def _safe_text(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [safe_error(e) for e in exc.errors()]
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": errors}
    )


async def _database_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """A lost database connection is the server's dependency failing: 503, retry later."""
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "the database is unreachable; retry in a moment"},
        headers={"Retry-After": "2"},
    )


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import OperationalError

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_unreachable)
