from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.config import ConfigError, ServiceConfig, load_config
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Violations,
    internal_status,
)
from services.common.pagination import next_page_token, page_request


def unpack(status_proto, kind):  # type: ignore[no-untyped-def]
    found = []
    for detail in status_proto.details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def test_invalid_argument_carries_every_violation_and_an_error_info() -> None:
    error = InvalidArgument(
        [FieldViolation("agent.name", "is required"), FieldViolation("page_size", "negative")]
    )
    status = error.to_status_proto()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (bad_request,) = unpack(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["agent.name", "page_size"]
    (info,) = unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.domain == "switchboard.dev"


def test_retry_info_only_where_retrying_helps() -> None:
    exhausted = ResourceExhausted("queue full", reason="USER_QUEUE_FULL", retry_after=2.5).to_status_proto()
    (retry,) = unpack(exhausted, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 2500
    assert unpack(NotFound("no such run").to_status_proto(), error_details_pb2.RetryInfo) == []


def test_internal_status_is_generic() -> None:
    status = internal_status("abc123")
    assert status.details == "internal error"
    assert status.code == grpc.StatusCode.INTERNAL


def test_violations_collects_before_raising() -> None:
    violations = Violations()
    violations.check(False, "a", "bad")
    violations.check(True, "b", "fine")
    violations.add("c", "bad too")
    with pytest.raises(InvalidArgument) as raised:
        violations.raise_if_any()
    assert [v.field for v in raised.value.violations] == ["a", "c"]


class DemoConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_DEMO_", frozen=True, extra="ignore")
    service_name: str = "demo"
    port: int = 50999
    workers: int = Field(default=2, ge=1)


def test_config_reads_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_DEMO_WORKERS", "7")
    config = load_config(DemoConfig)
    assert config.workers == 7
    assert config.effective_database_url().endswith("demo.db")
    with pytest.raises(Exception, match="frozen"):
        config.workers = 3  # type: ignore[misc]


def test_bad_config_stops_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHBOARD_DEMO_WORKERS", "zero")
    monkeypatch.setenv("SWITCHBOARD_DEMO_PORT", "70000")
    with pytest.raises(ConfigError):
        load_config(DemoConfig)
    err = capsys.readouterr().err
    assert "SWITCHBOARD_DEMO_WORKERS" in err
    assert "SWITCHBOARD_DEMO_PORT" in err


def test_page_tokens_round_trip_and_are_bound_to_filters() -> None:
    token = next_page_token("run-42", {"state": 2})
    assert page_request(10, token, default=50, maximum=100, filters={"state": 2}).after == "run-42"
    with pytest.raises(InvalidArgument) as raised:
        page_request(10, token, default=50, maximum=100, filters={"state": 3})
    assert raised.value.violations[0].field == "page_token"
    with pytest.raises(InvalidArgument):
        page_request(10, "garbage!!", default=50, maximum=100)
    assert page_request(0, "", default=50, maximum=100).size == 50
    assert page_request(5000, "", default=50, maximum=100).size == 100
    with pytest.raises(InvalidArgument):
        page_request(-1, "", default=50, maximum=100)
