"""The CLI's credentials file, addresses, option parsing and error text, in-process."""

from __future__ import annotations

import io
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from switchboard.auth.v1 import token_pb2

from switchboard_client.cli.agents import agent_from_arguments, update_request
from switchboard_client.cli.credentials import CredentialStore, StoredLogin
from switchboard_client.cli.errors import CliError, UsageError, describe_rpc_error
from switchboard_client.cli.events import PendingEvents
from switchboard_client.cli.main import build_parser
from switchboard_client.cli.output import Output
from switchboard_client.cli.settings import DEFAULT_ADDRESSES, Endpoints, config_dir


def login(access: str = "access-1", expires: datetime | None = None) -> StoredLogin:
    tokens = token_pb2.TokenPair(access_token=access, refresh_token="refresh-1", token_type="Bearer")
    tokens.access_token_expire_time.FromDatetime(expires or datetime.now(UTC) + timedelta(minutes=15))
    return StoredLogin.from_tokens(tokens, auth_address="a:1", username="ann", user_id="u-1", role="user")


def test_the_credentials_file_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "config" / "switchboard")
    previous = os.umask(0)
    try:
        store.save(login())
        store.save(login("access-2"))
    finally:
        os.umask(previous)

    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert [p.name for p in store.directory.iterdir()] == ["credentials.json"]
    loaded = store.load()
    assert loaded is not None and loaded.access_token == "access-2" and loaded.username == "ann"
    assert store.delete() and store.load() is None and not store.delete()


def test_a_corrupt_credentials_file_asks_to_log_in_again(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(CliError) as raised:
        store.load()
    assert "switchboard login" in raised.value.message


def test_the_access_token_counts_as_expiring_shortly_before_it_expires() -> None:
    now = datetime.now(UTC)
    assert not login(expires=now + timedelta(minutes=5)).access_token_expiring(now)
    assert login(expires=now + timedelta(seconds=10)).access_token_expiring(now)
    assert login(expires=now - timedelta(seconds=1)).access_token_expiring(now)


def test_config_dir_follows_xdg(tmp_path: Path) -> None:
    assert config_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "switchboard"
    # A relative XDG_CONFIG_HOME is invalid per the spec and ignored.
    assert config_dir({"XDG_CONFIG_HOME": "relative"}) == Path.home() / ".config" / "switchboard"
    assert config_dir({}) == Path.home() / ".config" / "switchboard"


def test_addresses_come_from_flags_then_environment_then_defaults() -> None:
    endpoints = Endpoints.resolve(
        {"auth": "flag:1", "registry": None},
        {"SWITCHBOARD_AUTH_ADDRESS": "env:1", "SWITCHBOARD_REGISTRY_ADDRESS": "env:2"},
    )
    assert endpoints.auth == "flag:1" and endpoints.registry == "env:2"
    assert endpoints.executor == DEFAULT_ADDRESSES["executor"] == "127.0.0.1:50053"
    assert endpoints.events == "127.0.0.1:50054"


def test_common_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--json", "--executor", "h:1", "runs", "list"])
    after = parser.parse_args(["runs", "list", "--json", "--executor", "h:2"])
    neither = parser.parse_args(["--executor", "h:3", "runs", "get", "r"])

    assert (before.json, before.executor) == (True, "h:1")
    assert (after.json, after.executor) == (True, "h:2")
    # Left out after the command, the value given before it stays.
    assert (neither.json, neither.executor, neither.timeout) == (False, "h:3", 30.0)


def rpc_error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, status.message, None)


def packed(message: object) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)  # type: ignore[arg-type]
    return value


