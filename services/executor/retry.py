"""When and how soon a failed attempt of a step is tried again.

`RetrySettings` mirrors the registry's `RetryPolicy` (0 means the documented
default there: 3 attempts, 1s initial backoff, 60s maximum, multiplier 2.0).
Attempts are numbered from 1; "attempt" below is always the one that just
failed, so `backoff_delay(1, ...)` is the wait before the second attempt.

Jitter: *equal jitter*. The wait before retry n is drawn uniformly from
[b/2, b] with b = min(max_backoff, initial_backoff * multiplier**(n-1)).
Full jitter ([0, b]) spreads a crowd of retries a little wider, but may retry a
failed agent call almost at once; our attempts are long and expensive, a
crowd hitting one endpoint is the circuit breaker's business, and a floor of
b/2 keeps the policy's promise that the wait grows. (The outbox relay's
backoff uses the same shape.)

No I/O and no clock: randomness and the time left come in as arguments.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_SECONDS = 1.0
DEFAULT_MAX_BACKOFF_SECONDS = 60.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0
MAX_ATTEMPTS = 20

# Failures that another attempt cannot fix, whatever the agent's policy says:
# the input is wrong (as the built-in worker and the executor name it, or a
# workflow input mapping that found nothing), or the run was cancelled.
NEVER_RETRYABLE_REASONS = frozenset(
    {
        "INVALID_INPUT",
        "INPUT_INVALID",
        "INPUT_MAPPING_FAILED",
        "CANCELLED",
        "RUN_CANCELLED",
        "AGENT_CANCELLED",
    }
)


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_seconds: float = DEFAULT_INITIAL_BACKOFF_SECONDS
    max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS
    multiplier: float = DEFAULT_BACKOFF_MULTIPLIER
    # ErrorInfo reasons the agent's policy never retries.
    non_retryable_reasons: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "non_retryable_reasons", frozenset(self.non_retryable_reasons))
        problems: list[FieldViolation] = []
        prefix = "retry_policy."
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            problems.append(FieldViolation(prefix + "max_attempts", f"must be between 1 and {MAX_ATTEMPTS}"))
        if not (math.isfinite(self.initial_backoff_seconds) and self.initial_backoff_seconds > 0):
            problems.append(FieldViolation(prefix + "initial_backoff", "must be a positive duration"))
        if not (math.isfinite(self.max_backoff_seconds) and self.max_backoff_seconds > 0):
            problems.append(FieldViolation(prefix + "max_backoff", "must be a positive duration"))
        elif self.max_backoff_seconds < self.initial_backoff_seconds:
            problems.append(FieldViolation(prefix + "max_backoff", "must not be less than initial_backoff"))
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            problems.append(FieldViolation(prefix + "backoff_multiplier", "must be at least 1.0"))
        if problems:
            raise InvalidArgument(problems)

    @classmethod
    def from_policy(
        cls,
        *,
        max_attempts: int = 0,
        initial_backoff: float = 0.0,
        max_backoff: float = 0.0,
        backoff_multiplier: float = 0.0,
        non_retryable_reasons: Iterable[str] = (),
    ) -> RetrySettings:
        """From the registry's RetryPolicy fields (durations in seconds), where 0
        means the documented default."""
        return cls(
            max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
            initial_backoff_seconds=initial_backoff or DEFAULT_INITIAL_BACKOFF_SECONDS,
            max_backoff_seconds=max_backoff or DEFAULT_MAX_BACKOFF_SECONDS,
            multiplier=backoff_multiplier or DEFAULT_BACKOFF_MULTIPLIER,
            non_retryable_reasons=frozenset(non_retryable_reasons),
        )


def backoff_ceiling(attempt: int, settings: RetrySettings) -> float:
    """The longest wait after `attempt` failed: min(max, initial * multiplier**(attempt-1))."""
    if attempt < 1:
        raise ValueError("attempts are numbered from 1")
    ceiling = settings.initial_backoff_seconds
    # Multiply step by step: a large attempt number must not overflow a float.
    for _ in range(attempt - 1):
        if ceiling >= settings.max_backoff_seconds:
            break
        ceiling *= settings.multiplier
    return min(ceiling, settings.max_backoff_seconds)


def backoff_delay(attempt: int, settings: RetrySettings, random: Callable[[], float]) -> float:
    """Seconds to wait after `attempt` failed: equal jitter, in [ceiling/2, ceiling].
    `random` returns a float in [0, 1), like `random.random`."""
    ceiling = backoff_ceiling(attempt, settings)
    fraction = min(max(random(), 0.0), 1.0)
    return ceiling / 2 + fraction * ceiling / 2


def is_retryable(reason: str, settings: RetrySettings) -> bool:
    return reason not in NEVER_RETRYABLE_REASONS and reason not in settings.non_retryable_reasons


def should_retry(attempt: int, reason: str, settings: RetrySettings) -> bool:
    """Whether `attempt`, which failed with `reason`, gets another attempt."""
    if attempt < 1:
        raise ValueError("attempts are numbered from 1")
    return attempt < settings.max_attempts and is_retryable(reason, settings)


class NoRetry(enum.StrEnum):
    """Why a failed attempt is the last one."""

    NOT_RETRYABLE = "NOT_RETRYABLE"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    DEADLINE = "DEADLINE"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    # Seconds to wait before the next attempt; None: no next attempt.
    delay_seconds: float | None
    stop: NoRetry | None = None

    @property
    def retry(self) -> bool:
        return self.delay_seconds is not None


def decide_retry(
    attempt: int,
    reason: str,
    settings: RetrySettings,
    random: Callable[[], float],
    *,
    remaining_seconds: float | None = None,
    min_attempt_seconds: float = 0.0,
) -> RetryDecision:
    """`should_retry` that also minds the deadline: no retry when the wait, plus
    `min_attempt_seconds` for the attempt to do anything, would not end before
    the deadline (`remaining_seconds` from now; None: no deadline)."""
    if not is_retryable(reason, settings):
        return RetryDecision(None, NoRetry.NOT_RETRYABLE)
    if not should_retry(attempt, reason, settings):
        return RetryDecision(None, NoRetry.ATTEMPTS_EXHAUSTED)
    delay = backoff_delay(attempt, settings, random)
    if remaining_seconds is not None and delay + min_attempt_seconds >= remaining_seconds:
        return RetryDecision(None, NoRetry.DEADLINE)
    return RetryDecision(delay)
