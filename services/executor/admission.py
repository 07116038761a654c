"""Admission shared by every executor replica: what one admission round
decides, and the lease and fencing vocabulary around it. No I/O here.

Several executor processes may share one database (PostgreSQL). Who runs
what lives there, never in one process's memory:

* A queued run is a row in state QUEUED with no owner. The replica whose
  admission round admits it *claims* it: owner = that replica, a lease
  (`lease_expires_at`) and `fence` + 1, the claim's fencing token.
* A claimed run is *active* until it ends, whichever replica runs it: it
  counts against its user's limit, the global cap and (a single-agent run)
  its agent's max_concurrency.
* A workflow step, and each compensation, holds an agent slot while it runs:
  a row tied to the run's fence, granted first come first served while the
  agent is full. A slot counts only while its run is active under that same
  fence, so the slots of a replica that lost the run stop counting the moment
  another replica claims it.
* An admission round is one transaction, serialized across replicas by the
  admission lock row: it reads an `AdmissionSnapshot`, asks `plan_admission`
  and writes the claims and grants. Nothing else ever raises a count, so the
  per-user, per-agent and global limits hold across all replicas.
* The owner renews its lease while it runs the run, and every state change it
  writes carries the fence it claimed the run with: storage refuses a change
  whose fence has moved on (`LeaseLost`), so a late or duplicate write from a
  replica that lost its lease is never applied. A run whose lease expired
  (its replica died, or lost the database) is claimed again (fence + 1) by
  any replica and recovered as after a restart.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from services.executor.fair_queue import (
    DEFAULT_AGENT_MAX_CONCURRENCY,
    ActiveCounts,
    Limits,
    QueuedRun,
    pick_next,
)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """The executor's own limits (agents' max_concurrency come from the registry)."""

    max_active: int
    max_active_per_user: int

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.max_active_per_user < 1:
            raise ValueError("limits must be at least 1")


@dataclass(frozen=True, slots=True)
class SlotRequest:
    """A workflow step (or compensation) waiting for a slot of its agent."""

    slot_id: str
    agent: str
    # Arrival order across all replicas.
    order: int


@dataclass(frozen=True, slots=True)
class AdmissionSnapshot:
    """What an admission round sees, read under the admission lock."""

    # Waiting runs (a bounded look-ahead per user), as the fair queue sees them.
    queued: tuple[QueuedRun, ...]
    # Active runs, and (in per_agent) the agent slots held by workflow steps.
    active: ActiveCounts
    waiting_slots: tuple[SlotRequest, ...]
    # Each waiting user's newest admission tick (users never admitted are absent).
    last_served: Mapping[str, int] = field(default_factory=dict, hash=False)
    # The newest tick handed out by any round.
    tick: int = 0


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    # (run_id, its user's new round-robin tick), in the order chosen.
    admit: tuple[tuple[str, int], ...]
    grant: tuple[str, ...]
    tick: int


def plan_admission(
    snapshot: AdmissionSnapshot, *, limits: AdmissionLimits, agent_limits: Mapping[str, int]
) -> AdmissionPlan:
    """Which waiting slots to grant and which queued runs to admit now.

    Waiting steps go first (their runs have already started), first come first
    served per agent; then `fair_queue.pick_next` chooses among the queued
    runs under what is left. `agent_limits` holds the max_concurrency of the
    agents whose limit is known this round: a run or step of any other agent
    waits for a later round rather than being admitted under a guess.
    """
    per_agent = dict(snapshot.active.per_agent)
    grant: list[str] = []
    for request in sorted(snapshot.waiting_slots, key=lambda r: r.order):
        limit = agent_limits.get(request.agent)
        if limit is not None and per_agent.get(request.agent, 0) < limit:
            per_agent[request.agent] = per_agent.get(request.agent, 0) + 1
            grant.append(request.slot_id)
    queued = [run for run in snapshot.queued if not run.agent or run.agent in agent_limits]
    chosen = pick_next(
        queued,
        ActiveCounts(per_user=snapshot.active.per_user, per_agent=per_agent, total=snapshot.active.total),
        Limits(
            per_user=limits.max_active_per_user,
            global_cap=limits.max_active,
            per_agent=agent_limits,
            default_per_agent=DEFAULT_AGENT_MAX_CONCURRENCY,
        ),
        snapshot.last_served,
    )
    # As fair_queue.mark_served: each admission is the newest turn of all.
    tick = max(snapshot.tick, *snapshot.last_served.values(), 0)
    admit: list[tuple[str, int]] = []
    for run_id in chosen:
        tick += 1
        admit.append((run_id, tick))
    return AdmissionPlan(admit=tuple(admit), grant=tuple(grant), tick=tick)


@dataclass(frozen=True, slots=True)
class Claim:
    """A run this replica now holds: admitted from the queue, or taken over."""

    run_id: str
    user_id: str
    # Empty for a workflow.
    agent: str
    create_time: datetime
    # The fencing token every write of this claim carries.
    fence: int
    # The run's admission tick (0 if it never went through the fair queue).
    tick: int = 0


@dataclass(frozen=True, slots=True)
class Renewal:
    """The answer to a lease renewal. A run asked about that is in neither set
    is another claim's now: its execution here must stop."""

    kept: frozenset[str]
    # Ended meanwhile: their executions finish on their own.
    ended: frozenset[str]


