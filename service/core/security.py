"""Bearer-token authentication of the REST API.

Every endpoint except the health checks requires ``Authorization: Bearer <token>``. The token
is compared in constant time and never echoed back or logged.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import SecretStr

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def check_bearer(credentials: HTTPAuthorizationCredentials | None, token: SecretStr) -> None:
    """Raise 401 unless ``credentials`` carry exactly ``token``."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers=UNAUTHORIZED_HEADERS,
        )
    given = credentials.credentials.encode()
    if not secrets.compare_digest(given, token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers=UNAUTHORIZED_HEADERS
        )
