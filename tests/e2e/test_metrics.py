"""Every service serves its metrics for Prometheus: after a run and a few
refused tokens, each endpoint shows the common series with plausible values."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from switchboard.auth.v1 import auth_service_pb2
from switchboard.events.v1 import events_service_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2

from tests.harness.clients import events_stub, executor_stub, finished_run, start_run, subscribe_run
from tests.harness.suite import Suite, metadata
from tests.unit.events.streams import RawSubscription

DURATION = "rpc_server_call_duration_seconds"
FAILURES = "switchboard_token_verification_failures_total"
REASONS = ("missing", "malformed", "unknown_kid", "bad_signature", "expired", "invalid_claims", "revoked")
PATIENCE_SECONDS = 30.0


async def scrape(url: str) -> list[Sample]:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def calls(samples: list[Sample], method: str, code: str = "OK") -> float:
    return total(samples, f"{DURATION}_count", rpc_method=method, rpc_response_status_code=code)


def served_once(method: str) -> Callable[[list[Sample]], bool]:
    def done(samples: list[Sample]) -> bool:
        return calls(samples, method) >= 1

    return done


async def scrape_until(
    suite: Suite, service: str, done: Callable[[list[Sample]], bool], what: str
) -> list[Sample]:
    """Scrapes until `done` holds: a call's duration is recorded as its handler
    returns, which may be a moment after the caller has seen the outcome."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE_SECONDS
    while True:
        samples = await scrape(suite.metrics_url[service])
        if done(samples):
            return samples
        if loop.time() > deadline:
            raise AssertionError(f"{service}: {what} not seen in {PATIENCE_SECONDS:.0f}s")
        await asyncio.sleep(0.2)


