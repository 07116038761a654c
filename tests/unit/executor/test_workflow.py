"""Workflow validation, planning and input mapping (pure; no services)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.executor.workflow import (
    INPUT_MAPPING_FAILED,
    WORKFLOW_INVALID,
    InputMappingError,
    WorkflowPlan,
    WorkflowStepSpec,
    resolve_step_input,
    validate_workflow,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CYCLE_DESCRIPTION = re.compile(r"^dependency cycle: (.+)$")


def step(step_id: str, *depends_on: str, agent: str = "echo", **extra: Any) -> WorkflowStepSpec:
    return WorkflowStepSpec(step_id=step_id, agent=agent, depends_on=depends_on, **extra)


def violations_of(steps: Sequence[WorkflowStepSpec]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        validate_workflow(steps)
    assert caught.value.reason == WORKFLOW_INVALID
    return [(v.field, v.description) for v in caught.value.violations]


def edges_of(steps: Sequence[WorkflowStepSpec]) -> dict[str, set[str]]:
    return {s.step_id: set(s.depends_on) for s in steps}


def reachable(start: str, edges: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    pending = list(edges.get(start, ()))
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(edges.get(node, ()))
    return seen


# --- strategies ----------------------------------------------------------------

step_ids = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)


@st.composite
def dags(draw: st.DrawFn, max_steps: int = 12) -> list[WorkflowStepSpec]:
    """A random acyclic workflow declared in a random order, with some inputs
    that refer to outputs of (transitive) dependencies."""
    ids = draw(st.lists(step_ids, min_size=1, max_size=max_steps, unique=True))
    # `ids` is the hidden topological order: a step depends only on earlier ones.
    dependencies: dict[str, list[str]] = {}
    for position, step_id in enumerate(ids):
        earlier = ids[:position]
        dependencies[step_id] = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
    edges = {key: set(value) for key, value in dependencies.items()}
    specs: list[WorkflowStepSpec] = []
    for step_id in ids:
        inputs: dict[str, Any] = {"literal": draw(st.integers())}
        ancestors = sorted(reachable(step_id, edges))
        refer = draw(st.booleans())
        if ancestors and refer:
            source = draw(st.sampled_from(ancestors))
            inputs["mapped"] = [f"${{steps.{source}.output.value}}"]
        compensation = draw(st.sampled_from(["", "undo"]))
        specs.append(
            WorkflowStepSpec(
                step_id, "echo", inputs, tuple(dependencies[step_id]), compensation_agent=compensation
            )
        )
    return draw(st.permutations(specs))


# --- valid workflows ----------------------------------------------------------------


@PROPERTY_SETTINGS
@given(steps=dags(), data=st.data())
def test_random_dags_are_accepted_and_ready_yields_a_valid_execution(
    steps: list[WorkflowStepSpec], data: st.DataObject
) -> None:
    plan = validate_workflow(steps)
    edges = edges_of(steps)

    assert sorted(plan.order) == sorted(edges)
    position = {step_id: index for index, step_id in enumerate(plan.order)}
    for step_id, dependencies in edges.items():
        assert all(position[d] < position[step_id] for d in dependencies)

    # Run it: any non-empty subset of the ready steps may run at once.
    done: set[str] = set()
    while len(done) < len(edges):
        ready = plan.ready(done)
        expected = [s.step_id for s in steps if s.step_id not in done and edges[s.step_id] <= done]
        assert ready == expected
        assert ready, "a valid workflow never gets stuck"
        batch = data.draw(st.lists(st.sampled_from(ready), min_size=1, unique=True))
        # Started steps are not offered again while they run.
        assert not set(plan.ready(done, started=set(batch))) & set(batch)
        done |= set(batch)
    assert plan.ready(done) == []


@PROPERTY_SETTINGS
@given(steps=dags())
def test_dependents_and_downstream_mirror_depends_on(steps: list[WorkflowStepSpec]) -> None:
    plan = validate_workflow(steps)
    edges = edges_of(steps)
    for step_id in edges:
        assert set(plan.dependents(step_id)) == {s for s, deps in edges.items() if step_id in deps}
        assert plan.downstream(step_id) == {s for s in edges if step_id in reachable(s, edges)}


def test_order_is_topological_with_ties_in_declaration_order() -> None:
    plan = validate_workflow([step("c"), step("b", "d"), step("a"), step("d", "c")])
    assert plan.order == ("c", "a", "d", "b")
    assert plan.ready(set()) == ["c", "a"]
    assert plan.ready({"c"}) == ["a", "d"]


def test_compensation_order_is_reverse_completion_of_steps_with_a_compensation() -> None:
    plan = validate_workflow(
        [
            step("reserve", compensation_agent="release"),
            step("charge", "reserve", compensation_agent="refund"),
            step("notify", "reserve"),
            step("ship", "charge", compensation_agent="recall"),
        ]
    )
    assert plan.compensation_order(["reserve", "notify", "charge"]) == ["charge", "reserve"]
    assert plan.compensation_order([]) == []
    with pytest.raises(KeyError):
        plan.compensation_order(["nope"])
    with pytest.raises(ValueError, match="twice"):
        plan.compensation_order(["reserve", "reserve"])


# --- invalid workflows ------------------------------------------------------------------


def test_a_cycle_is_named_step_by_step_in_order() -> None:
    problems = violations_of([step("a", "b"), step("b", "c"), step("c", "a"), step("d", "a")])
    assert problems == [("workflow.steps[0].depends_on[0]", "dependency cycle: a -> b -> c -> a")]


def test_every_problem_is_reported_at_once() -> None:
    problems = dict(
        violations_of(
            [
                step("Bad"),
                step("a", "a", "ghost", agent="X"),
                step("b", "c"),
                step("c", "b", compensation_agent="-no"),
                step("a"),
            ]
        )
    )
    assert problems == {
        "workflow.steps[0].step_id": "step id 'Bad' must match ^[a-z][a-z0-9_-]{0,62}$",
        "workflow.steps[1].agent": "step 'a': agent 'X' must match ^[a-z][a-z0-9-]{1,62}$",
        "workflow.steps[1].depends_on[0]": "step 'a' depends on itself",
        "workflow.steps[1].depends_on[1]": "step 'a' depends on unknown step 'ghost'",
        "workflow.steps[2].depends_on[0]": "dependency cycle: b -> c -> b",
        "workflow.steps[3].compensation_agent": (
            "step 'c': compensation agent '-no' must match ^[a-z][a-z0-9-]{1,62}$"
        ),
        "workflow.steps[4].step_id": "duplicate step id 'a' (also workflow.steps[1])",
    }


def test_step_count_is_bounded() -> None:
    assert violations_of([]) == [("workflow.steps", "a workflow needs at least one step")]
    too_many = [step(f"s{i}") for i in range(101)]
    assert violations_of(too_many) == [("workflow.steps", "a workflow has at most 100 steps, not 101")]
    assert len(validate_workflow(too_many[:100]).order) == 100


def test_a_repeated_dependency_is_refused() -> None:
    assert violations_of([step("a"), step("b", "a", "a")]) == [
        ("workflow.steps[1].depends_on[1]", "step 'b' lists dependency 'a' twice")
    ]


def test_a_newline_does_not_sneak_past_the_patterns() -> None:
    fields = [field for field, _ in violations_of([step("a\n", agent="echo\n")])]
    assert fields == ["workflow.steps[0].step_id", "workflow.steps[0].agent"]


@st.composite
def broken_workflows(draw: st.DrawFn) -> tuple[list[WorkflowStepSpec], list[str]]:
    """A random DAG with one or more of: a cycle, an unknown dependency, a
    duplicate step id, a self-dependency. Returns the steps and what was broken."""
    steps = draw(dags(max_steps=10))
    broken: list[str] = []
    ids = [s.step_id for s in steps]
    by_id = {s.step_id: s for s in steps}

    def add_dependencies(step_id: str, *extra: str) -> None:
        spec = by_id[step_id]
        missing = tuple(d for d in extra if d not in spec.depends_on)
        by_id[step_id] = WorkflowStepSpec(
            spec.step_id, spec.agent, spec.input, spec.depends_on + missing, spec.compensation_agent
        )

    if len(ids) >= 2 and draw(st.booleans()):
        cycle = draw(st.lists(st.sampled_from(ids), min_size=2, max_size=len(ids), unique=True))
        for current, following in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
            add_dependencies(current, following)
        broken.append("cycle")
    if draw(st.booleans()):
        add_dependencies(draw(st.sampled_from(ids)), "zz-unknown")
        broken.append("unknown")
    if draw(st.booleans()):
        target = draw(st.sampled_from(ids))
        add_dependencies(target, target)
        broken.append("self")
    result = [by_id[step_id] for step_id in ids]
    if draw(st.booleans()) or not broken:
        original = draw(st.sampled_from(result))
        result.append(WorkflowStepSpec(original.step_id, "other"))
        broken.append("duplicate")
    return result, broken


@PROPERTY_SETTINGS
@given(case=broken_workflows())
def test_broken_workflows_are_rejected_naming_the_offending_steps(
    case: tuple[list[WorkflowStepSpec], list[str]],
) -> None:
    steps, broken = case
    problems = violations_of(steps)
    # The graph as the validator sees it: first declaration of each id, known
    # dependencies only, self-edges apart.
    first: dict[str, WorkflowStepSpec] = {}
    for spec in steps:
        first.setdefault(spec.step_id, spec)
    edges = {sid: {d for d in s.depends_on if d in first and d != sid} for sid, s in first.items()}
    on_a_cycle = {sid for sid in edges if sid in reachable(sid, edges)}

    named_on_cycles: set[str] = set()
    for field, description in problems:
        match = CYCLE_DESCRIPTION.match(description)
        if match is None:
            continue
        cycle = match[1].split(" -> ")
        assert cycle[0] == cycle[-1] and len(cycle) >= 3
        assert len(set(cycle[:-1])) == len(cycle) - 1, "an elementary cycle"
        for current, following in itertools.pairwise(cycle):
            assert following in edges[current]
        index = [s.step_id for s in steps].index(cycle[0])
        assert field.startswith(f"workflow.steps[{index}].depends_on[")
        named_on_cycles |= set(cycle)
    assert named_on_cycles == on_a_cycle
    if "cycle" in broken:
        assert on_a_cycle

    for index, spec in enumerate(steps):
        for slot, dependency in enumerate(spec.depends_on):
            where = f"workflow.steps[{index}].depends_on[{slot}]"
            if dependency == "zz-unknown":
                assert (where, f"step {spec.step_id!r} depends on unknown step 'zz-unknown'") in problems
            elif dependency == spec.step_id:
                assert (where, f"step {spec.step_id!r} depends on itself") in problems
    if "duplicate" in broken:
        assert any(
            field == f"workflow.steps[{len(steps) - 1}].step_id" and "duplicate step id" in description
            for field, description in problems
        )


# --- references in step inputs -------------------------------------------------------


def test_references_must_name_a_transitive_dependency() -> None:
    problems = violations_of(
        [
            step("a"),
            step("b", "a"),
            step("c", "b", input={"ok": "${steps.a.output.x}", "also_ok": "${steps.b.output}"}),
            step(
                "d",
                "a",
                input={
                    "nested": {"list": [1, "${steps.b.output.y}"]},
                    "own": "${steps.d.output.z}",
                    "ghost": "${steps.zz.output.z}",
                    "typo": "${steps.a.outptu.x}",
                    "empty": "${steps.a.output..x}",
                    "prose": "see ${steps.b.output.y}",
                },
            ),
        ]
    )
    assert problems == [
        (
            "workflow.steps[3].input.nested.list[1]",
            "step 'd' refers to the output of step 'b', which it does not depend on "
            "(directly or through other steps)",
        ),
        ("workflow.steps[3].input.own", "step 'd' refers to its own output"),
        ("workflow.steps[3].input.ghost", "step 'd' refers to unknown step 'zz'"),
        (
            "workflow.steps[3].input.typo",
            "step 'd': '${steps.a.outptu.x}' is not a reference of the form ${steps.<step_id>.output.<path>}",
        ),
        (
            "workflow.steps[3].input.empty",
            "step 'd': '${steps.a.output..x}' is not a reference of the form ${steps.<step_id>.output.<path>}",
        ),
    ]


def test_step_input_is_merged_over_run_input_and_references_resolved() -> None:
    outputs: dict[str, dict[str, Any]] = {
        "search": {"hits": [{"url": "u1"}, {"url": "u2"}], "count": 2.0},
        "plan": {"steps": ["x"]},
    }
    resolved = resolve_step_input(
        {"topic": "cats", "limit": 5.0, "note": "${steps.search.output.count}"},
        {
            "limit": "${steps.search.output.count}",
            "first": "${steps.search.output.hits.1.url}",
            "nested": {"all": ["${steps.plan.output}", "${steps.search.output.hits.0}", "plain"]},
            "prose": "about ${steps.search.output.count}",
        },
        outputs,
    )
    assert resolved == {
        "topic": "cats",
        "limit": 2.0,
        # The run's input is user data and is never rewritten.
        "note": "${steps.search.output.count}",
        "first": "u2",
        "nested": {"all": [{"steps": ["x"]}, {"url": "u1"}, "plain"]},
        "prose": "about ${steps.search.output.count}",
    }
    resolved["nested"]["all"][1]["url"] = "changed"
    assert outputs["search"]["hits"][0] == {"url": "u1"}, "the result shares nothing with the outputs"


@pytest.mark.parametrize(
    ("reference", "step_id", "path"),
    [
        ("${steps.search.output.missing}", "search", "missing"),
        ("${steps.search.output.hits.5.url}", "search", "hits.5"),
        ("${steps.search.output.hits.first}", "search", "hits.first"),
        ("${steps.search.output.count.deeper}", "search", "count.deeper"),
        ("${steps.later.output.x}", "later", "x"),
    ],
)
def test_a_missing_output_path_fails_the_step(reference: str, step_id: str, path: str) -> None:
    with pytest.raises(InputMappingError) as caught:
        resolve_step_input({}, {"arg": [reference]}, {"search": {"hits": [{"url": "u"}], "count": 1.0}})
    error = caught.value
    assert (error.step_id, error.path, error.field) == (step_id, path, "input.arg[0]")
    assert error.reason == INPUT_MAPPING_FAILED
    assert step_id in error.message and "input.arg[0]" in error.message


def test_step_specs_are_immutable_and_hashable() -> None:
    source: dict[str, Any] = {"a": {"b": [1, 2]}}
    spec = WorkflowStepSpec("s", "echo", source, ["x"])  # type: ignore[arg-type]
    source["a"]["b"].append(3)
    assert spec.input == {"a": {"b": (1, 2)}}
    assert spec.depends_on == ("x",)
    with pytest.raises(TypeError):
        spec.input["a"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.input["a"]["c"] = 1
    assert hash(spec) == hash(WorkflowStepSpec("s", "echo", {"a": {"b": [1, 2]}}, ("x",)))
    assert isinstance(validate_workflow([step("x"), spec]), WorkflowPlan)
