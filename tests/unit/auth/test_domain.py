"""The auth rules, in-process on SQLite: passwords, tokens, key rotation,
refresh-token families, throttling, revocation, introspection, API keys."""

from __future__ import annotations

from datetime import timedelta

import jwt
import pytest

from services.auth.domain import AdminPasswordRequired, BootstrapError
from services.auth.tokens import parse_api_key
from services.common.auth import Role
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from tests.unit.auth.conftest import MakeAuth
from tests.unit.auth.helpers import ACCESS_TTL, ADMIN_PASSWORD, AUDIENCE, ISSUER, PASSWORD, Auth, Clock


async def refused(awaitable: object) -> str:
    """The ErrorInfo reason of an Unauthenticated failure."""
    with pytest.raises(Unauthenticated) as raised:
        await awaitable  # type: ignore[misc]
    return raised.value.reason


# --- passwords and login -----------------------------------------------------


async def test_passwords_are_stored_as_argon2id_hashes(auth: Auth) -> None:
    await auth.user("ada")
    async with auth.storage.transaction(write=False) as tx:
        row = await tx.get_user_by_username("ada")
    assert row is not None
    assert row.password_hash.startswith("$argon2id$")
    assert PASSWORD not in row.password_hash


async def test_login_issues_an_eddsa_token_with_every_claim(auth: Auth) -> None:
    user, tokens = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    header = jwt.get_unverified_header(tokens.access_token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == auth.domain.keys.signing_key().kid
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["sub"] == user.user_id and claims["name"] == "admin" and claims["role"] == "admin"
    assert claims["jti"] and claims["sid"]
    assert claims["exp"] > claims["iat"]
    principal = await auth.principal(tokens.access_token)
    assert (principal.user_id, principal.role) == (user.user_id, Role.ADMIN)
    assert tokens.refresh_token.startswith("sbr_")
    assert tokens.refresh_expires_at > tokens.access_expires_at


async def test_unknown_user_and_wrong_password_get_the_same_answer(auth: Auth) -> None:
    with pytest.raises(Unauthenticated) as wrong_password:
        await auth.domain.login_with_password("admin", "not the admin password")
    before = auth.hasher.verifications
    with pytest.raises(Unauthenticated) as unknown_user:
        await auth.domain.login_with_password("nobody", "not the admin password")
    assert wrong_password.value.reason == unknown_user.value.reason == "INVALID_CREDENTIALS"
    assert wrong_password.value.message == unknown_user.value.message
    # The unknown user still cost one hash verification, so timing does not tell.
    assert auth.hasher.verifications == before + 1


async def test_expired_access_token_is_refused(make_auth: MakeAuth) -> None:
    clock = Clock()
    auth = await make_auth(clock, access_ttl_seconds=60)
    _, tokens = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)  # expired an hour ago
    assert await refused(auth.verifier.verify(tokens.access_token)) == "TOKEN_EXPIRED"


# --- throttling --------------------------------------------------------------


async def fail_logins(auth: Auth, username: str, times: int) -> None:
    for _ in range(times):
        assert await refused(auth.domain.login_with_password(username, "wrong password!!")) == (
            "INVALID_CREDENTIALS"
        )


async def test_five_failures_throttle_the_username_until_the_window_passes(auth: Auth) -> None:
    await auth.user("ada")
    await fail_logins(auth, "admin", 5)
    with pytest.raises(ResourceExhausted) as raised:
        await auth.domain.login_with_password("admin", ADMIN_PASSWORD)  # even the right password
    assert raised.value.reason == "LOGIN_THROTTLED"
    assert raised.value.retry_after == pytest.approx(300, abs=1)
    # Other usernames are not affected.
    await auth.domain.login_with_password("ada", PASSWORD)
    auth.clock.advance(150)
    with pytest.raises(ResourceExhausted) as again:
        await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    assert again.value.retry_after == pytest.approx(150, abs=1)
    auth.clock.advance(151)
    await auth.domain.login_with_password("admin", ADMIN_PASSWORD)


async def test_unknown_usernames_are_throttled_too(auth: Auth) -> None:
    await fail_logins(auth, "nobody", 5)
    with pytest.raises(ResourceExhausted):
        await auth.domain.login_with_password("nobody", "wrong password!!")


