"""The fair queue's ordering policy, as a pure function over snapshots.

`pick_next` decides which queued runs start now, given what is queued, what is
active, the limits, and when each user was last served. It keeps no state, so
the same decision can be made from a database table (the caller stores each
user's last-served tick, see `mark_served`).

The policy:
* Round-robin across users: the user served least recently goes first (a user
  never served before all others, oldest queued run first among those). Each
  admission makes that user the most recently served, so the next slot goes
  to someone else if anyone else can use it.
* Within a user, first in first out: a user's run is admitted only if each of
  their older queued runs is blocked by its agent's limit.
* Never past a limit: the per-user active limit, the agent's max_concurrency
  (attempts of that agent across all users) and the global cap.
* No head-of-line blocking: a run whose agent is at its limit is passed over,
  and so is a user at their limit; everyone else goes on being served.

So a user with 500 queued runs delays another user's first queued run by at
most one slot (with k other users waiting, by at most k slots), and every
queued run is admitted eventually as long as slots keep freeing up.

A run with an empty `agent` (a workflow, whose steps run different agents) is
not held to any agent's limit here; its steps are limited as they run.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_AGENT_MAX_CONCURRENCY = 10


@dataclass(frozen=True, slots=True)
class QueuedRun:
    run_id: str
    user_id: str
    agent: str
    # Arrival order (a table's insertion sequence, or creation time in
    # microseconds); ties go to the smaller run_id.
    sequence: int


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(counts))


@dataclass(frozen=True, slots=True)
class ActiveCounts:
    """What is running now."""

    per_user: Mapping[str, int] = field(default_factory=dict, hash=False)
    per_agent: Mapping[str, int] = field(default_factory=dict, hash=False)
    total: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_user", _frozen_counts(self.per_user))
        object.__setattr__(self, "per_agent", _frozen_counts(self.per_agent))


@dataclass(frozen=True, slots=True)
class Limits:
    per_user: int = 2
    global_cap: int = 50
    # The agents' max_concurrency; an agent not listed gets `default_per_agent`.
    per_agent: Mapping[str, int] = field(default_factory=dict, hash=False)
    default_per_agent: int = DEFAULT_AGENT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_agent", _frozen_counts(self.per_agent))
        if self.per_user < 1 or self.global_cap < 1 or self.default_per_agent < 1:
            raise ValueError("limits must be at least 1")

    def agent_limit(self, agent: str) -> int:
        return self.per_agent.get(agent, self.default_per_agent)


def _arrival(run: QueuedRun) -> tuple[int, str]:
    return run.sequence, run.run_id


def pick_next(
    queued: Iterable[QueuedRun],
    active: ActiveCounts,
    limits: Limits,
    last_served: Mapping[str, int],
) -> list[str]:
    """The run ids to admit now, in the order they were chosen.

    `last_served[user]` is the tick at which the user last had a run admitted
    (larger is more recent; a user not in it was never served). After
    admitting, record the new ticks with `mark_served`.
    """
    per_user_queue: dict[str, list[QueuedRun]] = {}
    for run in queued:
        per_user_queue.setdefault(run.user_id, []).append(run)
    for runs in per_user_queue.values():
        runs.sort(key=_arrival)

    user_active = dict(active.per_user)
    agent_active = dict(active.per_agent)
    total = active.total
    tick = max(last_served.values(), default=0)

    # Least recently served first: never served (False) before served (True),
    # then by tick, then by the user's oldest queued run.
    turns: list[tuple[bool, int, tuple[int, str], str]] = []
    for user, runs in per_user_queue.items():
        served = user in last_served
        turns.append((served, last_served.get(user, 0), _arrival(runs[0]), user))
    heapq.heapify(turns)

    admitted: list[str] = []
    while turns and total < limits.global_cap:
        _, _, _, user = heapq.heappop(turns)
        if user_active.get(user, 0) >= limits.per_user:
            continue  # at their limit: out of this round, others go on
        runs = per_user_queue[user]
        chosen = next(
            (
                index
                for index, run in enumerate(runs)
                if not run.agent or agent_active.get(run.agent, 0) < limits.agent_limit(run.agent)
            ),
            None,
        )
        if chosen is None:
            continue  # every agent this user waits for is full
        run = runs.pop(chosen)
        admitted.append(run.run_id)
        total += 1
        user_active[user] = user_active.get(user, 0) + 1
        if run.agent:
            agent_active[run.agent] = agent_active.get(run.agent, 0) + 1
        if runs:
            tick += 1
            heapq.heappush(turns, (True, tick, _arrival(runs[0]), user))
    return admitted


def mark_served(last_served: Mapping[str, int], users_in_order: Sequence[str]) -> dict[str, int]:
    """`last_served` after admitting runs of these users, in this order (the
    users of `pick_next`'s answer): each becomes more recent than all before."""
    updated = dict(last_served)
    tick = max(updated.values(), default=0)
    for user in users_in_order:
        tick += 1
        updated[user] = tick
    return updated
