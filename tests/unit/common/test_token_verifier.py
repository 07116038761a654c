from __future__ import annotations

import time

import jwt
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from services.common.auth import (
    LEEWAY_SECONDS,
    Principal,
    Role,
    TokenVerifier,
    VerifiedTokenCache,
    bearer_token,
)
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.metrics import TOKEN_VERIFICATION_FAILURES
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


# -- the cache of verified tokens ---------------------------------------------


class Clock:
    """Seconds since the epoch, moved by hand (starts at the real time, which
    PyJWT uses for a token's first check)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_verified_token_is_checked_once_then_served_from_the_cache(keys: Keys) -> None:
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE)
    kid = keys.add()
    token = keys.sign(kid)
    first = await verifier.verify(token)
    # The same principal object: the signature and claims were not decoded again.
    assert await verifier.verify(token) is first
    assert token in verifier.cache and len(verifier.cache) == 1


async def test_a_cached_token_is_refused_once_it_or_its_session_is_revoked(keys: Keys) -> None:
    revocations = Revocations()
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE)
    kid = keys.add()
    by_token, by_session = keys.sign(kid, jti="jti-a"), keys.sign(kid, sid="family-b")
    await verifier.verify(by_token)
    await verifier.verify(by_session)
    assert by_token in verifier.cache and by_session in verifier.cache

    revocations.token_ids.add("jti-a")
    assert await reason_of(verifier, by_token) == "TOKEN_REVOKED"
    assert (await verifier.verify(by_session)).session_id == "family-b"
    revocations.session_ids.add("family-b")
    assert await reason_of(verifier, by_session) == "TOKEN_REVOKED"
    # Still refused on every later call.
    assert await reason_of(verifier, by_token) == "TOKEN_REVOKED"


async def test_a_cached_token_is_refused_once_expired_with_the_same_leeway(keys: Keys) -> None:
    clock = Clock()
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE, clock=clock)
    kid = keys.add()
    expires = int(clock.now) + 60
    token = keys.sign(kid, exp=expires)
    await verifier.verify(token)

    clock.now = expires + LEEWAY_SECONDS - 1  # inside the leeway a fresh check allows
    assert (await verifier.verify(token)).expires_at == expires
    clock.now = expires + LEEWAY_SECONDS
    assert await reason_of(verifier, token) == "TOKEN_EXPIRED"
    assert token not in verifier.cache


async def test_a_cached_token_is_refused_once_its_key_is_no_longer_published(keys: Keys) -> None:
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE)
    kid = keys.add()
    token = keys.sign(kid)
    await verifier.verify(token)
    keys.remove(kid)
    assert await reason_of(verifier, token) == "TOKEN_INVALID"
    assert token not in verifier.cache


async def test_refused_tokens_are_never_cached(keys: Keys) -> None:
    revocations = Revocations()
    verifier = TokenVerifier(keys, revocations, ISSUER, AUDIENCE)
    kid = keys.add()
    revocations.token_ids.add("revoked-jti")
    for token in (
        keys.sign(kid, exp=int(time.time()) - 60),
        keys.sign(kid, jti="revoked-jti"),
        keys.sign(kid, aud="someone-else"),
        "not.a.jwt",
    ):
        with pytest.raises(Unauthenticated):
            await verifier.verify(token)
    assert len(verifier.cache) == 0


async def test_the_cache_is_bounded_and_forgets_the_least_recently_used(keys: Keys) -> None:
    verifier = TokenVerifier(keys, Revocations(), ISSUER, AUDIENCE, cache_size=3)
    kid = keys.add()
    tokens = [keys.sign(kid, sub=f"user-{index}") for index in range(5)]
    for token in tokens[:3]:
        await verifier.verify(token)
    await verifier.verify(tokens[0])  # used again: now the most recent
    for token in tokens[3:]:
        await verifier.verify(token)

    assert len(verifier.cache) == 3
    assert [token in verifier.cache for token in tokens] == [True, False, False, True, True]
    # A forgotten token is simply checked again.
    assert (await verifier.verify(tokens[1])).user_id == "user-1"
    assert len(verifier.cache) == 3


async def test_refusals_of_cached_tokens_are_counted_by_reason(keys: Keys) -> None:
    reader = InMemoryMetricReader()
    clock, revocations = Clock(), Revocations()
    verifier = TokenVerifier(
        keys,
        revocations,
        ISSUER,
        AUDIENCE,
        meter_provider=MeterProvider(metric_readers=[reader]),
        clock=clock,
    )
    kid = keys.add()
    expiring, revoked = keys.sign(kid, exp=int(clock.now) + 60), keys.sign(kid, jti="jti-r")
    await verifier.verify(expiring)
    await verifier.verify(revoked)
    revocations.token_ids.add("jti-r")
    await reason_of(verifier, revoked)
    clock.now += 120
    await reason_of(verifier, expiring)

    counts = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == TOKEN_VERIFICATION_FAILURES:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        counts[(point.attributes or {})["error.type"]] = point.value
    assert counts["revoked"] == 1 and counts["expired"] == 1


def test_a_cache_size_below_zero_is_refused() -> None:
    with pytest.raises(ValueError):
        VerifiedTokenCache(-1)
