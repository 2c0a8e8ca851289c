"""A small client of the DST Lab REST API (used by the CLI and the demo).

httpx is imported when a client is made, so the CLI's ``--help`` does not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.states import TERMINAL_EXPERIMENT

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset(s.value for s in TERMINAL_EXPERIMENT)


def parent_closed(experiment: dict[str, Any]) -> bool:
    """The experiment's MLflow parent run is closed with its results, analysis and figures (or
    it has none): after its end, nothing is left to do for it."""
    mlflow = experiment.get("mlflow") or {}
    return mlflow.get("parent_run_id") is None or mlflow.get("parent_closed_at") is not None


def token_file(storage_path: Path) -> Path:
    """Where ``dst serve`` leaves its generated token for local CLI use (mode 0600)."""
    return storage_path / "api-token"


def write_token(storage_path: Path, token: str) -> Path:
    path = token_file(storage_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(token)
    return path


def default_token(storage_path: Path) -> str | None:
    """``$DST_API_TOKEN``, else the token file of a local ``dst serve``."""
    if token := os.environ.get("DST_API_TOKEN"):
        return token
    path = token_file(storage_path)
    return path.read_text().strip() if path.exists() else None


class ApiError(RuntimeError):
    """A non-2xx answer; the message carries the API's detail."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        prefix = f"HTTP {status}: " if status else ""
        super().__init__(prefix + format_detail(detail))


def format_detail(detail: Any) -> str:
    """FastAPI's 422 list as ``field.path: message`` lines; anything else as text."""
    if isinstance(detail, list):
        return "\n".join(
            f"  {'.'.join(str(p) for p in item.get('loc', []) if p != 'body')}: {item.get('msg')}"
            for item in detail
        )
    return str(detail)


NO_TOKEN = (
    "no token was sent: pass --token or set DST_API_TOKEN; a local `dst serve` keeps its token "
    "in the api-token file of its storage path (DST_STORAGE_PATH, ~/.dst-lab)"
)


class ApiClient:
    """Typed-enough wrapper over httpx for the experiment endpoints."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._errors = httpx.HTTPError
        self._has_token = bool(token)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The API's 2xx answer; any other, or none, is an :class:`ApiError`."""
        try:
            response = self.http.request(method, path, **kwargs)
        except self._errors as error:
            raise ApiError(0, f"cannot reach the API at {self.http.base_url}: {error}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if response.status_code == 401 and not self._has_token:
                detail = f"{detail} ({NO_TOKEN})"
            raise ApiError(response.status_code, detail)
        return response

    def _call(self, method: str, path: str, raw: bool = False, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.content if raw else response.json()

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._call("POST", "/experiments", json=spec, headers=headers))

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{experiment_id}"))

    def experiments(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return dict(self._call("GET", "/experiments", params=params))

    def spec(self, experiment_id: str) -> dict[str, Any]:
        """The experiment's study spec as stored (defaults filled in)."""
        return dict(self._call("GET", f"/experiments/{experiment_id}/spec"))

    def trials(self, experiment_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/experiments/{experiment_id}/trials"))

    def history(self, experiment_id: str, index: int) -> list[dict[str, float]]:
        """Trial ``index``'s metrics per epoch."""
        return list(self._call("GET", f"/experiments/{experiment_id}/trials/{index}/history"))

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/experiments/{experiment_id}/cancel"))

    def results(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{experiment_id}/results"))

    def analysis(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{experiment_id}/analysis"))

    def log(self, experiment_id: str, tail: int = 200) -> str:
        """The last ``tail`` lines of the experiment's job driver output."""
        return self._log(experiment_id, {"tail": tail}).content.decode("utf-8")

    def _log(self, experiment_id: str, params: dict[str, int]) -> httpx.Response:
        return self._request("GET", f"/experiments/{experiment_id}/log", params=params)

    def log_chunk(
        self, experiment_id: str, tail: int | None = None, since: int | None = None
    ) -> tuple[str, int]:
        """The driver output after its first ``since`` characters (at most its last ``tail``
        lines), and the whole log's length: the ``since`` that reads on from there."""
        from service.schemas import LOG_LENGTH_HEADER

        params = {k: v for k, v in {"tail": tail, "since": since}.items() if v is not None}
        response = self._log(experiment_id, params)
        length = response.headers.get(LOG_LENGTH_HEADER)
        if length is None:
            older = f"the API at {self.http.base_url} predates following a log"
            raise ApiError(0, f"{older} (no {LOG_LENGTH_HEADER} header)")
        return response.content.decode("utf-8"), int(length)

    def figure(self, experiment_id: str, filename: str, dpi: int | None = None) -> bytes:
        """A figure's image (``NAME.png``, at ``dpi`` if given, or ``NAME.svg``)."""
        params = {"dpi": dpi} if dpi is not None else None
        path = f"/experiments/{experiment_id}/figures/{filename}"
        return bytes(self._call("GET", path, raw=True, params=params))

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except self._errors:
            return False
