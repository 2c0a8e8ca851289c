"""The API client's helpers that read an experiment as the API returns it."""

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
