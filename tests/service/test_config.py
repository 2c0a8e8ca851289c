"""Settings: environment prefix, embedded defaults, and a token that never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.config import Settings


def test_defaults_are_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DST_STORAGE_PATH", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path / 'dstlab.db'}"
    assert settings.ray_address is None and settings.mlflow_tracking_uri is None
    assert len(settings.api_token.get_secret_value()) >= 32
    assert Settings().api_token != settings.api_token  # random unless configured


def test_environment_configures_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DST_DATABASE_URL", "postgresql+psycopg://u@db/dst")
    monkeypatch.setenv("DST_RAY_ADDRESS", "http://ray-head:8265")
    monkeypatch.setenv("DST_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("DST_API_TOKEN", "s3cret-token")
    monkeypatch.setenv("DST_MAX_TRIALS", "50")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@db/dst"
    assert settings.ray_address == "http://ray-head:8265"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.max_trials == 50
    assert settings.api_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(settings) and "s3cret-token" not in str(settings)


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DST_MAX_TRIALS", "0")
    with pytest.raises(ValueError, match="max_trials"):
        Settings()


@pytest.mark.parametrize("token", ["", "short", "has a space in it", "tökenwithumlaut"])
def test_a_token_no_client_could_send_is_refused(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("DST_API_TOKEN", token)
    with pytest.raises(ValueError, match="DST_API_TOKEN must be at least 8 visible ASCII"):
        Settings()