async def test_a_success_resets_the_count(auth: Auth) -> None:
    await fail_logins(auth, "admin", 4)
    await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    await fail_logins(auth, "admin", 5)
    with pytest.raises(ResourceExhausted):
        await auth.domain.login_with_password("admin", ADMIN_PASSWORD)


async def test_throttling_survives_a_restart_and_follows_the_configuration(make_auth: MakeAuth) -> None:
    clock = Clock()
    first = await make_auth(clock, max_failures=2, window_seconds=60)
    await fail_logins(first, "admin", 2)
    restarted = await make_auth(clock, max_failures=2, window_seconds=60)
    with pytest.raises(ResourceExhausted) as raised:
        await restarted.domain.login_with_password("admin", ADMIN_PASSWORD)
    assert raised.value.retry_after == pytest.approx(60, abs=1)


# --- signing keys ------------------------------------------------------------


async def test_rotation_keeps_tokens_of_the_old_key_valid(make_auth: MakeAuth) -> None:
    clock = Clock()
    auth = await make_auth(clock, rotation_seconds=60)
    old_kid = auth.domain.keys.signing_key().kid
    _, old = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    assert not await auth.domain.keys.rotate_if_due()  # not due yet
    clock.advance(61)
    assert await auth.domain.keys.rotate_if_due()
    # Published at once, signing only after the lead (verifiers learn it first).
    new_kid = next(key.kid for key in auth.domain.jwks() if key.kid != old_kid)
    assert auth.domain.keys.signing_key().kid == old_kid
    clock.advance(auth.domain.keys.publish_lead.total_seconds())
    assert auth.domain.keys.signing_key().kid == new_kid
    _, new = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    assert jwt.get_unverified_header(new.access_token)["kid"] == new_kid
    assert {key.kid for key in auth.domain.jwks()} == {old_kid, new_kid}
    assert (await auth.principal(old.access_token)).username == "admin"
    # Once every token of the old key has expired (+ the reload interval and
    # the leeway), it leaves the key set.
    clock.advance(ACCESS_TTL + 15 + 5 - 1)
    assert {key.kid for key in auth.domain.jwks()} == {old_kid, new_kid}
    clock.advance(2)
    assert [key.kid for key in auth.domain.jwks()] == [new_kid]


async def test_a_replica_verifies_tokens_of_a_key_it_has_not_loaded_yet(make_auth: MakeAuth) -> None:
    clock = Clock()
    first = await make_auth(clock, rotation_seconds=60)
    replica = await make_auth(clock, rotation_seconds=60)
    clock.advance(61)
    await first.domain.keys.rotate_if_due()
    clock.advance(first.domain.keys.publish_lead.total_seconds())
    _, tokens = await first.domain.login_with_password("admin", ADMIN_PASSWORD)
    assert (await replica.principal(tokens.access_token)).username == "admin"


# --- refresh tokens ----------------------------------------------------------


async def test_refresh_rotates_within_the_same_family(auth: Auth) -> None:
    _, first = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    second = await auth.domain.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    old, new = [await auth.principal(t.access_token) for t in (first, second)]
    assert old.session_id == new.session_id
    assert old.token_id != new.token_id
    third = await auth.domain.refresh(second.refresh_token)
    assert (await auth.principal(third.access_token)).session_id == old.session_id


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(auth: Auth) -> None:
    _, first = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    second = await auth.domain.refresh(first.refresh_token)
    session_id = (await auth.principal(second.access_token)).session_id
    assert await refused(auth.domain.refresh(first.refresh_token)) == "REFRESH_TOKEN_REUSED"
    # The newest refresh token and every access token of the family are dead.
    assert await refused(auth.domain.refresh(second.refresh_token)) == "TOKEN_REVOKED"
    assert await refused(auth.verifier.verify(first.access_token)) == "TOKEN_REVOKED"
    assert await refused(auth.verifier.verify(second.access_token)) == "TOKEN_REVOKED"
    feed, _ = await auth.domain.list_revocations(0, 100)
    assert [entry.session_id for entry in feed] == [session_id]
    # Other sessions of the same user are untouched.
    _, other = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    await auth.principal(other.access_token)


