"""The auth service as a real process (`python -m services.auth`), through
generated stubs only: login, refresh, revocation seen by a verifying service,
key rotation, and the UNAUTHENTICATED reasons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from switchboard.auth.v1 import auth_service_pb2, user_pb2

from services.common.auth import RemoteKeySource, RemoteRevocationFeed, TokenVerifier
from services.common.errors import Unauthenticated
from tests.harness.suite import TEST_PASSWORD, Suite, start_suite


@pytest.fixture(scope="module")
async def auth_suite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    async with start_suite(tmp_path_factory.mktemp("auth"), services=("auth",)) as suite:
        yield suite


def password_login(username: str, password: str) -> auth_service_pb2.LoginRequest:
    return auth_service_pb2.LoginRequest(
        password=auth_service_pb2.PasswordCredentials(username=username, password=password)
    )


async def rpc_failure(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and ErrorInfo reason of a failed call."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return raised.value.code(), info.reason
    raise AssertionError("no ErrorInfo")


async def who(suite: Suite, token: str) -> auth_service_pb2.GetCurrentUserResponse:
    return await suite.auth_stub().GetCurrentUser(
        auth_service_pb2.GetCurrentUserRequest(), metadata=suite.metadata(token), timeout=10
    )


class RemoteVerifier:
    """What every other service runs: keys from GetJwks, revocations polled every second."""

    def __init__(self, suite: Suite) -> None:
        stub = suite.auth_stub()
        self.keys = RemoteKeySource(stub)
        self.feed = RemoteRevocationFeed(stub, poll_seconds=1.0)
        self.verifier = TokenVerifier(self.keys, self.feed, "switchboard-auth", "switchboard")

    async def __aenter__(self) -> TokenVerifier:
        await self.keys.refresh()
        await self.feed.poll_once()
        self.feed.start()
        return self.verifier

    async def __aexit__(self, *exc: object) -> None:
        await self.feed.stop()


async def test_login_refresh_and_current_user(auth_suite: Suite) -> None:
    stub = auth_suite.auth_stub()
    user_id, _ = await auth_suite.create_user("grace")
    login = await stub.Login(password_login("grace", TEST_PASSWORD), timeout=10)
    assert login.user.user_id == user_id and login.user.role == user_pb2.ROLE_USER
    assert login.tokens.token_type == "Bearer" and login.tokens.refresh_token
    assert (await who(auth_suite, login.tokens.access_token)).user.username == "grace"
    renewed = await stub.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=login.tokens.refresh_token), timeout=10
    )
    assert (await who(auth_suite, renewed.tokens.access_token)).user.user_id == user_id
    claims = [
        jwt.decode(token, options={"verify_signature": False})
        for token in (login.tokens.access_token, renewed.tokens.access_token)
    ]
    assert claims[0]["sid"] == claims[1]["sid"] and claims[0]["jti"] != claims[1]["jti"]
    # Spending the first refresh token again revokes the family.
    code, reason = await rpc_failure(
        stub.RefreshToken(auth_service_pb2.RefreshTokenRequest(refresh_token=login.tokens.refresh_token))
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    code, reason = await rpc_failure(
        stub.GetCurrentUser(
            auth_service_pb2.GetCurrentUserRequest(),
            metadata=auth_suite.metadata(renewed.tokens.access_token),
        )
    )
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")


async def test_wrong_password_and_unknown_user_look_the_same(auth_suite: Suite) -> None:
    stub = auth_suite.auth_stub()
    wrong = await rpc_failure(stub.Login(password_login(auth_suite.admin_username, "not the password!")))
    unknown = await rpc_failure(stub.Login(password_login("nobody-here", "not the password!")))
    assert wrong == unknown == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def test_missing_malformed_and_invalid_tokens_say_why(auth_suite: Suite) -> None:
    stub = auth_suite.auth_stub()
    request = auth_service_pb2.GetCurrentUserRequest()
    cases = [
        ((), "TOKEN_MISSING"),
        ((("authorization", "Token abc"),), "TOKEN_MALFORMED"),
        (auth_suite.metadata("not-a-jwt"), "TOKEN_INVALID"),
    ]
    for metadata, expected in cases:
        assert await rpc_failure(stub.GetCurrentUser(request, metadata=metadata)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            expected,
        )


async def test_a_revoked_token_is_refused_by_a_verifying_service_within_5_seconds(auth_suite: Suite) -> None:
    _, token = await auth_suite.create_user("linus")
    async with RemoteVerifier(auth_suite) as verifier:
        assert (await verifier.verify(token)).username == "linus"
        await auth_suite.auth_stub().RevokeToken(
            auth_service_pb2.RevokeTokenRequest(token=token), metadata=auth_suite.metadata(token), timeout=10
        )
        # Auth itself refuses it at once.
        code, reason = await rpc_failure(
            auth_suite.auth_stub().GetCurrentUser(
                auth_service_pb2.GetCurrentUserRequest(), metadata=auth_suite.metadata(token)
            )
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        revoked_at = time.monotonic()
        while True:
            try:
                await verifier.verify(token)
            except Unauthenticated as exc:
                assert exc.reason == "TOKEN_REVOKED"
                break
            assert time.monotonic() - revoked_at < 5.0, "still accepted 5 s after revocation"
            await asyncio.sleep(0.1)


async def test_two_users_at_once_see_only_their_own_keys(auth_suite: Suite) -> None:
    (_, ann), (_, bob) = await asyncio.gather(auth_suite.create_user("ann"), auth_suite.create_user("bob"))
    stub = auth_suite.auth_stub()

    async def make_keys(token: str, prefix: str) -> list[str]:
        created = await asyncio.gather(
            *(
                stub.CreateApiKey(
                    auth_service_pb2.CreateApiKeyRequest(display_name=f"{prefix}-{n}"),
                    metadata=auth_suite.metadata(token),
                    timeout=10,
                )
                for n in range(3)
            )
        )
        return sorted(response.api_key.api_key_id for response in created)

    ann_keys, bob_keys = await asyncio.gather(make_keys(ann, "ann"), make_keys(bob, "bob"))
    for token, expected in ((ann, ann_keys), (bob, bob_keys)):
        listed = await stub.ListApiKeys(
            auth_service_pb2.ListApiKeysRequest(), metadata=auth_suite.metadata(token), timeout=10
        )
        assert sorted(key.api_key_id for key in listed.api_keys) == expected
    code, reason = await rpc_failure(
        stub.RevokeApiKey(
            auth_service_pb2.RevokeApiKeyRequest(api_key_id=ann_keys[0]), metadata=auth_suite.metadata(bob)
        )
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    seen = await stub.IntrospectToken(
        auth_service_pb2.IntrospectTokenRequest(token=ann), metadata=auth_suite.metadata(bob), timeout=10
    )
    assert not seen.active and seen.user_id == ""


async def test_rotation_keeps_old_tokens_valid_until_they_expire(tmp_path: Path) -> None:
    env = {
        "auth": {
            "SWITCHBOARD_AUTH_KEY_ROTATION_SECONDS": "4",
            "SWITCHBOARD_AUTH_ACCESS_TOKEN_TTL_SECONDS": "12",
        }
    }
    async with start_suite(tmp_path, services=("auth",), env=env) as suite:
        stub = suite.auth_stub()
        old_token = await suite.admin_token()
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        async with RemoteVerifier(suite) as verifier:
            assert (await verifier.verify(old_token)).username == suite.admin_username
            # A new key is published first, then signs: wait for a token of it.
            deadline = time.monotonic() + 12
            while True:
                new_token = await suite.admin_token()
                if jwt.get_unverified_header(new_token)["kid"] != old_kid:
                    break
                assert time.monotonic() < deadline, "the signing key did not rotate"
                await asyncio.sleep(0.3)
            jwks = await stub.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=10)
            assert old_kid in {key.kid for key in jwks.keys}
            # Both verify, in auth and in a service that learned the new key on sight.
            for token in (old_token, new_token):
                assert (await verifier.verify(token)).username == suite.admin_username
                assert (await who(suite, token)).user.username == suite.admin_username
            # Once expired (TTL 12 s + 5 s leeway), the old token is refused as such.
            deadline = time.monotonic() + 20
            while True:
                try:
                    await verifier.verify(old_token)
                except Unauthenticated as exc:
                    assert exc.reason == "TOKEN_EXPIRED"
                    break
                assert time.monotonic() < deadline, "the token never expired"
                await asyncio.sleep(0.5)
        code, reason = await rpc_failure(
            stub.GetCurrentUser(auth_service_pb2.GetCurrentUserRequest(), metadata=suite.metadata(old_token))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


async def test_a_first_start_without_admin_password_stops_naming_the_variable(tmp_path: Path) -> None:
    env = {"auth": {"SWITCHBOARD_AUTH_ADMIN_PASSWORD": ""}}
    with pytest.raises(RuntimeError) as raised:
        async with start_suite(tmp_path, services=("auth",), env=env):
            pass
    assert "SWITCHBOARD_AUTH_ADMIN_PASSWORD" in str(raised.value)
