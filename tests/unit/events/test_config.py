"""Events settings: defaults from DESIGN.md, and a bad value stops start-up naming it."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.events.config import EventsConfig


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "MAX_DELIVERY_ATTEMPTS", "HEARTBEAT_SECONDS"):
        monkeypatch.delenv(f"SWITCHBOARD_EVENTS_{name}", raising=False)
    config = load_config(EventsConfig)
    assert (config.port, config.max_delivery_attempts, config.heartbeat_seconds) == (50054, 5, 10.0)
    assert config.effective_database_url().endswith("events.db")


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
