"""The API client's helpers that read an experiment as the API returns it, and its log reads."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from service.client import ApiClient, ApiError, parent_closed


@pytest.mark.parametrize(
    ("mlflow", "closed"),
    [
        (None, True),  # MLflow not configured: nothing to close
        ({"parent_run_id": None, "parent_closed_at": None}, True),  # never opened
        ({"parent_run_id": "abc", "parent_closed_at": None}, False),  # open
        ({"parent_run_id": "abc", "parent_closed_at": "2026-11-26T15:00:00Z"}, True),
    ],
)
def test_parent_closed(mlflow: dict[str, str | None] | None, closed: bool) -> None:
    assert parent_closed({"id": "x", "status": "succeeded", "mlflow": mlflow}) is closed


def test_an_older_api_gives_logs_and_the_client_says_why_it_cannot_follow_them() -> None:
    def older_api(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/experiments/e1/log"
        return httpx.Response(200, text="last line\n")  # no X-Log-Length

    client = ApiClient("http://old-api:8000", "token")
    client.http = httpx.Client(
        base_url="http://old-api:8000", transport=httpx.MockTransport(older_api)
    )
    assert client.log("e1", tail=1) == "last line\n"
    with pytest.raises(ApiError, match=r"predates following a log \(no X-Log-Length header\)"):
        client.log_chunk("e1", since=0)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_401_says_where_a_token_comes_from_when_none_was_sent(token: str | None) -> None:
    def api(request: httpx.Request) -> httpx.Response:
        sent = request.headers.get("Authorization")
        detail = "invalid bearer token" if sent else "missing bearer token"
        return httpx.Response(401, json={"detail": detail})

    client = ApiClient("http://api:8000", token)
    client.http = httpx.Client(
        base_url="http://api:8000", headers=client.http.headers, transport=httpx.MockTransport(api)
    )
    with pytest.raises(ApiError) as raised:
        client.experiment("e1")
    hint = "no token was sent: pass --token or set DST_API_TOKEN"
    assert raised.value.status == 401 and (hint in str(raised.value)) is (token is None)


def mock_client(answer: Callable[[httpx.Request], httpx.Response]) -> ApiClient:
    """The client of ``http://api:8000``, answered by ``answer`` instead of a server."""
    client = ApiClient("http://api:8000", "token")
    client.http = httpx.Client(
        base_url="http://api:8000",
        headers=client.http.headers,
        transport=httpx.MockTransport(answer),
    )
    return client


@pytest.mark.parametrize(
    ("experiment_id", "path"),
    [
        ("0123abcd", "/experiments/0123abcd/trials"),
        ("..", "/experiments/%2E%2E/trials"),
        (".", "/experiments/%2E/trials"),
        ("a b?c#d%", "/experiments/a%20b%3Fc%23d%25/trials"),
        ("é", "/experiments/%C3%A9/trials"),
    ],
)
def test_an_id_is_one_quoted_path_segment(experiment_id: str, path: str) -> None:
    """Whatever it holds, an id addresses that experiment: no slash, dot segment, query or
    fragment in it takes the request to another route."""
    asked: list[bytes] = []

    def api(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.raw_path)
        return httpx.Response(200, json=[])

    assert mock_client(api).trials(experiment_id) == []
    assert asked == [path.encode()]


def test_an_empty_id_is_refused_before_anything_is_sent() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"{request.url} was asked")

    client = mock_client(api)
    with pytest.raises(ValueError, match=r"^an experiment id cannot be empty$"):
        client.experiment("")
    with pytest.raises(ValueError, match=r"^a figure's name cannot be empty$"):
        client.figure("e1", "")
    for routed in ("../presets", "0123/spec"):  # servers decode %2F before routing
        with pytest.raises(ValueError, match=r"^an experiment id cannot contain '/'"):
            client.experiment(routed)


def test_an_answer_that_is_not_json_names_the_url_and_the_status() -> None:
    """A proxy's login page where the API should be."""

    def proxy(request: httpx.Request) -> httpx.Response:
        page = "<html>\n  <title>Sign in</title>\n</html>\n"
        return httpx.Response(200, text=page, headers={"content-type": "text/html"})

    with pytest.raises(ApiError) as raised:
        mock_client(proxy).experiment("e1")
    assert raised.value.status == 200
    assert str(raised.value) == (
        "HTTP 200: http://api:8000/experiments/e1 answered with no JSON (text/html: "
        "'<html> <title>Sign in</title> </html>'): is http://api:8000 the API's address "
        "(--api, DST_API_URL)?"
    )


def test_a_redirect_is_an_error_naming_where_it_leads() -> None:
    """The API never redirects: one comes from something else at that address."""

    def other(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"location": "https://login.example/"})

    with pytest.raises(ApiError) as raised:
        mock_client(other).experiment("e1")
    assert raised.value.status == 307
    assert str(raised.value) == (
        "HTTP 307: http://api:8000/experiments/e1 redirects to https://login.example/: is "
        "http://api:8000 the API's address (--api, DST_API_URL)?"
    )


def test_an_error_whose_json_is_no_mapping_is_said_as_its_text() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, json=["upstream", "down"])

    with pytest.raises(ApiError) as raised:
        mock_client(api).experiment("e1")
    assert str(raised.value) == 'HTTP 502: ["upstream","down"]'


def test_a_token_a_header_cannot_carry_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^the API token must be printable ASCII text"):
        ApiClient("http://api:8000", "tökén")
    with pytest.raises(ValueError, match=r"^--idempotency-key must be printable ASCII text"):
        mock_client(lambda request: httpx.Response(201, json={})).submit({}, "ключ")
