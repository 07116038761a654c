"""Workflows: validating a graph of steps, its execution order, and step inputs.

A workflow is a set of steps, each running one agent, that may depend on other
steps (`depends_on`). `validate_workflow` checks the whole graph at `StartRun`
and answers ONE `InvalidArgument` naming every problem (bad ids or agent names,
duplicate ids, unknown or self dependencies, every step on a dependency cycle,
references to outputs a step cannot see). A valid graph becomes a
`WorkflowPlan`: a deterministic topological order, the steps that are `ready`
once others are done (independent branches run concurrently), the steps
downstream of a failure, and the order in which completed steps are
compensated (reverse completion order).

Input mapping (what `resolve_step_input` does when a step starts):

* The step's input is merged over the run's input, key by key at the top level:
  a key in the step input replaces the run input's value of that key.
* Any string value of the step input (at any depth, inside objects and lists)
  that is exactly `${steps.<step_id>.output.<dotted.path>}` is replaced by that
  value of the named step's output; `${steps.<step_id>.output}` is the whole
  output. A path segment that is a decimal number indexes a list
  (`items.0.name`). The replacement is a copy, of any JSON type.
* Only the step's own input is searched for references: the run's input is
  user data and passes through literally. Text that merely contains a
  reference (`"see ${steps.a.output.x}"`) is not a reference and stays as it is.
* Checked at validation: the referenced step must be a dependency of the step,
  directly or through other steps (otherwise its output may not exist yet); a
  string starting with `${steps.` that is not a well-formed reference is
  refused rather than silently taken literally.
* Checked when the step starts: a path that the output does not have raises
  `InputMappingError`, which fails that step (reason INPUT_MAPPING_FAILED), not
  the RPC that happens to be running.

No grpc, proto or SQL here.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument

STEP_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
MAX_STEPS = 100

# The reason of a workflow refused at StartRun, and of a step whose input
# could not be built.
WORKFLOW_INVALID = "WORKFLOW_INVALID"
INPUT_MAPPING_FAILED = "INPUT_MAPPING_FAILED"

_REFERENCE_PREFIX = "${steps."
_REFERENCE = re.compile(r"\$\{steps\.(?P<step>[^.{}]+)\.output(?:\.(?P<path>[^{}]+))?\}")


# --- immutable JSON values -------------------------------------------------


def freeze_json(value: Any) -> Any:
    """A deep, immutable copy of a JSON value: objects become read-only
    mappings, lists become tuples."""
    if isinstance(value, Mapping):
        frozen: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            frozen[key] = freeze_json(item)
        return MappingProxyType(frozen)
    if isinstance(value, list | tuple):
        return tuple(freeze_json(item) for item in value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def thaw_json(value: Any) -> Any:
    """A deep, mutable copy of a JSON value (dicts and lists), sharing nothing
    with the original."""
    if isinstance(value, Mapping):
        return {key: thaw_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [thaw_json(item) for item in value]
    return value


def _empty_input() -> Mapping[str, Any]:
    return MappingProxyType({})


# --- steps and the plan ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkflowStepSpec:
    """One step as the caller described it. `input` is stored deep-frozen, so a
    spec can be shared freely; `depends_on` may be given as any sequence."""

    step_id: str
    agent: str
    # Hashing a mapping is not possible; equality still compares it.
    input: Mapping[str, Any] = field(default_factory=_empty_input, hash=False)
    depends_on: tuple[str, ...] = ()
    # Empty: nothing to undo when the workflow fails after this step succeeded.
    compensation_agent: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", freeze_json(self.input))
        object.__setattr__(self, "depends_on", tuple(self.depends_on))


@dataclass(frozen=True, slots=True)
class WorkflowPlan:
    """A validated workflow. Build it with `validate_workflow`, which guarantees
    unique ids, known dependencies and no cycles."""

    steps: tuple[WorkflowStepSpec, ...]
    # Every step after all of its dependencies; ties go to the step declared first.
    order: tuple[str, ...]
    _by_id: Mapping[str, WorkflowStepSpec] = field(init=False, repr=False, compare=False)
    _dependents: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = {step.step_id: step for step in self.steps}
        dependents: dict[str, list[str]] = {step.step_id: [] for step in self.steps}
        for step in self.steps:
            for dependency in step.depends_on:
                dependents[dependency].append(step.step_id)
        object.__setattr__(self, "_by_id", MappingProxyType(by_id))
        object.__setattr__(
            self, "_dependents", MappingProxyType({key: tuple(value) for key, value in dependents.items()})
        )

    @property
    def step_ids(self) -> tuple[str, ...]:
        """In declaration order."""
        return tuple(step.step_id for step in self.steps)

    def step(self, step_id: str) -> WorkflowStepSpec:
        try:
            return self._by_id[step_id]
        except KeyError:
            raise KeyError(f"the workflow has no step {step_id!r}") from None

    def ready(self, done: Set[str], started: Set[str] = frozenset()) -> list[str]:
        """Steps that may start now: not done, not `started` (running or
        retrying), and every dependency done. In declaration order; all of them
        may run at once."""
        return [
            step.step_id
            for step in self.steps
            if step.step_id not in done
            and step.step_id not in started
            and all(dependency in done for dependency in step.depends_on)
        ]

    def dependents(self, step_id: str) -> tuple[str, ...]:
        """The steps that list `step_id` in their `depends_on`, in declaration order."""
        self.step(step_id)
        return self._dependents[step_id]

    def downstream(self, step_id: str) -> frozenset[str]:
        """Every step that depends on `step_id`, directly or not: the steps that
        can no longer run once it failed."""
        found: set[str] = set()
        pending = list(self.dependents(step_id))
        while pending:
            current = pending.pop()
            if current not in found:
                found.add(current)
                pending.extend(self._dependents[current])
        return frozenset(found)

    def compensation_order(self, completed: Sequence[str]) -> list[str]:
        """The completed steps to compensate, last completed first; only steps
        that have a compensation agent. `completed` is in completion order."""
        if len(set(completed)) != len(completed):
            raise ValueError("a step cannot complete twice")
        for step_id in completed:
            self.step(step_id)
        return [step_id for step_id in reversed(completed) if self._by_id[step_id].compensation_agent]


# --- validation ---------------------------------------------------------------


def _parse_reference(text: str) -> tuple[str, tuple[str, ...]] | None:
    """(step id, path) of a well-formed reference; None for any other string."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        return None
    path = tuple(match["path"].split(".")) if match["path"] is not None else ()
    if any(segment == "" for segment in path):
        return None
    return match["step"], path