async def test_expired_and_unknown_refresh_tokens_are_refused(make_auth: MakeAuth) -> None:
    clock = Clock()
    auth = await make_auth(clock, refresh_ttl_seconds=120)
    _, tokens = await auth.domain.login_with_password("admin", ADMIN_PASSWORD)
    clock.advance(121)
    assert await refused(auth.domain.refresh(tokens.refresh_token)) == "REFRESH_TOKEN_EXPIRED"
    assert await refused(auth.domain.refresh("sbr_not-a-token")) == "TOKEN_INVALID"


# --- revocation --------------------------------------------------------------


async def test_a_user_revokes_their_own_access_token(auth: Auth) -> None:
    ada, token = await auth.user("ada")
    await auth.domain.revoke_token(ada, token)
    assert await refused(auth.verifier.verify(token)) == "TOKEN_REVOKED"
    feed, last = await auth.domain.list_revocations(0, 100)
    assert [(entry.token_id, entry.session_id) for entry in feed] == [(ada.token_id, None)]
    assert last == feed[-1].sequence
    await auth.domain.revoke_token(ada, token)  # idempotent
    assert len((await auth.domain.list_revocations(0, 100))[0]) == 1


async def test_revoking_a_refresh_token_revokes_its_family(auth: Auth) -> None:
    ada, _ = await auth.user("ada")
    _, tokens = await auth.domain.login_with_password("ada", PASSWORD)
    await auth.domain.revoke_token(ada, tokens.refresh_token)
    assert await refused(auth.domain.refresh(tokens.refresh_token)) == "TOKEN_REVOKED"
    assert await refused(auth.verifier.verify(tokens.access_token)) == "TOKEN_REVOKED"


async def test_only_admins_revoke_other_users_tokens(auth: Auth) -> None:
    _, ada_token = await auth.user("ada")
    bob, bob_token = await auth.user("bob")
    with pytest.raises(NotFound):
        await auth.domain.revoke_token(bob, ada_token)
    with pytest.raises(NotFound):
        await auth.domain.revoke_token(bob, "sbr_someone-elses")
    await auth.principal(ada_token)
    await auth.domain.revoke_token(await auth.admin(), bob_token)
    assert await refused(auth.verifier.verify(bob_token)) == "TOKEN_REVOKED"


async def test_another_replica_learns_revocations_from_the_database(make_auth: MakeAuth) -> None:
    clock = Clock()
    first = await make_auth(clock)
    replica = await make_auth(clock)
    ada, token = await first.user("ada")
    await replica.principal(token)
    await first.domain.revoke_token(ada, token)
    await replica.principal(token)  # not polled yet
    await replica.domain.revocations.refresh()
    assert await refused(replica.verifier.verify(token)) == "TOKEN_REVOKED"


async def test_the_feed_pages_in_sequence_order_and_drops_expired_entries(auth: Auth) -> None:
    admin = await auth.admin()
    tokens = [(await auth.domain.login_with_password("admin", ADMIN_PASSWORD))[1] for _ in range(3)]
    for pair in tokens:
        await auth.domain.revoke_token(admin, pair.access_token)
    page, last = await auth.domain.list_revocations(0, 2)
    assert len(page) == 2 and page[0].sequence < page[1].sequence and last == page[1].sequence
    rest, last = await auth.domain.list_revocations(last, 2)
    assert len(rest) == 1 and last == rest[0].sequence
    auth.clock.advance(7 * 3600)  # every revoked token has expired
    assert (await auth.domain.list_revocations(0, 10))[0] == []


# --- introspection -----------------------------------------------------------


async def test_users_introspect_only_their_own_tokens(auth: Auth) -> None:
    ada, ada_token = await auth.user("ada")
    _, bob_token = await auth.user("bob")
    own = await auth.domain.introspect(ada, ada_token)
    assert own.active and own.user_id == ada.user_id and own.username == "ada" and own.role is Role.USER
    assert own.token_id == ada.token_id and own.expires_at is not None
    other = await auth.domain.introspect(ada, bob_token)
    assert not other.active and other.inactive_reason == "TOKEN_INVALID" and other.user_id == ""