async def refused(suite: Suite, call_metadata: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await executor_stub(suite).GetRun(
            executor_service_pb2.GetRunRequest(run_id="any"), metadata=call_metadata, timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_service_serves_the_common_series_after_a_run(suite: Suite) -> None:
    assert set(suite.metrics_url) == {"auth", "registry", "executor", "events", "worker"}
    before = await scrape(suite.metrics_url["executor"])

    _, token = await suite.create_user("metered")
    run = await start_run(suite, token)
    assert (await finished_run(suite, token, run.run_id)).state == run_pb2.RUN_STATE_SUCCEEDED
    assert await subscribe_run(suite, token, run.run_id)

    # Refused tokens, one per reason the suite can produce from outside.
    head, payload, signature = token.split(".")
    tampered = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    stranger = jwt.encode(
        {"sub": "x"}, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "nope"}
    )
    for call_metadata in (
        (),  # missing
        metadata("not-a-jwt"),  # malformed
        metadata(stranger),  # unknown_kid
        metadata(f"{head}.{payload}.{tampered}"),  # bad_signature
    ):
        await refused(suite, call_metadata)
    # A revoked token is refused everywhere within the revocation poll.
    _, doomed = await suite.create_user("metered-revoked")
    await suite.auth_stub().RevokeToken(
        auth_service_pb2.RevokeTokenRequest(token=doomed), metadata=metadata(doomed), timeout=10
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE_SECONDS
    while True:
        try:
            await executor_stub(suite).GetRun(
                executor_service_pb2.GetRunRequest(run_id=run.run_id), metadata=metadata(doomed), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                break
        assert loop.time() < deadline, "the revoked token is still accepted"
        await asyncio.sleep(0.2)
    sent = ("missing", "malformed", "unknown_kid", "bad_signature", "revoked")

    # Executor: StartRun succeeded, each refusal was counted by its reason, and
    # the refused calls' durations were recorded with their code. (The client
    # may see an abort a moment before the server's interceptor records it.)
    get_run = "switchboard.executor.v1.ExecutorService/GetRun"

    def refused_calls(samples: list[Sample]) -> float:
        return calls(samples, get_run, "UNAUTHENTICATED") - calls(before, get_run, "UNAUTHENTICATED")

    def executor_done(samples: list[Sample]) -> bool:
        return (
            calls(samples, "switchboard.executor.v1.ExecutorService/StartRun") >= 1
            and refused_calls(samples) >= len(sent)
            and all(
                total(samples, FAILURES, error_type=reason) > total(before, FAILURES, error_type=reason)
                for reason in sent
            )
        )

    executor = await scrape_until(suite, "executor", executor_done, "StartRun OK and every refusal")
    for reason in REASONS:
        increase = total(executor, FAILURES, error_type=reason) - total(before, FAILURES, error_type=reason)
        assert increase == (1 if reason in sent else 0), reason
    assert refused_calls(executor) == len(sent)

    # Every service: its own resource, the duration histogram of what it served
    # in this run, all refusal reasons (from 0), and no health checks.
    served = {
        "auth": "switchboard.auth.v1.AuthService/Login",
        "registry": "switchboard.registry.v1.RegistryService/GetAgent",
        "executor": "switchboard.executor.v1.ExecutorService/StartRun",
        "events": "switchboard.events.v1.EventsService/Publish",
        "worker": "switchboard.agent.v1.AgentWorker/Execute",
    }
    for service, method in served.items():
        samples = await scrape_until(suite, service, served_once(method), f"{method} with code OK")
        (target,) = [s for s in samples if s.name == "target_info"]
        assert target.labels["service_name"] == f"switchboard-{service}"
        count = calls(samples, method)
        buckets = [
            s
            for s in samples
            if s.name == f"{DURATION}_bucket"
            and s.labels["rpc_method"] == method
            and s.labels["rpc_response_status_code"] == "OK"
        ]
        assert {"0.005", "1.0", "10.0", "+Inf"} <= {s.labels["le"] for s in buckets}, service
        assert max(s.value for s in buckets) == count  # the +Inf bucket holds every call
        duration_sum = total(samples, f"{DURATION}_sum", rpc_method=method, rpc_response_status_code="OK")
        assert 0 < duration_sum < count * 60, service  # seconds, not milliseconds
        assert {s.labels["rpc_system_name"] for s in samples if s.name == f"{DURATION}_count"} == {"grpc"}
        assert not [s for s in samples if s.labels.get("rpc_method", "").startswith("grpc.")], service
        assert {s.labels["error_type"] for s in samples if s.name == FAILURES} == set(REASONS), service


# -- the events service's own series ---------------------------------------------

EVENTS_DELIVERIES = "switchboard_events_deliveries_total"
EVENTS_REDELIVERIES = "switchboard_events_redeliveries_total"
EVENTS_DEAD_LETTERS = "switchboard_events_dead_letters_total"
EVENTS_PENDING = "switchboard_events_pending_acks"
PROBE_CONSUMER = "metrics-e2e-probe"  # this test's alone in the suite


def by_consumer(samples: list[Sample], name: str, consumer: str) -> float:
    return total(samples, name, messaging_consumer_group_name=consumer)


async def test_events_series_follow_deliveries_acks_and_a_dead_letter(suite: Suite) -> None:
    url = suite.metrics_url["events"]
    before = await scrape(url)
    _, token = await suite.create_user("metered-events")
    run = await start_run(suite, token)
    assert (await finished_run(suite, token, run.run_id)).state == run_pb2.RUN_STATE_SUCCEEDED
    received = await subscribe_run(suite, token, run.run_id)  # ephemeral; acks every batch
    assert len(received) >= 3

    # Counted as they are sent: by the time the subscriber has them, they are in.
    after_ephemeral = await scrape(url)
    assert by_consumer(after_ephemeral, EVENTS_DELIVERIES, "_ephemeral") - by_consumer(
        before, EVENTS_DELIVERIES, "_ephemeral"
    ) >= len(received)

    # A durable consumer, one event at a time, that nacks seq 1 until it is
    # dead-lettered (the service's maximum attempts), then acks the rest.
    opening = events_service_pb2.SubscriptionOpen(
        run_id=run.run_id,
        consumer=PROBE_CONSUMER,
        max_in_flight=1,
        ack_deadline=duration_pb2.Duration(seconds=600),
    )
    probe = RawSubscription(events_stub(suite), metadata(token), opening)
    try:
        attempts = 0
        while True:
            batch = (await probe.next("events")).deliveries
            if batch[0].WhichOneof("item") == "dead_letter":
                assert (batch[0].dead_letter.seq, batch[0].dead_letter.delivery_attempts) == (1, attempts)
                unacked = [d.event for d in batch[1:]]
                break
            [delivery] = batch
            assert (delivery.event.seq, delivery.delivery_attempt) == (1, attempts + 1)
            attempts = delivery.delivery_attempt
            probe.nack([delivery.event.event_id])
        assert attempts >= 1
        pending_seen = False
        while True:
            if not unacked:
                response = await probe.read()
                if response.WhichOneof("response") == "run_completed":
                    break
                if response.WhichOneof("response") == "events":
                    unacked = [d.event for d in response.events.deliveries]
                continue
            if not pending_seen:  # one delivered, not yet acknowledged
                assert by_consumer(await scrape(url), EVENTS_PENDING, PROBE_CONSUMER) == 1
                pending_seen = True
            probe.ack([e.event_id for e in unacked])
            unacked = []
        assert pending_seen

        # Everything settled, the subscription still open: nothing pending.
        samples = await scrape(url)
        assert by_consumer(samples, EVENTS_PENDING, PROBE_CONSUMER) == 0

        def increase(name: str) -> float:
            return by_consumer(samples, name, PROBE_CONSUMER) - by_consumer(before, name, PROBE_CONSUMER)

        # Seq 1 `attempts` times, every other event once (the ack deadline is far off).
        assert increase(EVENTS_DELIVERIES) == attempts + len(received) - 1
        assert increase(EVENTS_REDELIVERIES) == attempts - 1
        assert increase(EVENTS_DEAD_LETTERS) == 1
    finally:
        probe.close()
