"""The circuit breaker's transitions, driven by a fake clock."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import Unavailable
from services.executor.breaker import (
    CIRCUIT_OPEN,
    BreakerRegistry,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_breaker(
    clock: FakeClock, transitions: list[tuple[BreakerState, BreakerState]] | None = None, **settings: float
) -> CircuitBreaker:
    record = transitions.append if transitions is not None else None
    return CircuitBreaker(
        "10.0.0.7:50055",
        BreakerSettings(**settings),  # type: ignore[arg-type]
        clock=clock,
        on_transition=(lambda old, new: record((old, new))) if record else None,
    )


def fail_times(breaker: CircuitBreaker, count: int) -> None:
    for _ in range(count):
        breaker.record_failure(breaker.acquire())


def test_consecutive_failures_open_it_and_open_fails_fast_with_retry_info() -> None:
    clock = FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = make_breaker(clock, transitions, failure_threshold=3, reset_timeout_seconds=30)

    fail_times(breaker, 2)
    breaker.record_success(breaker.acquire())  # a success resets the count
    fail_times(breaker, 2)
    assert breaker.state is CLOSED and transitions == []

    fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]

    clock.advance(12)
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    error = caught.value
    assert isinstance(error, Unavailable)
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.reason == CIRCUIT_OPEN
    assert error.retry_after == pytest.approx(18)
    assert error.endpoint == "10.0.0.7:50055"
    assert "10.0.0.7" not in error.message, "internal addresses stay out of client messages"
    assert breaker.allow() is False


def test_after_the_reset_timeout_a_successful_trial_closes_it() -> None:
    clock = FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = make_breaker(clock, transitions, failure_threshold=1, reset_timeout_seconds=30)
    fail_times(breaker, 1)

    clock.advance(29.999)
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.state is HALF_OPEN

    trial = breaker.acquire()
    assert trial.trial
    breaker.record_success(trial)
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Closed again: the failure count starts from zero.
    assert not breaker.acquire().trial


def test_a_failed_trial_opens_it_again_for_a_full_timeout() -> None:
    clock = FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = make_breaker(clock, transitions, failure_threshold=2, reset_timeout_seconds=10)
    fail_times(breaker, 2)
    clock.advance(10)

    breaker.record_failure(breaker.acquire())
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    clock.advance(9)
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    assert caught.value.retry_after == pytest.approx(1)


def test_half_open_bounds_concurrent_trials() -> None:
    clock = FakeClock()
    breaker = make_breaker(
        clock, failure_threshold=1, reset_timeout_seconds=5, half_open_max_calls=2, success_threshold=3
    )
    fail_times(breaker, 1)
    clock.advance(5)

    first, second = breaker.acquire(), breaker.acquire()
    assert breaker.trials_in_flight == 2
    with pytest.raises(CircuitOpen) as caught:
        breaker.acquire()
    assert 0 < (caught.value.retry_after or 0) <= 5

    # A trial that ends without a verdict frees its slot; the count of
    # successes needed is not a bound on concurrency.
    breaker.release(first)
    third = breaker.acquire()
    breaker.record_success(second)
    breaker.record_success(third)
    assert breaker.state is HALF_OPEN
    breaker.record_success(breaker.acquire())
    assert breaker.state is CLOSED


def test_verdicts_from_an_earlier_period_are_ignored() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=2, reset_timeout_seconds=5)
    slow_call = breaker.acquire()  # started while CLOSED, answers late
    fail_times(breaker, 2)
    clock.advance(5)
    trial = breaker.acquire()

    breaker.record_success(slow_call)
    assert breaker.state is HALF_OPEN, "a stale success does not close it"
    breaker.record_failure(slow_call)
    assert breaker.state is HALF_OPEN, "a stale failure does not re-open it"
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # the stale verdicts freed no trial slot
    breaker.record_success(trial)
    assert breaker.state is CLOSED


def test_allow_and_verdicts_without_permits() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout_seconds=1)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert not breaker.allow(), "one trial at a time"
    breaker.record_success()
    assert breaker.state is CLOSED


@pytest.mark.parametrize(
    "bad",
    [
        {"failure_threshold": 0},
        {"reset_timeout_seconds": 0},
        {"half_open_max_calls": 0},
        {"success_threshold": 0},
    ],
)
def test_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**bad)  # type: ignore[arg-type]


def test_registry_keeps_one_breaker_per_endpoint_with_shared_settings() -> None:
    clock = FakeClock()
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    registry = BreakerRegistry(
        BreakerSettings(failure_threshold=1),
        clock=clock,
        on_transition=lambda endpoint, old, new: seen.append((endpoint, old, new)),
    )
    first = registry.get("a:1")
    assert registry.get("a:1") is first
    assert registry.get("b:2") is not first
    assert registry.get("b:2").settings is registry.settings

    first.record_failure(first.acquire())
    assert registry.states() == {"a:1": OPEN, "b:2": CLOSED}
    assert seen == [("a:1", CLOSED, OPEN)]
    registry.get("b:2").acquire()  # the other endpoint is unaffected

    registry.discard("a:1")
    assert registry.get("a:1").state is CLOSED
