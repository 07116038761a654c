"""The auth service's storage on SQLite and PostgreSQL: the same behaviour on both,
including the concurrency rules (ordered revocation feed, single-use refresh tokens)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.auth.storage import (
    ApiKeyRow,
    AuthStorage,
    Conflict,
    RefreshTokenRow,
    SessionRow,
    SigningKeyRow,
    UserRow,
    create_storage,
)
from services.common.auth import Principal, Role
from services.common.db import migrate
from services.common.errors import ResourceExhausted, Unauthenticated
from tests.unit.auth.helpers import ADMIN_PASSWORD, PASSWORD, Clock, build_auth

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "auth" / "migrations"
NOW = datetime(2030, 5, 17, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[AuthStorage]:
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    storage = create_storage(database_url)
    yield storage
    await storage.close()


def user(username: str, user_id: str | None = None, role: str = "user") -> UserRow:
    return UserRow(user_id or f"id-{username}", username, role, "$argon2id$not-a-real-hash", NOW)


async def test_users_round_trip_with_aware_utc_times(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        await tx.insert_user(user("ada"), "admin-id", "req-1")
        await tx.insert_user(user("root", role="admin"), None, None)
    async with storage.transaction(write=False) as tx:
        found = await tx.get_user_by_username("ada")
        by_request = await tx.find_user_by_request("admin-id", "req-1")
        assert await tx.admin_exists()
        assert await tx.get_user("missing") is None
    assert found == user("ada") == by_request
    assert found is not None and found.created_at.tzinfo is not None and found.created_at == NOW


async def test_a_taken_username_or_request_id_is_a_conflict(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        await tx.insert_user(user("ada"), "admin-id", "req-1")
    with pytest.raises(Conflict):
        async with storage.transaction() as tx:
            await tx.insert_user(user("ada", "other-id"), None, None)
    with pytest.raises(Conflict):
        async with storage.transaction() as tx:
            await tx.insert_user(user("bob"), "admin-id", "req-1")
    # Rolled back: bob was not created; no request id means no idempotency constraint.
    async with storage.transaction() as tx:
        assert await tx.get_user_by_username("bob") is None
        await tx.insert_user(user("bob"), "admin-id", None)
        await tx.insert_user(user("cy"), "admin-id", None)


async def test_revocation_feed_is_ordered_paged_and_forgets_expired_entries(storage: AuthStorage) -> None:
    later, soon = NOW + timedelta(hours=1), NOW + timedelta(minutes=1)
    async with storage.transaction() as tx:
        first = await tx.add_revocation(token_id="jti-1", session_id=None, expires_at=later, now=NOW)
        second = await tx.add_revocation(token_id=None, session_id="sid-1", expires_at=soon, now=NOW)
        third = await tx.add_revocation(token_id="jti-2", session_id=None, expires_at=later, now=NOW)
    assert first.sequence < second.sequence < third.sequence
    async with storage.transaction(write=False) as tx:
        page, last = await tx.list_revocations(0, 2, NOW)
        assert [r.sequence for r in page] == [first.sequence, second.sequence] and last == second.sequence
        rest, last = await tx.list_revocations(last, 2, NOW)
        assert rest == [third] and last == third.sequence
        # After `soon`, the session entry is gone but the position still advances past it.
        page, last = await tx.list_revocations(0, 10, soon)
        assert [r.token_id for r in page] == ["jti-1", "jti-2"] and last == third.sequence
        assert await tx.list_revocations(third.sequence, 10, NOW) == ([], third.sequence)
    async with storage.transaction() as tx:
        counts = await tx.prune(later, NOW)
    assert counts.revocations == 3
    async with storage.transaction() as tx:
        fourth = await tx.add_revocation(token_id="jti-3", session_id=None, expires_at=later, now=NOW)
        # Pruning the top entry never lets its number come back.
        assert fourth.sequence > third.sequence
        assert await tx.list_revocations(0, 10, NOW) == ([fourth], fourth.sequence)


async def test_a_poller_never_skips_a_revocation_committed_late(database_url: str) -> None:
    """A poller that has seen sequence N must be able to see every M < N: a
    revocation whose transaction commits late must not hide behind a later one."""
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    slow, fast, reader = (create_storage(database_url) for _ in range(3))
    expires = NOW + timedelta(hours=1)
    numbered = asyncio.Event()
    release = asyncio.Event()

    async def slow_writer() -> None:
        async with slow.transaction() as tx:
            await tx.add_revocation(token_id="slow", session_id=None, expires_at=expires, now=NOW)
            numbered.set()
            await release.wait()  # commits only after the poll below

    async def fast_writer() -> None:
        async with fast.transaction() as tx:
            await tx.add_revocation(token_id="fast", session_id=None, expires_at=expires, now=NOW)

    async def poll(after: int) -> tuple[list[str | None], int]:
        async with reader.transaction(write=False) as tx:
            rows, last = await tx.list_revocations(after, 1000, NOW)
        return [row.token_id for row in rows], last

    try:
        first = asyncio.create_task(slow_writer())
        await numbered.wait()
        second = asyncio.create_task(fast_writer())
        await asyncio.sleep(0.3)  # the fast writer commits now unless it must wait its turn
        seen, last = await poll(0)
        release.set()
        await asyncio.gather(first, second)
        more, _ = await poll(last)
        assert sorted(token for token in seen + more if token) == ["fast", "slow"]
    finally:
        release.set()
        for storage in (slow, fast, reader):
            await storage.close()


async def test_a_refresh_token_is_spent_once_even_concurrently(database_url: str) -> None:
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    stores = [create_storage(database_url) for _ in range(3)]
    try:
        async with stores[0].transaction() as tx:
            await tx.insert_user(user("ada"), None, None)
            await tx.insert_session(SessionRow("sid", "id-ada", None, NOW, NOW + timedelta(days=1), None))
            await tx.insert_refresh_token(
                RefreshTokenRow("hash-1", "sid", "id-ada", NOW, NOW + timedelta(days=1), None, None)
            )

        async def spend(storage: AuthStorage) -> bool:
            async with storage.transaction() as tx:
                await tx.get_session("sid", for_update=True)
                return await tx.spend_refresh_token("hash-1", NOW)

        results = await asyncio.gather(*(spend(storage) for storage in stores))
        assert sorted(results) == [False, False, True]
        async with stores[0].transaction() as tx:
            await tx.revoke_session("sid", NOW)
            token = await tx.get_refresh_token("hash-1")
            session = await tx.get_session("sid")
        assert token is not None and token.spent_at == NOW and token.revoked_at == NOW
        assert session is not None and session.revoked_at == NOW
    finally:
        for storage in stores:
            await storage.close()


async def test_signing_keys_stay_listed_until_verify_until(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        await tx.lock_signing_keys()
        await tx.insert_signing_key(SigningKeyRow("old", "cHJpdmF0ZQ==", "x-old", NOW, None, None))
        await tx.retire_signing_keys(NOW + timedelta(days=1), NOW + timedelta(days=1, hours=1))
        await tx.insert_signing_key(
            SigningKeyRow("new", "cHJpdmF0ZQ==", "x-new", NOW + timedelta(days=1), None, None)
        )
    async with storage.transaction(write=False) as tx:
        during = await tx.list_signing_keys(NOW + timedelta(days=1, minutes=30))
        after = await tx.list_signing_keys(NOW + timedelta(days=1, hours=2))
    assert [key.kid for key in during] == ["old", "new"]
    assert during[0].retired_at == NOW + timedelta(days=1) and during[1].retired_at is None
    assert [key.kid for key in after] == ["new"]


async def test_login_attempts_are_counted_per_username(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        for seconds in (0, 10, 20):
            await tx.add_login_attempt("ada", NOW + timedelta(seconds=seconds))
        await tx.add_login_attempt("bob", NOW)
    async with storage.transaction(write=False) as tx:
        recent = await tx.login_attempt_times("ada", NOW + timedelta(seconds=5))
    assert [at for _, at in recent] == [NOW + timedelta(seconds=10), NOW + timedelta(seconds=20)]
    async with storage.transaction() as tx:
        await tx.delete_login_attempt(recent[0][0])
        await tx.clear_login_attempts("bob")
        counts = await tx.prune(NOW, NOW + timedelta(seconds=15))
    assert counts.login_attempts == 1
    async with storage.transaction(write=False) as tx:
        assert [at for _, at in await tx.login_attempt_times("ada", NOW - timedelta(hours=1))] == [
            NOW + timedelta(seconds=20)
        ]
        assert await tx.login_attempt_times("bob", NOW - timedelta(hours=1)) == []


async def test_api_keys_page_in_creation_order_with_ties(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        await tx.insert_user(user("ada"), None, None)
        for key_id, created in (("b", NOW), ("a", NOW), ("c", NOW + timedelta(seconds=1))):
            await tx.insert_api_key(ApiKeyRow(key_id, "id-ada", key_id, "h" * 64, created, None, None, None))
    async with storage.transaction(write=False) as tx:
        first = await tx.list_api_keys("id-ada", None, 2)
        rest = await tx.list_api_keys("id-ada", (first[-1].created_at, first[-1].id), 2)
        assert await tx.list_api_keys("someone-else", None, 10) == []
    assert [key.id for key in first + rest] == ["a", "b", "c"]
    async with storage.transaction() as tx:
        await tx.revoke_api_key("a", NOW)
        await tx.touch_api_key("b", NOW)
        revoked, used = await tx.get_api_key("a"), await tx.get_api_key("b")
    assert revoked is not None and revoked.revoked_at == NOW
    assert used is not None and used.last_used_at == NOW


async def test_prune_removes_dead_sessions_with_their_refresh_tokens(storage: AuthStorage) -> None:
    async with storage.transaction() as tx:
        await tx.insert_user(user("ada"), None, None)
        for sid, expires in (("dead", NOW - timedelta(seconds=1)), ("live", NOW + timedelta(days=1))):
            await tx.insert_session(SessionRow(sid, "id-ada", None, NOW - timedelta(days=1), expires, None))
            await tx.insert_refresh_token(
                RefreshTokenRow(f"h-{sid}", sid, "id-ada", NOW, expires, None, None)
            )
        counts = await tx.prune(NOW, NOW)
    assert counts.sessions == 1
    async with storage.transaction(write=False) as tx:
        assert await tx.get_refresh_token("h-dead") is None
        assert await tx.get_refresh_token("h-live") is not None


async def test_the_domain_rules_hold_on_this_backend(database_url: str) -> None:
    """Refresh reuse, throttling and replicas on the real backend."""
    await asyncio.to_thread(migrate, database_url, MIGRATIONS)
    clock = Clock()
    first = await build_auth(database_url, clock)
    replica = await build_auth(database_url, clock)
    try:
        admin: Principal = await first.admin()
        await first.domain.create_user(admin, "ada", PASSWORD, Role.USER, "req")
        _, tokens = await replica.domain.login_with_password("ada", PASSWORD)
        renewed = await first.domain.refresh(tokens.refresh_token)
        with pytest.raises(Unauthenticated) as reused:
            await replica.domain.refresh(tokens.refresh_token)
        assert reused.value.reason == "REFRESH_TOKEN_REUSED"
        await first.domain.revocations.refresh()
        with pytest.raises(Unauthenticated) as revoked:
            await first.verifier.verify(renewed.access_token)
        assert revoked.value.reason == "TOKEN_REVOKED"
        for _ in range(5):
            with pytest.raises(Unauthenticated):
                await first.domain.login_with_password("ada", "wrong password!!")
        with pytest.raises(ResourceExhausted) as throttled:
            await replica.domain.login_with_password("ada", PASSWORD)
        assert throttled.value.reason == "LOGIN_THROTTLED"
        await first.domain.login_with_password("admin", ADMIN_PASSWORD)
    finally:
        await first.storage.close()
        await replica.storage.close()
