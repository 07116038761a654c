"""The fair queue's policy: limits, round-robin fairness, FIFO per user, no
head-of-line blocking, no starvation. Driven by a small in-memory simulation."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.executor.fair_queue import ActiveCounts, Limits, QueuedRun, mark_served, pick_next

PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Simulation:
    """A queue driven only through `pick_next`, checking the limits after
    every admission round."""

    limits: Limits
    queued: list[QueuedRun] = field(default_factory=list)
    active: dict[str, QueuedRun] = field(default_factory=dict)
    last_served: dict[str, int] = field(default_factory=dict)
    admitted: list[QueuedRun] = field(default_factory=list)
    sequence: int = 0

    def arrive(self, user: str, agent: str = "echo") -> QueuedRun:
        self.sequence += 1
        run = QueuedRun(f"r{self.sequence}", user, agent, self.sequence)
        self.queued.append(run)
        return run

    def counts(self) -> ActiveCounts:
        runs = self.active.values()
        return ActiveCounts(
            per_user=Counter(r.user_id for r in runs),
            per_agent=Counter(r.agent for r in runs if r.agent),
            total=len(self.active),
        )

    def blocked(self, run: QueuedRun, counts: ActiveCounts) -> bool:
        return (
            counts.total >= self.limits.global_cap
            or counts.per_user.get(run.user_id, 0) >= self.limits.per_user
            or (bool(run.agent) and counts.per_agent.get(run.agent, 0) >= self.limits.agent_limit(run.agent))
        )

    def pump(self) -> list[QueuedRun]:
        chosen = pick_next(self.queued, self.counts(), self.limits, self.last_served)
        assert len(set(chosen)) == len(chosen)
        by_id = {r.run_id: r for r in self.queued}
        picked = [by_id[run_id] for run_id in chosen]
        self.queued = [r for r in self.queued if r.run_id not in set(chosen)]
        for run in picked:
            self.active[run.run_id] = run
        self.admitted.extend(picked)
        self.last_served = mark_served(self.last_served, [r.user_id for r in picked])
        self.check_limits()
        # No head-of-line blocking: whatever is left could not have been admitted.
        counts = self.counts()
        assert all(self.blocked(run, counts) for run in self.queued)
        return picked

    def finish(self, run_id: str) -> None:
        del self.active[run_id]

    def check_limits(self) -> None:
        counts = self.counts()
        assert counts.total <= self.limits.global_cap
        assert all(n <= self.limits.per_user for n in counts.per_user.values())
        assert all(n <= self.limits.agent_limit(agent) for agent, n in counts.per_agent.items())


USERS = ("ann", "bob", "cid", "dee")
AGENTS = ("echo", "slow", "scarce", "")  # "" is a workflow: no agent limit

limits_strategy = st.builds(
    Limits,
    per_user=st.integers(1, 4),
    global_cap=st.integers(1, 6),
    per_agent=st.fixed_dictionaries({"scarce": st.integers(1, 2), "slow": st.integers(1, 3)}),
    default_per_agent=st.integers(1, 5),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(USERS), st.sampled_from(AGENTS)),
        st.tuples(st.just("finish"), st.integers(0, 100), st.just("")),
        st.tuples(st.just("pump"), st.just(""), st.just("")),
    ),
    max_size=60,
)


def play(simulation: Simulation, steps: list[tuple[str, object, str]]) -> None:
    for kind, who, agent in steps:
        if kind == "arrive":
            simulation.arrive(str(who), agent)
        elif kind == "finish" and simulation.active:
            active = sorted(simulation.active)
            simulation.finish(active[int(str(who)) % len(active)])
        elif kind == "pump":
            simulation.pump()


@PROPERTY_SETTINGS
@given(limits=limits_strategy, steps=operations)
def test_limits_hold_and_nothing_admissible_is_left_waiting(
    limits: Limits, steps: list[tuple[str, object, str]]
) -> None:
    # The checks run inside every pump.
    simulation = Simulation(limits)
    play(simulation, steps)
    simulation.pump()


@PROPERTY_SETTINGS
@given(limits=limits_strategy, steps=operations)
def test_first_in_first_out_within_a_user(limits: Limits, steps: list[tuple[str, object, str]]) -> None:
    simulation = Simulation(limits)
    for kind, who, agent in steps:
        if kind != "pump":
            play(simulation, [(kind, who, agent)])
            continue
        picked = simulation.pump()
        for run in picked:
            # An older run of the same user is only passed over when its agent is full.
            for older in simulation.queued:
                if older.user_id == run.user_id and older.sequence < run.sequence:
                    assert older.agent and older.agent != run.agent
                    assert simulation.counts().per_agent.get(older.agent, 0) >= limits.agent_limit(
                        older.agent
                    )
    for user in USERS:
        for agent in AGENTS:
            order = [r.sequence for r in simulation.admitted if r.user_id == user and r.agent == agent]
            assert order == sorted(order)


@PROPERTY_SETTINGS
@given(
    heavy_runs=st.integers(1, 60),
    others=st.lists(st.sampled_from(USERS[1:]), min_size=1, max_size=3, unique=True),
    global_cap=st.integers(1, 4),
    warmup=st.integers(0, 10),
    finish_choices=st.lists(st.integers(0, 100), min_size=1, max_size=200),
    data=st.data(),
)
def test_a_busy_user_delays_another_users_first_run_by_at_most_one_slot(
    heavy_runs: int,
    others: list[str],
    global_cap: int,
    warmup: int,
    finish_choices: list[int],
    data: st.DataObject,
) -> None:
    # Agent limits never bind here, and the per-user limit is large, so the
    # global slots are what everyone competes for.
    simulation = Simulation(Limits(per_user=100, global_cap=global_cap, default_per_agent=100))
    for _ in range(heavy_runs):
        simulation.arrive("ann")
    waiting: dict[str, int] = {}  # user -> index into `admitted` when their run arrived
    choices = itertools.cycle(finish_choices)
    for round_number in range(heavy_runs + 20 + len(others) * 2):
        # Late rounds only drain: one slot frees up each round.
        if warmup <= round_number < heavy_runs + 20:
            for user in others:
                if user not in waiting and data.draw(st.booleans()):
                    simulation.arrive(user)
                    waiting[user] = len(simulation.admitted)
        if simulation.active:
            active = sorted(simulation.active)
            simulation.finish(active[next(choices) % len(active)])
        simulation.pump()

    for user, since in waiting.items():
        served_before: Counter[str] = Counter()
        for run in simulation.admitted[since:]:
            if run.user_id == user:
                break
            served_before[run.user_id] += 1
        else:
            pytest.fail(f"{user}'s run was never admitted")
        # Each other user gets at most one slot first; with only the busy user
        # around that is one slot.
        assert all(n <= 1 for n in served_before.values()), served_before


@PROPERTY_SETTINGS
@given(limits=limits_strategy, steps=operations, finish_choices=st.lists(st.integers(0, 100), min_size=1))
def test_no_run_starves_while_slots_keep_freeing_up(
    limits: Limits, steps: list[tuple[str, object, str]], finish_choices: list[int]
) -> None:
    simulation = Simulation(limits)
    play(simulation, steps)
    backlog = {r.run_id for r in simulation.queued}
    # Busy users keep queueing work for the scarcest agent all along, while
    # one run at a time finishes; every active run finishes in the end (every
    # fourth round, the one that has run longest).
    choices = itertools.cycle(finish_choices)
    bound = (len(backlog) + 1) * len(USERS) * limits.global_cap * 4
    for round_number in range(bound):
        if not backlog & {r.run_id for r in simulation.queued}:
            break
        simulation.arrive("ann", "scarce")
        simulation.arrive("bob", "scarce")
        if simulation.active:
            active = list(simulation.active)  # in admission order
            index = 0 if round_number % 4 == 0 else next(choices) % len(active)
            simulation.finish(active[index])
        simulation.pump()
    assert not backlog & {r.run_id for r in simulation.queued}, "a queued run was never admitted"


# --- examples ---------------------------------------------------------------------


def test_five_hundred_queued_runs_do_not_hold_back_a_newcomer() -> None:
    simulation = Simulation(Limits(per_user=500, global_cap=3))
    for _ in range(500):
        simulation.arrive("ann")
    assert [r.user_id for r in simulation.pump()] == ["ann"] * 3

    newcomer = simulation.arrive("bob")
    simulation.finish(simulation.admitted[0].run_id)
    assert simulation.pump() == [newcomer]


def test_a_user_served_more_recently_waits_for_one_slot_of_the_other() -> None:
    limits = Limits(per_user=10, global_cap=2)
    queued = [QueuedRun(f"a{i}", "ann", "echo", i) for i in range(5)] + [QueuedRun("b1", "bob", "echo", 99)]
    last_served = {"ann": 3, "bob": 7}
    assert pick_next(queued, ActiveCounts(total=1), limits, last_served) == ["a0"]
    assert pick_next(queued, ActiveCounts(total=0), limits, last_served) == ["a0", "b1"]


def test_users_alternate_and_never_served_users_go_first() -> None:
    queued = [
        QueuedRun("a1", "ann", "echo", 1),
        QueuedRun("a2", "ann", "echo", 2),
        QueuedRun("b1", "bob", "echo", 3),
        QueuedRun("b2", "bob", "echo", 4),
        QueuedRun("c1", "cid", "echo", 5),
    ]
    limits = Limits(per_user=5, global_cap=5)
    assert pick_next(queued, ActiveCounts(), limits, {}) == ["a1", "b1", "c1", "a2", "b2"]
    assert pick_next(queued, ActiveCounts(), limits, {"ann": 1, "bob": 2}) == ["c1", "a1", "b1", "a2", "b2"]


def test_a_full_agent_does_not_block_other_agents_or_users() -> None:
    queued = [
        QueuedRun("a-scarce", "ann", "scarce", 1),
        QueuedRun("a-echo", "ann", "echo", 2),
        QueuedRun("b-scarce", "bob", "scarce", 3),
        QueuedRun("c-echo", "cid", "echo", 4),
    ]
    limits = Limits(per_user=1, global_cap=10, per_agent={"scarce": 1})
    active = ActiveCounts(per_user={"dee": 1}, per_agent={"scarce": 1}, total=1)
    assert pick_next(queued, active, limits, {}) == ["a-echo", "c-echo"]


def test_per_user_and_global_limits() -> None:
    queued = [QueuedRun(f"a{i}", "ann", "echo", i) for i in range(4)] + [
        QueuedRun(f"b{i}", "bob", "echo", 10 + i) for i in range(4)
    ]
    limits = Limits(per_user=2, global_cap=3)
    assert pick_next(queued, ActiveCounts(per_user={"ann": 1}, total=1), limits, {}) == ["a0", "b0"]
    assert pick_next(queued, ActiveCounts(total=3), limits, {}) == []
    # A limit lowered below what is active admits nothing for that user.
    assert pick_next(
        queued, ActiveCounts(per_user={"ann": 5}, total=5), Limits(per_user=2, global_cap=9), {}
    ) == [
        "b0",
        "b1",
    ]


def test_workflow_runs_are_not_held_to_an_agent_limit() -> None:
    queued = [QueuedRun("w1", "ann", "", 1), QueuedRun("w2", "bob", "", 2)]
    limits = Limits(per_user=2, global_cap=5, default_per_agent=1)
    assert pick_next(queued, ActiveCounts(per_agent={"echo": 1}, total=1), limits, {}) == ["w1", "w2"]


def test_mark_served_makes_each_user_more_recent_than_all_before() -> None:
    assert mark_served({"ann": 4, "bob": 2}, ["bob", "cid", "bob"]) == {"ann": 4, "bob": 7, "cid": 6}
    assert mark_served({}, []) == {}


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limits(per_user=0)
