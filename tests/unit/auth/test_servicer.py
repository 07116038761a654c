"""The servicer behind the real interceptor stack, in-process: validation answers
name every bad field, roles are enforced, public methods need no token, and no
message carries a traceback, SQL or a path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from switchboard.auth.v1 import auth_service_pb2, auth_service_pb2_grpc, user_pb2

from services.auth.servicer import PUBLIC_METHODS, AuthServicer
from services.common.convert import utcnow
from services.common.server import ServiceParts, build_interceptors
from tests.unit.auth.helpers import ADMIN_PASSWORD, PASSWORD, Auth

LEAKS = ("Traceback", 'File "', "SELECT", "INSERT", "sqlite", "sqlalchemy", "/tmp", "/work", ".py")


@dataclass
class Served:
    auth: Auth
    stub: auth_service_pb2_grpc.AuthServiceAsyncStub
    admin_token: str
    user_token: str


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def served(auth: Auth) -> AsyncIterator[Served]:
    servicer = AuthServicer(auth.domain)

    async def ready() -> bool:
        return True

    def add(server: grpc.aio.Server) -> list[str]:
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
        return []

    parts = ServiceParts(
        add_to_server=add, verifier=auth.verifier, check_ready=ready, public_methods=PUBLIC_METHODS
    )
    server = grpc.aio.server(interceptors=build_interceptors(parts))
    parts.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub: Any = auth_service_pb2_grpc.AuthServiceStub(channel)
    admin = await stub.Login(
        auth_service_pb2.LoginRequest(
            password=auth_service_pb2.PasswordCredentials(username="admin", password=ADMIN_PASSWORD)
        )
    )
    await stub.CreateUser(
        auth_service_pb2.CreateUserRequest(username="ada", password=PASSWORD, role=user_pb2.ROLE_USER),
        metadata=bearer(admin.tokens.access_token),
    )
    user = await stub.Login(
        auth_service_pb2.LoginRequest(
            password=auth_service_pb2.PasswordCredentials(username="ada", password=PASSWORD)
        )
    )
    yield Served(auth, stub, admin.tokens.access_token, user.tokens.access_token)
    await channel.close(grace=None)
    await server.stop(None)


async def failure(call: Any) -> tuple[grpc.StatusCode, status_pb2.Status]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    return raised.value.code(), status


def reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo")


def bad_fields(status: status_pb2.Status) -> set[str]:
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {violation.field for violation in bad.field_violations}
    raise AssertionError("no BadRequest")


async def test_create_user_names_every_bad_field(served: Served) -> None:
    code, status = await failure(
        served.stub.CreateUser(
            auth_service_pb2.CreateUserRequest(username="Ada!", password="short", request_id="r" * 200),
            metadata=bearer(served.admin_token),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(status) == {"username", "password", "role", "request_id"}


async def test_login_names_the_missing_credentials(served: Served) -> None:
    code, status = await failure(served.stub.Login(auth_service_pb2.LoginRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(status) == {"credentials"}
    _, status = await failure(
        served.stub.Login(auth_service_pb2.LoginRequest(password=auth_service_pb2.PasswordCredentials()))
    )
    assert bad_fields(status) == {"password.username", "password.password"}
    _, status = await failure(
        served.stub.Login(
            auth_service_pb2.LoginRequest(
                password=auth_service_pb2.PasswordCredentials(username="a" * 65, password="p" * 257)
            )
        )
    )
    assert bad_fields(status) == {"password.username", "password.password"}


async def test_create_api_key_checks_name_and_expiry(served: Served) -> None:
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(utcnow() - timedelta(minutes=1))
    code, status = await failure(
        served.stub.CreateApiKey(
            auth_service_pb2.CreateApiKeyRequest(display_name="", expire_time=past),
            metadata=bearer(served.user_token),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(status) == {"display_name", "expire_time"}
    _, status = await failure(
        served.stub.CreateApiKey(
            auth_service_pb2.CreateApiKeyRequest(display_name="x" * 101), metadata=bearer(served.user_token)
        )
    )
    assert bad_fields(status) == {"display_name"}


async def test_token_fields_are_required(served: Served) -> None:
    for call, field in (
        (served.stub.RefreshToken(auth_service_pb2.RefreshTokenRequest()), "refresh_token"),
        (
            served.stub.RevokeToken(
                auth_service_pb2.RevokeTokenRequest(), metadata=bearer(served.user_token)
            ),
            "token",
        ),
        (
            served.stub.IntrospectToken(
                auth_service_pb2.IntrospectTokenRequest(), metadata=bearer(served.user_token)
            ),
            "token",
        ),
        (
            served.stub.RevokeApiKey(
                auth_service_pb2.RevokeApiKeyRequest(), metadata=bearer(served.user_token)
            ),
            "api_key_id",
        ),
    ):
        code, status = await failure(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(status) == {field}


async def test_a_user_may_not_create_users(served: Served) -> None:
    # Refused before validation: a non-admin learns nothing of the rules.
    code, status = await failure(
        served.stub.CreateUser(auth_service_pb2.CreateUserRequest(), metadata=bearer(served.user_token))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and reason(status) == "ROLE_REQUIRED"


async def test_public_methods_need_no_token_and_the_rest_do(served: Served) -> None:
    jwks = await served.stub.GetJwks(auth_service_pb2.GetJwksRequest())
    assert [(k.kty, k.crv, k.alg, k.use) for k in jwks.keys] == [("OKP", "Ed25519", "EdDSA", "sig")]
    feed = await served.stub.ListTokenRevocations(auth_service_pb2.ListTokenRevocationsRequest())
    assert list(feed.revocations) == [] and feed.last_sequence == 0
    for metadata, expected in (
        ((), "TOKEN_MISSING"),
        ((("authorization", "Basic abc"),), "TOKEN_MALFORMED"),
        (bearer("not-a-jwt"), "TOKEN_INVALID"),
    ):
        code, status = await failure(
            served.stub.GetCurrentUser(auth_service_pb2.GetCurrentUserRequest(), metadata=metadata)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED and reason(status) == expected


async def test_round_trip_of_the_authenticated_methods(served: Served) -> None:
    me = await served.stub.GetCurrentUser(
        auth_service_pb2.GetCurrentUserRequest(), metadata=bearer(served.user_token)
    )
    assert (
        me.user.username == "ada" and me.user.role == user_pb2.ROLE_USER and me.user.HasField("create_time")
    )
    created = await served.stub.CreateApiKey(
        auth_service_pb2.CreateApiKeyRequest(display_name="laptop", request_id="k1"),
        metadata=bearer(served.user_token),
    )
    assert created.secret.startswith(f"sb_{created.api_key.api_key_id}_")
    assert not created.api_key.HasField("expire_time")
    repeat = await served.stub.CreateApiKey(
        auth_service_pb2.CreateApiKeyRequest(display_name="laptop", request_id="k1"),
        metadata=bearer(served.user_token),
    )
    assert repeat.api_key.api_key_id == created.api_key.api_key_id and repeat.secret == ""
    for name in ("b", "c"):
        await served.stub.CreateApiKey(
            auth_service_pb2.CreateApiKeyRequest(display_name=name), metadata=bearer(served.user_token)
        )
    page = await served.stub.ListApiKeys(
        auth_service_pb2.ListApiKeysRequest(page_size=2), metadata=bearer(served.user_token)
    )
    rest = await served.stub.ListApiKeys(
        auth_service_pb2.ListApiKeysRequest(page_size=2, page_token=page.next_page_token),
        metadata=bearer(served.user_token),
    )
    assert len(page.api_keys) == 2 and len(rest.api_keys) == 1 and rest.next_page_token == ""
    # A page token is bound to its user.
    code, status = await failure(
        served.stub.ListApiKeys(
            auth_service_pb2.ListApiKeysRequest(page_token=page.next_page_token),
            metadata=bearer(served.admin_token),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(status) == {"page_token"}
    login = await served.stub.Login(auth_service_pb2.LoginRequest(api_key=created.secret))
    assert login.user.username == "ada" and login.tokens.token_type == "Bearer"
    seen = await served.stub.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=login.tokens.access_token),
        metadata=bearer(served.user_token),
    )
    assert seen.active and seen.role == user_pb2.ROLE_USER and seen.token_id
    session_id = (await served.auth.principal(login.tokens.access_token)).session_id
    revoked = await served.stub.RevokeApiKey(
        auth_service_pb2.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id),
        metadata=bearer(served.user_token),
    )
    assert revoked.api_key.HasField("revoke_time")
    code, status = await failure(served.stub.Login(auth_service_pb2.LoginRequest(api_key=created.secret)))
    assert code == grpc.StatusCode.UNAUTHENTICATED and reason(status) == "API_KEY_REVOKED"
    # The session opened with the key is over: it is in the feed.
    feed = await served.stub.ListTokenRevocations(auth_service_pb2.ListTokenRevocationsRequest())
    assert [entry.session_id for entry in feed.revocations] == [session_id]
    assert feed.last_sequence == feed.revocations[0].sequence


async def test_throttled_login_carries_retry_info(served: Served) -> None:
    wrong = auth_service_pb2.LoginRequest(
        password=auth_service_pb2.PasswordCredentials(username="ada", password="wrong password!!")
    )
    for _ in range(5):
        code, status = await failure(served.stub.Login(wrong))
        assert code == grpc.StatusCode.UNAUTHENTICATED and reason(status) == "INVALID_CREDENTIALS"
    code, status = await failure(served.stub.Login(wrong))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(status) == "LOGIN_THROTTLED"
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.seconds > 0


async def test_no_message_leaks_a_traceback_sql_or_path(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = []

    async def explode(*args: object) -> None:
        raise RuntimeError('SELECT * FROM users -- File "/work/main/services/auth/domain.py"')

    monkeypatch.setattr(served.auth.domain, "current_user", explode)
    code, status = await failure(
        served.stub.GetCurrentUser(
            auth_service_pb2.GetCurrentUserRequest(), metadata=bearer(served.user_token)
        )
    )
    assert code == grpc.StatusCode.INTERNAL
    messages.append(status.message)
    # The database losing a table: an honest UNAVAILABLE, without the SQL.
    async with served.auth.storage.engine.begin() as connection:
        await connection.exec_driver_sql("DROP TABLE api_keys")
    code, status = await failure(
        served.stub.ListApiKeys(auth_service_pb2.ListApiKeysRequest(), metadata=bearer(served.user_token))
    )
    assert code == grpc.StatusCode.UNAVAILABLE and reason(status) == "DATABASE_UNAVAILABLE"
    messages.append(status.message)
    for call in (
        served.stub.Login(auth_service_pb2.LoginRequest(api_key="sb_x_y")),
        served.stub.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token="sbr_nothing")),
        served.stub.RevokeToken(
            auth_service_pb2.RevokeTokenRequest(token="a.b.c"), metadata=bearer(served.user_token)
        ),
        served.stub.CreateUser(
            auth_service_pb2.CreateUserRequest(username="ada", password=PASSWORD, role=user_pb2.ROLE_USER),
            metadata=bearer(served.admin_token),
        ),
    ):
        _, status = await failure(call)
        messages.append(status.message)
    assert len(messages) == 6
    for message in messages:
        assert message and not any(leak in message for leak in LEAKS), message
