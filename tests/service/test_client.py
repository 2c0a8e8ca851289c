"""The API client's helpers that read an experiment as the API returns it, and its log reads."""

from __future__ import annotations

import pytest

from service.client import parent_closed


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
    import httpx

    from service.client import ApiClient, ApiError

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
    import httpx

    from service.client import ApiClient, ApiError

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