def _walk_strings(value: Any, where: str) -> Iterable[tuple[str, str]]:
    """(field path, text) of every string inside a JSON value."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _walk_strings(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk_strings(item, f"{where}[{index}]")


def _ancestors(step_id: str, edges: Mapping[str, Sequence[str]]) -> set[str]:
    """Steps `step_id` depends on, directly or not (works on cyclic graphs)."""
    found: set[str] = set()
    pending = list(edges.get(step_id, ()))
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            pending.extend(edges.get(current, ()))
    return found


def _strongly_connected(nodes: Sequence[str], edges: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's components (at most MAX_STEPS nodes, so recursion is shallow)."""
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index_of[node] = low[node] = len(index_of)
        stack.append(node)
        on_stack.add(node)
        for successor in edges[node]:
            if successor not in index_of:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index_of[successor])
        if low[node] == index_of[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in nodes:
        if node not in index_of:
            visit(node)
    return components


def _shortest_cycle(start: str, edges: Mapping[str, Sequence[str]], within: Set[str]) -> list[str]:
    """The shortest cycle start -> ... -> start inside one strongly connected
    component (one always exists there)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        current = queue.popleft()
        for successor in edges[current]:
            if successor not in within:
                continue
            if successor == start:
                path = [current]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor not in previous:
                previous[successor] = current
                queue.append(successor)
    raise AssertionError("a strongly connected component always has a cycle")


def _cycle_violations(
    nodes: Sequence[str], edges: Mapping[str, Sequence[str]], position: Mapping[str, int], prefix: str
) -> list[FieldViolation]:
    """One violation per cycle, enough cycles to name every step on one."""
    violations: list[FieldViolation] = []
    for component in _strongly_connected(nodes, edges):
        if len(component) < 2:
            continue  # self-dependencies are reported on their own, not as cycles
        members = set(component)
        uncovered = sorted(component, key=position.__getitem__)
        while uncovered:
            cycle = _shortest_cycle(uncovered[0], edges, members)
            first, second = cycle[0], cycle[1]
            violations.append(
                FieldViolation(
                    f"{prefix}[{position[first]}].depends_on[{edges[first].index(second)}]",
                    f"dependency cycle: {' -> '.join(cycle)}",
                )
            )
            on_cycle = set(cycle)
            uncovered = [node for node in uncovered if node not in on_cycle]
    return violations


def _topological_order(
    nodes: Sequence[str], edges: Mapping[str, Sequence[str]], position: Mapping[str, int]
) -> tuple[str, ...]:
    """Kahn's algorithm, always taking the earliest-declared step that is free."""
    waiting_on = {node: len(edges[node]) for node in nodes}
    dependents: dict[str, list[str]] = {node: [] for node in nodes}
    for node in nodes:
        for dependency in edges[node]:
            dependents[dependency].append(node)
    free = [position[node] for node in nodes if waiting_on[node] == 0]
    heapq.heapify(free)
    order: list[str] = []
    while free:
        node = nodes[heapq.heappop(free)]
        order.append(node)
        for dependent in dependents[node]:
            waiting_on[dependent] -= 1
            if waiting_on[dependent] == 0:
                heapq.heappush(free, position[dependent])
    if len(order) != len(nodes):
        raise AssertionError("validated workflows are acyclic")
    return tuple(order)


def workflow_violations(
    steps: Sequence[WorkflowStepSpec], prefix: str = "workflow.steps"
) -> list[FieldViolation]:
    """Every problem of the workflow, each naming its step; empty when valid."""
    violations: list[FieldViolation] = []
    add = violations.append
    if not steps:
        add(FieldViolation(prefix, "a workflow needs at least one step"))
        return violations
    if len(steps) > MAX_STEPS:
        add(FieldViolation(prefix, f"a workflow has at most {MAX_STEPS} steps, not {len(steps)}"))

    # The first step of each id defines the graph; later duplicates are errors.
    position: dict[str, int] = {}
    for index, step in enumerate(steps):
        where = f"{prefix}[{index}]"
        if not STEP_ID_PATTERN.fullmatch(step.step_id):
            add(
                FieldViolation(
                    f"{where}.step_id", f"step id {step.step_id!r} must match {STEP_ID_PATTERN.pattern}"
                )
            )
        if step.step_id in position:
            add(
                FieldViolation(
                    f"{where}.step_id",
                    f"duplicate step id {step.step_id!r} (also {prefix}[{position[step.step_id]}])",
                )
            )
        else:
            position[step.step_id] = index
        if not AGENT_NAME_PATTERN.fullmatch(step.agent):
            add(
                FieldViolation(
                    f"{where}.agent",
                    f"step {step.step_id!r}: agent {step.agent!r} must match {AGENT_NAME_PATTERN.pattern}",
                )
            )
        if step.compensation_agent and not AGENT_NAME_PATTERN.fullmatch(step.compensation_agent):
            add(
                FieldViolation(
                    f"{where}.compensation_agent",
                    f"step {step.step_id!r}: compensation agent {step.compensation_agent!r} "
                    f"must match {AGENT_NAME_PATTERN.pattern}",
                )
            )

    edges: dict[str, list[str]] = {step_id: [] for step_id in position}
    for index, step in enumerate(steps):
        owner = position[step.step_id] == index
        seen: set[str] = set()
        for slot, dependency in enumerate(step.depends_on):
            where = f"{prefix}[{index}].depends_on[{slot}]"
            if dependency == step.step_id:
                add(FieldViolation(where, f"step {step.step_id!r} depends on itself"))
            elif dependency not in position:
                add(FieldViolation(where, f"step {step.step_id!r} depends on unknown step {dependency!r}"))
            elif dependency in seen:
                add(FieldViolation(where, f"step {step.step_id!r} lists dependency {dependency!r} twice"))
            elif owner:
                edges[step.step_id].append(dependency)
            seen.add(dependency)

    nodes = list(position)
    violations.extend(_cycle_violations(nodes, edges, position, prefix))

    for index, step in enumerate(steps):
        # What the step may see: its dependencies and everything they depend on.
        visible: set[str] = set()
        for dependency in step.depends_on:
            if dependency in edges and dependency != step.step_id:
                visible |= {dependency} | _ancestors(dependency, edges)
        for where, text in _walk_strings(step.input, f"{prefix}[{index}].input"):
            if not text.startswith(_REFERENCE_PREFIX):
                continue
            parsed = _parse_reference(text)
            if parsed is None:
                add(
                    FieldViolation(
                        where,
                        f"step {step.step_id!r}: {text!r} is not a reference of the form "
                        "${steps.<step_id>.output.<path>}",
                    )
                )
                continue
            source, _ = parsed
            if source == step.step_id:
                add(FieldViolation(where, f"step {step.step_id!r} refers to its own output"))
            elif source not in position:
                add(FieldViolation(where, f"step {step.step_id!r} refers to unknown step {source!r}"))
            elif source not in visible:
                add(
                    FieldViolation(
                        where,
                        f"step {step.step_id!r} refers to the output of step {source!r}, "
                        "which it does not depend on (directly or through other steps)",
                    )
                )
    return violations


def validate_workflow(steps: Sequence[WorkflowStepSpec], prefix: str = "workflow.steps") -> WorkflowPlan:
    """The plan of a valid workflow; otherwise one InvalidArgument (reason
    WORKFLOW_INVALID) listing every problem. `prefix` is the field path of the
    steps in the request."""
    violations = workflow_violations(steps, prefix)
    if violations:
        raise InvalidArgument(violations, reason=WORKFLOW_INVALID)
    nodes = [step.step_id for step in steps]
    position = {step_id: index for index, step_id in enumerate(nodes)}
    edges = {step.step_id: list(step.depends_on) for step in steps}
    return WorkflowPlan(steps=tuple(steps), order=_topological_order(nodes, edges, position))


# --- input mapping -------------------------------------------------------------


class InputMappingError(Exception):
    """A step's input refers to output that is not there. Fails the step (its
    message is safe to show to the run's owner), never an RPC."""

    reason = INPUT_MAPPING_FAILED

    def __init__(self, step_id: str, path: str, *, field: str = "") -> None:
        self.step_id = step_id  # the step whose output was referenced
        self.path = path  # dotted path into that output; "" for the whole output
        self.field = field  # where in the input the reference was
        at = f"at {path!r}" if path else "at all"
        wanted = f" (wanted by {field})" if field else ""
        super().__init__(f"the output of step {step_id!r} has no value {at}{wanted}")
        self.message = str(self)


def _lookup(output: Any, step_id: str, path: tuple[str, ...], field: str) -> Any:
    current = output
    for depth, segment in enumerate(path):
        if isinstance(current, Mapping) and segment in current:
            current = current[segment]
        elif isinstance(current, list | tuple) and segment.isdecimal() and int(segment) < len(current):
            current = current[int(segment)]
        else:
            raise InputMappingError(step_id, ".".join(path[: depth + 1]), field=field)
    return current


def _substitute(value: Any, outputs: Mapping[str, Mapping[str, Any]], field: str) -> Any:
    if isinstance(value, str):
        parsed = _parse_reference(value)
        if parsed is None:
            return value
        step_id, path = parsed
        if step_id not in outputs:
            raise InputMappingError(step_id, ".".join(path), field=field)
        return thaw_json(_lookup(outputs[step_id], step_id, path, field))
    if isinstance(value, Mapping):
        return {key: _substitute(item, outputs, f"{field}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_substitute(item, outputs, f"{field}[{index}]") for index, item in enumerate(value)]
    return value


def resolve_step_input(
    run_input: Mapping[str, Any],
    step_input: Mapping[str, Any],
    outputs: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The input a step runs with: its own input merged over the run's, with
    references to dependency outputs replaced (see the module docstring).
    Returns a fresh structure that shares nothing with the arguments."""
    merged = thaw_json(run_input)
    for key, value in step_input.items():
        merged[key] = _substitute(value, outputs, f"input.{key}")
    return merged
