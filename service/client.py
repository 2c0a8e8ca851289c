"""A small client of the DST Lab REST API (used by the CLI and the demo).

httpx is imported when a client is made, so the CLI's ``--help`` does not pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

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


def segment(value: str | int, what: str = "an experiment id") -> str:
    """``value`` as one path segment of a URL: every reserved character quoted, so an id such
    as ``../presets`` or ``a?b`` names that (missing) experiment instead of another route, and
    a segment of dots only as well (a client would drop ``.`` or ``..`` from the path). An
    empty one (``what``, named in the message) is a ``ValueError``: ``/experiments/`` is the
    list, not an experiment; so is one holding ``/``, which servers decode from ``%2F``
    before routing (``<id>/trials`` would reach the trials)."""
    text = str(value)
    if not text:
        raise ValueError(f"{what} cannot be empty")
    if "/" in text:
        raise ValueError(f"{what} cannot contain '/': {text!r}")
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if quoted.strip(".") == "" else quoted


NOT_HEADER_TEXT = "must be printable ASCII text: it is sent as an HTTP header"


def header_text(value: str) -> bool:
    """``value`` can be an HTTP header's value: printable ASCII (headers are bytes, so a
    non-ASCII character cannot be sent, and a control character such as a newline would end
    the header)."""
    return all(" " <= char <= "~" for char in value)


def check_header_value(what: str, value: str) -> str:
    """``value``, if an HTTP header can carry it; else a ``ValueError`` naming ``what``."""
    if not header_text(value):
        raise ValueError(f"{what} {NOT_HEADER_TEXT}")
    return value


def _snippet(text: str, width: int = 80) -> str:
    """The start of an answer's body on one line, to recognise what answered."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


NO_TOKEN = (
    "no token was sent: pass --token or set DST_API_TOKEN; a local `dst serve` keeps its token "
    "in the api-token file of its storage path (DST_STORAGE_PATH, ~/.dst-lab)"
)


class ApiClient:
    """Typed-enough wrapper over httpx for the experiment endpoints."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if token:
            check_header_value("the API token", token)
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._errors = httpx.HTTPError
        self._has_token = bool(token)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The API's 2xx answer; any other (a redirect included: the API never redirects, so
        one means ``url`` names something else), or none, is an :class:`ApiError`."""
        try:
            response = self.http.request(method, path, **kwargs)
        except self._errors as error:
            raise ApiError(0, f"cannot reach the API at {self.http.base_url}: {error}") from None
        if 300 <= response.status_code < 400:
            where = response.headers.get("location", "an address it does not give")
            raise ApiError(
                response.status_code,
                f"{response.request.url} redirects to {where}: is {self.http.base_url} the "
                f"API's address (--api, DST_API_URL)?",
            )
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
            if response.status_code == 401 and not self._has_token:
                detail = f"{detail} ({NO_TOKEN})"
            raise ApiError(response.status_code, detail)
        return response

    def _call(self, method: str, path: str, raw: bool = False, **kwargs: Any) -> Any:
        """The answer's body: its bytes if ``raw``, else its JSON; an answer that is not JSON
        (a proxy's or another server's page) is an :class:`ApiError` naming the URL."""
        response = self._request(method, path, **kwargs)
        if raw:
            return response.content
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ApiError(
                response.status_code,
                f"{response.request.url} answered with no JSON ({kind}: "
                f"{_snippet(response.text)!r}): is {self.http.base_url} the API's address "
                f"(--api, DST_API_URL)?",
            ) from None

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {}
        if idempotency_key:
            headers["Idempotency-Key"] = check_header_value("--idempotency-key", idempotency_key)
        return dict(self._call("POST", "/experiments", json=spec, headers=headers))

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{segment(experiment_id)}"))

    def experiments(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return dict(self._call("GET", "/experiments", params=params))

    def spec(self, experiment_id: str) -> dict[str, Any]:
        """The experiment's study spec as stored (defaults filled in)."""
        return dict(self._call("GET", f"/experiments/{segment(experiment_id)}/spec"))

    def trials(self, experiment_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/experiments/{segment(experiment_id)}/trials"))

    def history(self, experiment_id: str, index: int) -> list[dict[str, float]]:
        """Trial ``index``'s metrics per epoch."""
        return list(
            self._call(
                "GET", f"/experiments/{segment(experiment_id)}/trials/{segment(index)}/history"
            )
        )

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/experiments/{segment(experiment_id)}/cancel"))

    def results(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{segment(experiment_id)}/results"))

    def analysis(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/experiments/{segment(experiment_id)}/analysis"))

    def log(self, experiment_id: str, tail: int = 200) -> str:
        """The last ``tail`` lines of the experiment's job driver output."""
        return self._log(experiment_id, {"tail": tail}).content.decode("utf-8")

    def _log(self, experiment_id: str, params: dict[str, int]) -> httpx.Response:
        return self._request("GET", f"/experiments/{segment(experiment_id)}/log", params=params)

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
        name = segment(filename, "a figure's name")
        path = f"/experiments/{segment(experiment_id)}/figures/{name}"
        return bytes(self._call("GET", path, raw=True, params=params))

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except self._errors:
            return False
