"""Events settings: defaults from DESIGN.md, and a bad value stops start-up naming it."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.events.config import EventsConfig


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "MAX_DELIVERY_ATTEMPTS", "HEARTBEAT_SECONDS", "BACKEND", "REDIS_MAX_CONNECTIONS"):
        monkeypatch.delenv(f"SWITCHBOARD_EVENTS_{name}", raising=False)
    config = load_config(EventsConfig)
    assert (config.port, config.max_delivery_attempts, config.heartbeat_seconds) == (50054, 5, 10.0)
    assert config.effective_database_url().endswith("events.db")
    assert (config.backend, config.redis_prefix) == ("sql", "switchboard:events:")
    assert config.redis_max_connections == 100


def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHBOARD_EVENTS_MAX_DELIVERY_ATTEMPTS", "0")
    monkeypatch.setenv("SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS", "soon")
    with pytest.raises(ConfigError):
        load_config(EventsConfig)
    message = capsys.readouterr().err
    assert "SWITCHBOARD_EVENTS_MAX_DELIVERY_ATTEMPTS" in message
    assert "SWITCHBOARD_EVENTS_HEARTBEAT_SECONDS" in message


def test_the_redis_backend_needs_its_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SWITCHBOARD_EVENTS_REDIS_URL", raising=False)
    monkeypatch.setenv("SWITCHBOARD_EVENTS_BACKEND", "redis")
    with pytest.raises(ConfigError):
        load_config(EventsConfig)
    assert "SWITCHBOARD_EVENTS_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("SWITCHBOARD_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("SWITCHBOARD_EVENTS_REDIS_PREFIX", "suite-a:")
    config = load_config(EventsConfig)
    assert (config.backend, config.redis_url, config.redis_prefix) == (
        "redis",
        "redis://127.0.0.1:6379/0",
        "suite-a:",
    )


def test_an_unknown_backend_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHBOARD_EVENTS_BACKEND", "kafka")
    with pytest.raises(ConfigError):
        load_config(EventsConfig)
    assert "SWITCHBOARD_EVENTS_BACKEND" in capsys.readouterr().err


def test_retention_is_off_unless_configured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("MAX_AGE_SECONDS", "SETTLED_AGE_SECONDS"):
        monkeypatch.delenv(f"SWITCHBOARD_EVENTS_RETENTION_{name}", raising=False)
    config = load_config(EventsConfig)
    assert (config.retention_max_age_seconds, config.retention_settled_age_seconds) == (0, 0)
    monkeypatch.setenv("SWITCHBOARD_EVENTS_RETENTION_MAX_AGE_SECONDS", "-5")
    with pytest.raises(ConfigError):
        load_config(EventsConfig)
    assert "SWITCHBOARD_EVENTS_RETENTION_MAX_AGE_SECONDS" in capsys.readouterr().err