def test_rpc_errors_read_as_code_message_and_details() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="input.text", description="must be a string"
    )
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message="too many runs queued",
        details=[
            packed(
                error_details_pb2.ErrorInfo(
                    reason="QUEUE_FULL", domain="switchboard.dev", metadata={"limit": "3"}
                )
            ),
            packed(error_details_pb2.BadRequest(field_violations=[violation])),
            packed(error_details_pb2.RetryInfo(retry_delay={"seconds": 2, "nanos": 500_000_000})),
        ],
    )

    error = describe_rpc_error(rpc_error(status), "executor")

    assert error.message == "RESOURCE_EXHAUSTED (executor): too many runs queued"
    assert error.details == [
        "reason: QUEUE_FULL",
        "  limit: 3",
        "field input.text: must be a string",
        "retry after 2.5s",
    ]
    document = error.document()["error"]
    assert document["exitCode"] == 1 and document["status"]["code"] == "RESOURCE_EXHAUSTED"
    assert document["status"]["details"][0] == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "QUEUE_FULL",
        "domain": "switchboard.dev",
        "metadata": {"limit": "3"},
    }


def test_an_error_without_details_still_says_what_to_check() -> None:
    bare = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection refused", None
    )
    error = describe_rpc_error(bare, "auth")
    assert error.message == "UNAVAILABLE (auth): connection refused"
    assert "is the service running" in error.details[0]


def test_agents_update_sends_a_mask_of_exactly_the_fields_given() -> None:
    args = build_parser().parse_args(
        [
            "agents",
            "update",
            "chaos",
            "--max-concurrency",
            "0",
            "--heartbeat-timeout-seconds",
            "2.5",
            "--max-backoff-seconds",
            "30",
            "--clear-non-retryable",
            "--label",
            "tier=gold",
        ]
    )

    request = update_request(args)

    assert list(request.update_mask.paths) == [
        "max_concurrency",
        "heartbeat_timeout",
        "retry_policy.max_backoff",
        "retry_policy.non_retryable_reasons",
        "labels",
    ]
    agent = request.agent
    assert agent.name == "chaos" and agent.max_concurrency == 0
    assert agent.heartbeat_timeout.ToMilliseconds() == 2500
    assert agent.retry_policy.max_backoff.seconds == 30
    assert list(agent.retry_policy.non_retryable_reasons) == [] and dict(agent.labels) == {"tier": "gold"}
    # A flag left out leaves its field alone.
    assert "description" not in request.update_mask.paths and "endpoint" not in request.update_mask.paths


def test_agents_update_without_a_field_is_refused_rather_than_sent_with_an_empty_mask() -> None:
    with pytest.raises(UsageError) as raised:
        update_request(build_parser().parse_args(["agents", "update", "chaos", "--request-id", "r-1"]))
    assert "at least one field" in raised.value.message


def test_agents_register_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text('{"name": "from-file", "endpoint": "h:1", "labels": {"a": "1"}, "tools": ["x"]}')
    args = build_parser().parse_args(
        ["agents", "register", "--from-file", str(path), "--label", "b=2", "--backoff-multiplier", "1.5"]
    )

    agent = agent_from_arguments(args)

    assert agent.name == "from-file" and agent.endpoint == "h:1" and list(agent.tools) == ["x"]
    assert dict(agent.labels) == {"b": "2"} and agent.retry_policy.backoff_multiplier == 1.5


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e30", "soon"])
def test_durations_that_no_duration_can_hold_are_usage_errors(value: str) -> None:
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["agents", "update", "chaos", "--timeout-seconds", value])
    assert raised.value.code == 2


async def test_waiting_for_a_runs_events_gives_up_at_the_bound_with_the_services_answer() -> None:
    stderr = io.StringIO()
    not_found = rpc_error(
        status_pb2.Status(
            code=code_pb2.NOT_FOUND,
            message="run r-1 not found",
            details=[packed(error_details_pb2.ErrorInfo(reason="RUN_NOT_FOUND", domain="switchboard.dev"))],
        )
    )
    pending = PendingEvents(Output(json_mode=False, stdout=io.StringIO(), stderr=stderr), "r-1", limit=0)

    with pytest.raises(CliError) as raised:
        await pending.still_missing(not_found)

    error = raised.value
    assert error.message == "run r-1 exists, but its events have not reached the events service in 0s"
    assert error.details[:2] == ["NOT_FOUND (events): run r-1 not found", "reason: RUN_NOT_FOUND"]
    assert "switchboard events tail r-1" in error.details[-1]
    assert error.document()["error"]["status"]["code"] == "NOT_FOUND"
    # Not a terminal: no spinner, no control characters.
    assert "\r" not in stderr.getvalue()
