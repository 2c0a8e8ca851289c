"""MLflow 3's security middleware as a browser meets it, for checking deployment settings."""

from __future__ import annotations

import os
import warnings
from unittest import mock
from urllib.parse import urlsplit


def mlflow_refusals(ui_url: str, allowed_hosts: str, cors_origins: str) -> list[str]:
    """What MLflow's security middleware refuses of a browser that opens the UI at ``ui_url``:
    its Host header (403 "Invalid Host header"), or the UI's POSTs from its origin (403
    "Cross-origin request blocked"), with MLflow's own parsing of the two variables."""
    with warnings.catch_warnings():  # importing the server loads its SQL store's mappers,
        # which still ask SQLAlchemy for a deprecated loader: MLflow's, not ours
        warnings.filterwarnings("ignore", "The ``noload`` loader strategy is deprecated")
        from mlflow.server.fastapi_security import get_allowed_hosts, get_allowed_origins
        from mlflow.server.security_utils import is_allowed_host_header, should_block_cors_request

    env = {
        "MLFLOW_SERVER_ALLOWED_HOSTS": allowed_hosts,
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": cors_origins,
    }
    with mock.patch.dict(os.environ, env):
        hosts, origins = get_allowed_hosts(), get_allowed_origins()
    parts = urlsplit(ui_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    refused = []
    if not is_allowed_host_header(hosts, parts.netloc):
        refused.append(f"Host {parts.netloc}")
    if should_block_cors_request(origin, "POST", origins):
        refused.append(f"Origin {origin}")
    return refused
