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
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from switchboard.auth.v1 import auth_service_pb2
from switchboard.executor.v1 import executor_service_pb2, run_pb2

from tests.harness.clients import executor_stub, finished_run, start_run, subscribe_run
from tests.harness.suite import Suite, metadata

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
