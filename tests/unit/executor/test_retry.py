"""Retry delays and decisions (randomness and time passed in)."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.executor.retry import (
    NoRetry,
    RetrySettings,
    backoff_ceiling,
    backoff_delay,
    decide_retry,
    should_retry,
)

LOW, HIGH = (lambda: 0.0), (lambda: 0.999999)


def test_defaults_follow_the_registry_policy() -> None:
    settings = RetrySettings.from_policy()
    assert settings == RetrySettings(
        max_attempts=3, initial_backoff_seconds=1.0, max_backoff_seconds=60.0, multiplier=2.0
    )
    custom = RetrySettings.from_policy(
        max_attempts=5,
        initial_backoff=0.5,
        max_backoff=4.0,
        backoff_multiplier=3.0,
        non_retryable_reasons=["QUOTA", "QUOTA"],
    )
    assert custom == RetrySettings(5, 0.5, 4.0, 3.0, frozenset({"QUOTA"}))


def test_bad_settings_name_every_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        RetrySettings(max_attempts=0, initial_backoff_seconds=-1, max_backoff_seconds=0, multiplier=0.5)
    assert [v.field for v in caught.value.violations] == [
        "retry_policy.max_attempts",
        "retry_policy.initial_backoff",
        "retry_policy.max_backoff",
        "retry_policy.backoff_multiplier",
    ]
    with pytest.raises(InvalidArgument, match="max_backoff"):
        RetrySettings(initial_backoff_seconds=10, max_backoff_seconds=5)


def test_delay_grows_exponentially_with_equal_jitter_and_is_capped() -> None:
    settings = RetrySettings(max_attempts=20, initial_backoff_seconds=1, max_backoff_seconds=10, multiplier=2)
    assert [backoff_ceiling(attempt, settings) for attempt in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    # Equal jitter: between half the ceiling and the ceiling.
    assert backoff_delay(3, settings, LOW) == 2.0
    assert backoff_delay(3, settings, lambda: 0.5) == 3.0
    assert backoff_delay(3, settings, HIGH) == pytest.approx(4.0)
    assert backoff_delay(6, settings, HIGH) <= 10
    # Huge attempt numbers stay capped instead of overflowing.
    assert backoff_delay(10_000, settings, HIGH) <= 10
    with pytest.raises(ValueError):
        backoff_delay(0, settings, LOW)


def test_a_multiplier_of_one_keeps_the_delay_constant() -> None:
    settings = RetrySettings(initial_backoff_seconds=2, max_backoff_seconds=60, multiplier=1)
    assert {backoff_ceiling(attempt, settings) for attempt in range(1, 10)} == {2}


def test_should_retry_counts_attempts_and_respects_reasons() -> None:
    settings = RetrySettings(max_attempts=3, non_retryable_reasons=frozenset({"QUOTA_EXCEEDED"}))
    assert should_retry(1, "AGENT_ERROR", settings)
    assert should_retry(2, "HEARTBEAT_TIMEOUT", settings)
    assert not should_retry(3, "AGENT_ERROR", settings), "three attempts in all"
    assert not should_retry(1, "QUOTA_EXCEEDED", settings)
    for never in ("INVALID_INPUT", "INPUT_INVALID", "CANCELLED", "RUN_CANCELLED", "INPUT_MAPPING_FAILED"):
        assert not should_retry(1, never, settings)
    assert not should_retry(1, "AGENT_ERROR", RetrySettings(max_attempts=1))


def test_decide_retry_gives_the_delay_or_why_not() -> None:
    settings = RetrySettings(max_attempts=3, initial_backoff_seconds=4, max_backoff_seconds=60)
    decision = decide_retry(2, "AGENT_ERROR", settings, LOW)
    assert decision.retry and decision.delay_seconds == 4.0 and decision.stop is None

    assert decide_retry(1, "INVALID_INPUT", settings, LOW).stop is NoRetry.NOT_RETRYABLE
    assert decide_retry(3, "AGENT_ERROR", settings, LOW).stop is NoRetry.ATTEMPTS_EXHAUSTED


def test_decide_retry_does_not_retry_past_the_deadline() -> None:
    settings = RetrySettings(initial_backoff_seconds=4, max_backoff_seconds=60)
    # The first retry waits between 2s and 4s.
    assert decide_retry(1, "AGENT_ERROR", settings, LOW, remaining_seconds=2.5).retry
    late = decide_retry(1, "AGENT_ERROR", settings, HIGH, remaining_seconds=2.5)
    assert not late.retry and late.stop is NoRetry.DEADLINE
    assert decide_retry(1, "AGENT_ERROR", settings, LOW, remaining_seconds=2.0).stop is NoRetry.DEADLINE
    # Room is left for the attempt itself when asked.
    assert (
        decide_retry(1, "AGENT_ERROR", settings, LOW, remaining_seconds=2.5, min_attempt_seconds=1).stop
        is NoRetry.DEADLINE
    )
    assert decide_retry(1, "AGENT_ERROR", settings, LOW, remaining_seconds=None).retry