async def test_admins_and_services_introspect_any_token(make_auth: MakeAuth) -> None:
    auth = await make_auth(service_accounts={"svc-executor": "service password 1"})
    _, ada_token = await auth.user("ada")
    _, service_tokens = await auth.domain.login_with_password("svc-executor", "service password 1")
    service = await auth.principal(service_tokens.access_token)
    assert service.role is Role.SERVICE
    for caller in (await auth.admin(), service):
        result = await auth.domain.introspect(caller, ada_token)
        assert result.active and result.username == "ada"


async def test_introspection_says_why_a_token_is_inactive(make_auth: MakeAuth) -> None:
    fresh = await make_auth()
    admin = await fresh.admin()
    long_ago = Clock()
    long_ago.advance(-7 * 3600)
    _, expired = await (await make_auth(long_ago)).domain.login_with_password("admin", ADMIN_PASSWORD)
    assert (await fresh.domain.introspect(admin, expired.access_token)).inactive_reason == "TOKEN_EXPIRED"
    assert (await fresh.domain.introspect(admin, "not.a.token")).inactive_reason == "TOKEN_INVALID"
    _, tokens = await fresh.domain.login_with_password("admin", ADMIN_PASSWORD)
    await fresh.domain.revoke_token(admin, tokens.access_token)
    assert (await fresh.domain.introspect(admin, tokens.access_token)).inactive_reason == "TOKEN_REVOKED"
    refresh = await fresh.domain.introspect(admin, tokens.refresh_token)
    assert refresh.active and refresh.username == "admin"
    await fresh.domain.refresh(tokens.refresh_token)
    spent = await fresh.domain.introspect(admin, tokens.refresh_token)
    assert not spent.active and spent.inactive_reason == "TOKEN_REVOKED"


# --- users -------------------------------------------------------------------


async def test_only_admins_create_users(auth: Auth) -> None:
    ada, _ = await auth.user("ada")
    with pytest.raises(PermissionDenied):
        await auth.domain.create_user(ada, "bob", PASSWORD, Role.USER, "")


async def test_a_taken_username_already_exists(auth: Auth) -> None:
    admin = await auth.admin()
    await auth.domain.create_user(admin, "ada", PASSWORD, Role.USER, "")
    with pytest.raises(AlreadyExists):
        await auth.domain.create_user(admin, "ada", PASSWORD, Role.USER, "")


async def test_create_user_is_idempotent_by_request_id(auth: Auth) -> None:
    admin = await auth.admin()
    first = await auth.domain.create_user(admin, "ada", PASSWORD, Role.USER, "req-1")
    again = await auth.domain.create_user(admin, "ada", PASSWORD, Role.USER, "req-1")
    assert again == first
    with pytest.raises(InvalidArgument) as raised:
        await auth.domain.create_user(admin, "bob", PASSWORD, Role.USER, "req-1")
    assert raised.value.reason == "REQUEST_ID_REUSED"
    _, tokens = await auth.domain.login_with_password("ada", PASSWORD)
    ada = await auth.principal(tokens.access_token)
    assert (await auth.domain.current_user(ada)).user_id == first.user_id


# --- bootstrap ---------------------------------------------------------------


async def test_bootstrap_needs_an_admin_password_only_without_an_admin(auth: Auth) -> None:
    await auth.domain.bootstrap("admin", None, {})  # the admin exists: fine
    with pytest.raises(BootstrapError):
        await auth.domain.bootstrap("root", None, {"admin": "some password 12"})


async def test_first_start_without_admin_password_stops(make_auth: MakeAuth) -> None:
    with pytest.raises(AdminPasswordRequired):
        await make_auth(admin_password=None)
    await make_auth()  # with the password it starts, and afterwards needs it no more
    await make_auth(admin_password=None)


