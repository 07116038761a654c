"""The CLI's credentials file, addresses, option parsing and error text, in-process."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from switchboard.auth.v1 import token_pb2

from switchboard_client.cli.credentials import CredentialStore, StoredLogin
from switchboard_client.cli.errors import CliError, describe_rpc_error
from switchboard_client.cli.main import build_parser
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
