"""Service settings (pydantic-settings, environment prefix ``DST_``).

With nothing configured the service runs on embedded defaults: a SQLite database under the
storage path, and ``dst serve`` starts a local Ray head and a local MLflow server. A cluster
sets ``DST_DATABASE_URL`` (PostgreSQL), ``DST_RAY_ADDRESS`` (the Ray dashboard / Jobs API
address), ``DST_MLFLOW_TRACKING_URI`` and ``DST_API_TOKEN``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STORAGE = "~/.dst-lab"


def storage_path_from_env() -> Path:
    """``DST_STORAGE_PATH`` (or its default) alone, as :class:`Settings` reads it: for a
    client that only needs the local token file, whatever else the environment holds."""
    return Path(os.environ.get("DST_STORAGE_PATH") or DEFAULT_STORAGE).expanduser()


def _random_token() -> SecretStr:
    return SecretStr(secrets.token_urlsafe(32))


class Settings(BaseSettings):
    """Everything the API, the Ray job drivers and the trials need to know about the system."""

    model_config = SettingsConfigDict(env_prefix="DST_", extra="ignore", validate_default=True)

    storage_path: Path = Field(
        Path(DEFAULT_STORAGE), description="local state: SQLite database, Tune results, MLflow"
    )
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite in storage_path")
    ray_address: str | None = Field(
        None, description="Ray Jobs API address (http://head:8265); unset: start a local Ray"
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server; unset: start a local MLflow server"
    )
    mlflow_ui_url: str | None = Field(
        None,
        description="the MLflow UI address users open (links the API prints); unset: the "
        "tracking URI",
    )
    api_token: SecretStr = Field(
        default_factory=_random_token, description="bearer token; unset: a random one"
    )
    ray_autoscaling: bool = Field(
        False,
        description="the Ray cluster adds nodes on demand: do not refuse trials that no "
        "current node can hold",
    )
    ray_nodes_wait_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="how long a job driver waits for Ray nodes that can hold its trials to "
        "join (the workers of a cluster just started) before it fails the study",
    )
    call_timeout_s: float = Field(
        10.0, gt=0, le=300, description="timeout of each Ray Jobs API and MLflow call the API makes"
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="largest request body accepted (413 above)"
    )
    data_dir: Path | None = Field(
        None,
        description="the data directory on the cluster's workers (what trials read as "
        "$DST_DATA_DIR); a study's data.root must lie inside it or inside data_roots",
    )
    data_roots: list[Path] = Field(
        default_factory=list, description="more directories a study's data.root may name"
    )
    max_trials: int = Field(1000, ge=1, description="largest study (trials) the API accepts")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    shutdown_wait_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="on shutdown, how long the API waits for background work in flight (a "
        "launch, a parent run being closed) before it exits",
    )
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="how often the API syncs experiment states with Ray"
    )
    job_python: str = Field(
        "python", description="the Python that Ray jobs run the driver with (on the cluster)"
    )
    driver_secrets: Literal["file", "head"] = Field(
        "file",
        description="how a job driver gets the database URL and MLflow settings: 'file', a "
        "file on the shared storage that only this user can read, written per experiment "
        "and removed once taken; 'head', the Ray head node's own environment (set from a "
        "Kubernetes Secret, say): the API hands the driver no secret at all",
    )

    @field_validator("api_token")
    @classmethod
    def _check_token(cls, token: SecretStr) -> SecretStr:
        """A token a bearer header can carry: visible ASCII, at least 8 characters (an empty
        one would lock every client out; a header cannot send spaces or other text)."""
        text = token.get_secret_value()
        if len(text) < 8 or not all("!" <= c <= "~" for c in text):
            raise ValueError(
                "DST_API_TOKEN must be at least 8 visible ASCII characters without spaces "
                "(e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return token

    def allowed_data_roots(self) -> list[Path]:
        """Where a study submitted over REST may point ``data.root``."""
        return [p for p in [self.data_dir, *self.data_roots] if p is not None]

    @model_validator(mode="before")
    @classmethod
    def _default_database(cls, data: Any) -> Any:
        if isinstance(data, dict):
            storage = Path(data.get("storage_path") or DEFAULT_STORAGE).expanduser()
            data["storage_path"] = storage
            if not data.get("database_url"):
                data["database_url"] = f"sqlite:///{storage / 'dstlab.db'}"
        return data
