"""The circuit breaker in front of each agent endpoint (the only one there is).

CLOSED: calls go through; `failure_threshold` consecutive failures open it.
OPEN: calls fail fast with `CircuitOpen` (UNAVAILABLE, reason CIRCUIT_OPEN,
with the time left as `retry_after`) until `reset_timeout_seconds` have passed.
HALF_OPEN: at most `half_open_max_calls` trial calls are in flight at once;
`success_threshold` successful trials close it, one failed trial opens it again.

Every call takes a `Permit` (`acquire`, or `allow` for a yes/no answer) and
reports how it went with `record_success` / `record_failure`, or `release` when
it ended without saying anything about the endpoint (cancelled by its owner).
Passing the permit back makes the breaker ignore verdicts from an earlier
period: a slow call started while CLOSED that fails after the breaker already
opened and half-opened again must neither re-open it nor use up a trial slot.

Time comes from an injected monotonic clock; no I/O, no locks (one event loop).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import Unavailable

CIRCUIT_OPEN = "CIRCUIT_OPEN"

# How soon to try again while the trial calls of a half-open breaker are still
# out: their verdict may close it at any moment.
HALF_OPEN_RETRY_AFTER_SECONDS = 1.0

Clock = Callable[[], float]


class BreakerState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


Transition = Callable[[BreakerState, BreakerState], None]


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 5
    reset_timeout_seconds: float = 30.0
    half_open_max_calls: int = 1
    success_threshold: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not self.reset_timeout_seconds > 0:
            raise ValueError("reset_timeout_seconds must be positive")
        if self.half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be at least 1")
        if self.success_threshold < 1:
            raise ValueError("success_threshold must be at least 1")


class CircuitOpen(Unavailable):
    """The endpoint's breaker refuses the call. The endpoint (an internal
    address) is kept for logs and spans, out of the client's message."""

    def __init__(self, endpoint: str, retry_after: float) -> None:
        super().__init__(
            "the agent's worker is failing; calls to it are paused",
            reason=CIRCUIT_OPEN,
            retry_after=retry_after,
        )
        self.endpoint = endpoint


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back with its verdict."""

    # The breaker's period (each transition starts a new one) it was issued in.
    period: int
    # Issued while HALF_OPEN: holds one of the trial slots.
    trial: bool


class CircuitBreaker:
    def __init__(
        self,
        endpoint: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._period = 0
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._trials_in_flight = 0
        self._trial_successes = 0

    @property
    def state(self) -> BreakerState:
        """The state as of now (an OPEN breaker whose timeout passed is HALF_OPEN)."""
        self._refresh()
        return self._state

    @property
    def trials_in_flight(self) -> int:
        return self._trials_in_flight

    def acquire(self) -> Permit:
        """A permit for one call, or CircuitOpen."""
        self._refresh()
        if self._state is BreakerState.CLOSED:
            return Permit(self._period, trial=False)
        if self._state is BreakerState.OPEN:
            remaining = self._opened_at + self.settings.reset_timeout_seconds - self._clock()
            raise CircuitOpen(self.endpoint, retry_after=max(remaining, 0.0))
        if self._trials_in_flight >= self.settings.half_open_max_calls:
            raise CircuitOpen(
                self.endpoint,
                retry_after=min(HALF_OPEN_RETRY_AFTER_SECONDS, self.settings.reset_timeout_seconds),
            )
        self._trials_in_flight += 1
        return Permit(self._period, trial=True)

    def allow(self) -> bool:
        """`acquire` as a yes/no; a yes must still be followed by a verdict
        (without a permit, it is taken to belong to the current period)."""
        try:
            self.acquire()
        except CircuitOpen:
            return False
        return True

    def record_success(self, permit: Permit | None = None) -> None:
        if not self._is_current(permit):
            return
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
        elif self._state is BreakerState.HALF_OPEN:
            self._end_trial()
            self._trial_successes += 1
            if self._trial_successes >= self.settings.success_threshold:
                self._move_to(BreakerState.CLOSED)

    def record_failure(self, permit: Permit | None = None) -> None:
        if not self._is_current(permit):
            return
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.settings.failure_threshold:
                self._move_to(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN:
            self._end_trial()
            self._move_to(BreakerState.OPEN)

    def release(self, permit: Permit | None = None) -> None:
        """The call ended without a verdict on the endpoint: frees its trial slot."""
        if self._is_current(permit) and self._state is BreakerState.HALF_OPEN:
            self._end_trial()

    def _is_current(self, permit: Permit | None) -> bool:
        # A verdict for an earlier period says nothing about the endpoint now.
        # Any transition it would have caused has already happened.
        return permit is None or permit.period == self._period

    def _end_trial(self) -> None:
        self._trials_in_flight = max(0, self._trials_in_flight - 1)

    def _refresh(self) -> None:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.settings.reset_timeout_seconds
        ):
            self._move_to(BreakerState.HALF_OPEN)

    def _move_to(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._period += 1
        self._consecutive_failures = 0
        self._trials_in_flight = 0
        self._trial_successes = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if self._on_transition is not None:
            self._on_transition(old, new)


EndpointTransition = Callable[[str, BreakerState, BreakerState], None]


class BreakerRegistry:
    """One breaker per endpoint, made on first use, all with the same settings."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        on_transition: EndpointTransition | None = None,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, endpoint: str) -> CircuitBreaker:
        breaker = self._breakers.get(endpoint)
        if breaker is None:
            breaker = CircuitBreaker(
                endpoint, self.settings, clock=self._clock, on_transition=self._reporter(endpoint)
            )
            self._breakers[endpoint] = breaker
        return breaker

    def discard(self, endpoint: str) -> None:
        """Forgets an endpoint no agent uses any more."""
        self._breakers.pop(endpoint, None)

    def states(self) -> dict[str, BreakerState]:
        return {endpoint: breaker.state for endpoint, breaker in self._breakers.items()}

    def _reporter(self, endpoint: str) -> Transition | None:
        report = self._on_transition
        if report is None:
            return None

        def on_transition(old: BreakerState, new: BreakerState) -> None:
            report(endpoint, old, new)

        return on_transition