async def test_service_accounts_are_created_and_their_password_updated(make_auth: MakeAuth) -> None:
    auth = await make_auth(service_accounts={"svc-worker": "first password 1"})
    user, _ = await auth.domain.login_with_password("svc-worker", "first password 1")
    assert user.role is Role.SERVICE
    await auth.domain.bootstrap("admin", ADMIN_PASSWORD, {"svc-worker": "second password 2"})
    again, _ = await auth.domain.login_with_password("svc-worker", "second password 2")
    assert again.user_id == user.user_id
    assert await refused(auth.domain.login_with_password("svc-worker", "first password 1")) == (
        "INVALID_CREDENTIALS"
    )


# --- API keys ----------------------------------------------------------------


async def test_api_key_logs_in_and_is_shown_once(auth: Auth) -> None:
    ada, _ = await auth.user("ada")
    key, secret = await auth.domain.create_api_key(ada, "laptop", None, "req-1")
    assert secret is not None and secret.startswith(f"sb_{key.api_key_id}_")
    async with auth.storage.transaction(write=False) as tx:
        stored = await tx.get_api_key(key.api_key_id)
    assert stored is not None and secret.split("_", 2)[2] not in stored.secret_hash
    user, tokens = await auth.domain.login_with_api_key(secret)
    assert user.user_id == ada.user_id
    assert (await auth.principal(tokens.access_token)).user_id == ada.user_id
    again, no_secret = await auth.domain.create_api_key(ada, "laptop", None, "req-1")
    assert again.api_key_id == key.api_key_id and no_secret is None
    with pytest.raises(InvalidArgument):
        await auth.domain.create_api_key(ada, "desktop", None, "req-1")
    listed, _ = await auth.domain.list_api_keys(ada, 10, None)
    assert [k.api_key_id for k in listed] == [key.api_key_id]
    assert listed[0].last_used_at is not None


async def test_wrong_revoked_and_expired_keys_do_not_log_in(auth: Auth) -> None:
    ada, _ = await auth.user("ada")
    key, secret = await auth.domain.create_api_key(ada, "ci", None, "")
    assert secret is not None
    parsed = parse_api_key(secret)
    assert parsed is not None and parsed[0] == key.api_key_id
    for wrong in (secret[:-2] + "xx", "sb_nothing", "garbage", f"sb_{key.api_key_id}_"):
        assert await refused(auth.domain.login_with_api_key(wrong)) == "INVALID_CREDENTIALS"
    _, tokens = await auth.domain.login_with_api_key(secret)
    revoked = await auth.domain.revoke_api_key(ada, key.api_key_id)
    assert revoked.revoked_at is not None
    assert await refused(auth.domain.login_with_api_key(secret)) == "API_KEY_REVOKED"
    # Sessions opened with the key end with it.
    assert await refused(auth.verifier.verify(tokens.access_token)) == "TOKEN_REVOKED"
    assert await refused(auth.domain.refresh(tokens.refresh_token)) == "TOKEN_REVOKED"
    expiring, expiring_secret = await auth.domain.create_api_key(
        ada, "short", auth.clock.now + timedelta(seconds=30), ""
    )
    assert expiring_secret is not None
    _, capped = await auth.domain.login_with_api_key(expiring_secret)
    assert capped.access_expires_at <= expiring.expires_at  # type: ignore[operator]
    auth.clock.advance(31)
    assert await refused(auth.domain.login_with_api_key(expiring_secret)) == "API_KEY_EXPIRED"


async def test_api_keys_are_private_and_paginated(auth: Auth) -> None:
    ada, _ = await auth.user("ada")
    bob, _ = await auth.user("bob")
    created = []
    for name in ("one", "two", "three"):
        key, _ = await auth.domain.create_api_key(ada, name, None, "")
        created.append(key.api_key_id)
        auth.clock.advance(1)
    await auth.domain.create_api_key(bob, "bob's", None, "")
    first, after = await auth.domain.list_api_keys(ada, 2, None)
    assert after is not None
    second, end = await auth.domain.list_api_keys(ada, 2, after)
    assert [k.api_key_id for k in first + second] == created and end is None
    with pytest.raises(NotFound) as raised:
        await auth.domain.revoke_api_key(bob, created[0])
    assert raised.value.reason == "API_KEY_NOT_FOUND"
    with pytest.raises(NotFound):
        await auth.domain.revoke_api_key(bob, "0123456789abcdef")