@dataclass(frozen=True, slots=True)
class AdmissionOutcome:
    claims: tuple[Claim, ...]
    # This replica's waiting slots (of those it asked about) that are granted.
    granted: frozenset[str]
    snapshot: AdmissionSnapshot


class ReplicaNotices(Protocol):
    """What other replicas did, as far as this one needs to know at once."""

    def run_changed(self, run_id: str) -> None:
        """The run's state changed (its WaitRun waiters, and its execution
        here if any, look again)."""
        ...

    def admission_changed(self) -> None:
        """A run ended, or a slot was freed or granted: admit again."""
        ...

    def leases_released(self) -> None:
        """A replica stopped and handed its runs over: take them over now."""
        ...

    def resync(self) -> None:
        """Notices may have been missed (the listener reconnected): look at everything."""
        ...


class AdmissionPlanner(Protocol):
    def __call__(self, snapshot: AdmissionSnapshot) -> AdmissionPlan: ...


class AdmissionStore(Protocol):
    """The scheduler's port to the shared database."""

    async def admission_agents(self) -> set[str]:
        """Agents of the queued runs and of the waiting slots."""
        ...

    async def admission_round(self, plan: AdmissionPlanner, mine: Collection[str] = ()) -> AdmissionOutcome:
        """One admission round (see the module docstring); `mine` names this
        replica's waiting slots, whose grants (by any replica) come back."""
        ...

    async def request_slot(self, slot_id: str, *, run_id: str, fence: int, step_id: str, agent: str) -> None:
        """Queues a slot request of the run's step (granted by a later round)."""
        ...

    async def release_slot(self, slot_id: str) -> None:
        """Frees a slot, or withdraws its request."""
        ...

    async def renew_leases(self, fences: Mapping[str, int]) -> Renewal:
        """Extends the leases of the runs (run_id -> fence) this replica still
        holds, unended."""
        ...

    async def claim_expired(
        self, *, exclude: Collection[str] = (), reclaim_own: bool = False, limit: int = 100
    ) -> list[Claim]:
        """Claims (fence + 1) active runs whose lease has expired, oldest first,
        except `exclude` (runs this replica is still winding up). With
        `reclaim_own`, also the runs held under this replica's own id (at
        start-up: they were its previous life's). Never a live lease of
        another replica."""
        ...

    async def listen(self, notices: ReplicaNotices) -> None:
        """Hands other replicas' notices to `notices` until cancelled; returns
        at once where no other replica can share the database."""
        ...

    async def release_leases(self, run_ids: Collection[str]) -> None:
        """Lets the leases of these runs (still this replica's) expire now, so
        that another replica takes them over at once (a graceful stop)."""
        ...
