from __future__ import annotations

import time

import jwt
import pytest

from services.common.auth import Principal, Role, TokenVerifier, bearer_token
from services.common.errors import PermissionDenied, Unauthenticated
from tests.unit.common.keys import AUDIENCE, ISSUER, Keys, Revocations


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def revocations() -> Revocations:
    return Revocations()


@pytest.fixture
def verifier(keys: Keys, revocations: Revocations) -> TokenVerifier:
    return TokenVerifier(keys, revocations, ISSUER, AUDIENCE)


async def reason_of(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as raised:
        await verifier.verify(token)
    return raised.value.reason


async def test_valid_token_gives_the_principal(keys: Keys, verifier: TokenVerifier) -> None:
    kid = keys.add()
    principal = await verifier.verify(keys.sign(kid))
    assert principal.user_id == "user-1"
    assert principal.role is Role.USER
    assert principal.session_id == "family-1"


async def test_tokens_of_a_rotated_key_stay_valid(keys: Keys, verifier: TokenVerifier) -> None:
    old = keys.add()
    old_token = keys.sign(old)
    new = keys.add()
    assert (await verifier.verify(keys.sign(new))).user_id == "user-1"
    assert (await verifier.verify(old_token)).user_id == "user-1"


async def test_expired_revoked_and_forged_tokens_say_why(
    keys: Keys, revocations: Revocations, verifier: TokenVerifier
) -> None:
    kid = keys.add()
    assert await reason_of(verifier, keys.sign(kid, exp=int(time.time()) - 60)) == "TOKEN_EXPIRED"
    revoked = keys.sign(kid, jti="revoked-jti")
    revocations.token_ids.add("revoked-jti")
    assert await reason_of(verifier, revoked) == "TOKEN_REVOKED"
    revocations.session_ids.add("family-2")
    assert await reason_of(verifier, keys.sign(kid, sid="family-2")) == "TOKEN_REVOKED"
    assert await reason_of(verifier, keys.sign(kid, aud="someone-else")) == "TOKEN_INVALID"
    assert await reason_of(verifier, keys.sign(kid, role="root")) == "TOKEN_INVALID"
    assert await reason_of(verifier, "not.a.jwt") == "TOKEN_INVALID"
    # Signed by a key the auth service never published.
    stranger = Keys()
    stranger_kid = stranger.add()
    assert await reason_of(verifier, stranger.sign(stranger_kid)) == "TOKEN_INVALID"
    # An HS256 token using the public key as a secret (algorithm confusion).
    forged = jwt.encode({"sub": "admin"}, "s" * 32, algorithm="HS256", headers={"kid": kid})
    assert await reason_of(verifier, forged) == "TOKEN_INVALID"


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    with pytest.raises(Unauthenticated) as missing:
        bearer_token((("x-other", "1"),))
    assert missing.value.reason == "TOKEN_MISSING"
    with pytest.raises(Unauthenticated) as malformed:
        bearer_token((("authorization", "Basic abc"),))
    assert malformed.value.reason == "TOKEN_MALFORMED"


def test_require_role() -> None:
    principal = Principal("u", "ada", Role.USER, "j", "s", time.time() + 60)
    principal.require_role(Role.USER, Role.ADMIN)
    with pytest.raises(PermissionDenied):
        principal.require_role(Role.ADMIN)
