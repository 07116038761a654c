"""`agents list | get | register | update | delete`."""

from __future__ import annotations

import argparse

from switchboard.registry.v1 import agent_pb2, registry_service_pb2

from switchboard_client.cli.context import (
    Context,
    finite_float,
    json_message,
    json_object,
    key_values,
    seconds_argument,
)
from switchboard_client.cli.errors import UsageError
from switchboard_client.cli.output import AGENT_HEADERS, agent_row, print_agent


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    group = commands.add_parser("agents", help="list, show, register, update and delete agents")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=[common], help="agents in name order")
    listing.add_argument("--page-size", type=int, default=0, help="at most this many (server default 100)")
    listing.add_argument("--page-token", default="", help="continue a listing (printed after a full page)")
    listing.add_argument("--all", action="store_true", help="every page")
    listing.set_defaults(handler=list_agents)

    get = actions.add_parser("get", parents=[common], help="one agent in full")
    get.add_argument("name")
    get.set_defaults(handler=get_agent)

    create = actions.add_parser(
        "register",
        parents=[common],
        help="register an agent (admin)",
        description=(
            "Registers an agent from flags, or from a JSON file of the Agent message (--from-file; "
            "flags given as well override its fields). Idempotent with --request-id."
        ),
    )
    create.add_argument("name", nargs="?", help="^[a-z][a-z0-9-]{1,62}$")
    create.add_argument("--from-file", metavar="FILE", help="the Agent as JSON (`-` for stdin)")
    add_definition_flags(create, update=False)
    create.set_defaults(handler=register_agent)

    update = actions.add_parser(
        "update",
        parents=[common],
        help="change some of an agent's fields, e.g. its limits (admin)",
        description=(
            "Changes exactly the fields given as flags (UpdateAgent with a field mask of those "
            "fields); the others stay as they are. The executor applies new limits, timeouts and "
            "retry settings within seconds. A value of 0 restores the field's default. --tool, "
            "--non-retryable and --label replace the whole list or map with the values given. "
            "Prints the agent as it is now. Idempotent with --request-id."
        ),
    )
    update.add_argument("name", help="the agent to change (its name cannot change)")
    add_definition_flags(update, update=True)
    update.set_defaults(handler=update_agent)

    delete = actions.add_parser(
        "delete",
        parents=[common],
        help="delete an agent (admin)",
        description=(
            "Deletes the agent: a run or workflow step that gets to it afterwards fails with "
            "AGENT_NOT_FOUND (the executor caches definitions for a few seconds). Idempotent with "
            "--request-id."
        ),
    )
    delete.add_argument("name")
    delete.add_argument("--request-id", default="", help="idempotency key")
    delete.set_defaults(handler=delete_agent)


def add_definition_flags(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The flags for an agent's mutable fields, shared by `register` and `update`;
    `update` adds the flags that empty a list or map."""

    def replaceable(flag: str, dest: str, metavar: str, what: str, clear: str) -> None:
        choice = parser.add_mutually_exclusive_group() if update else parser
        choice.add_argument(
            flag,
            action="append",
            dest=dest,
            metavar=metavar,
            help=f"{what}; repeatable" + ("; replaces them all" if update else ""),
        )
        if update:
            choice.add_argument(f"--clear-{clear}", action="store_true", help=f"remove every {what}")

    parser.add_argument("--endpoint", metavar="HOST:PORT", help="where its AgentWorker listens")
    parser.add_argument("--description")
    replaceable("--tool", "tools", "NAME", "tool it may call", "tools")
    parser.add_argument(
        "--input-schema",
        metavar="JSON",
        help="JSON Schema of the input (inline, @file or -)" + ("; {} for any object" if update else ""),
    )
    parser.add_argument(
        "--max-concurrency", type=int, metavar="N", help="attempts at once, across all users (0: 10)"
    )
    parser.add_argument(
        "--timeout-seconds",
        type=seconds_argument,
        dest="agent_timeout",
        metavar="SECONDS",
        help="deadline of one attempt (0: 60)",
    )
    parser.add_argument(
        "--heartbeat-timeout-seconds",
        type=seconds_argument,
        dest="heartbeat_timeout",
        metavar="SECONDS",
        help="a worker silent this long is dead (0: 10)",
    )
    parser.add_argument("--max-attempts", type=int, metavar="N", help="attempts in all, 1-20 (0: 3)")
    parser.add_argument(
        "--initial-backoff-seconds",
        type=seconds_argument,
        dest="initial_backoff",
        metavar="SECONDS",
        help="delay before the first retry (0: 1)",
    )
    parser.add_argument(
        "--max-backoff-seconds",
        type=seconds_argument,
        dest="max_backoff",
        metavar="SECONDS",
        help="longest delay between retries (0: 60)",
    )
    parser.add_argument(
        "--backoff-multiplier",
        type=finite_float,
        metavar="X",
        help="growth of the delay per retry, at least 1 (0: 2)",
    )
    replaceable(
        "--non-retryable", "non_retryable", "REASON", "error reason that is never retried", "non-retryable"
    )
    replaceable("--label", "label", "KEY=VALUE", "label", "labels")
    parser.add_argument("--request-id", default="", help="idempotency key")


def apply_definition_flags(args: argparse.Namespace, agent: agent_pb2.Agent) -> list[str]:
    """Sets on `agent` the fields given as flags; returns their field mask paths."""
    paths: list[str] = []
    if args.endpoint is not None:
        agent.endpoint = args.endpoint
        paths.append("endpoint")
    if args.description is not None:
        agent.description = args.description
        paths.append("description")
    if args.tools is not None or getattr(args, "clear_tools", False):
        agent.ClearField("tools")
        agent.tools.extend(args.tools or [])
        paths.append("tools")
    if args.input_schema is not None:
        agent.input_schema.CopyFrom(json_object(args.input_schema, "--input-schema"))
        paths.append("input_schema")
    if args.max_concurrency is not None:
        agent.max_concurrency = args.max_concurrency
        paths.append("max_concurrency")
    if args.agent_timeout is not None:
        agent.timeout.FromMilliseconds(round(args.agent_timeout * 1000))
        paths.append("timeout")
    if args.heartbeat_timeout is not None:
        agent.heartbeat_timeout.FromMilliseconds(round(args.heartbeat_timeout * 1000))
        paths.append("heartbeat_timeout")
    policy = agent.retry_policy
    if args.max_attempts is not None:
        policy.max_attempts = args.max_attempts
        paths.append("retry_policy.max_attempts")
    if args.initial_backoff is not None:
        policy.initial_backoff.FromMilliseconds(round(args.initial_backoff * 1000))
        paths.append("retry_policy.initial_backoff")
    if args.max_backoff is not None:
        policy.max_backoff.FromMilliseconds(round(args.max_backoff * 1000))
        paths.append("retry_policy.max_backoff")
    if args.backoff_multiplier is not None:
        policy.backoff_multiplier = args.backoff_multiplier
        paths.append("retry_policy.backoff_multiplier")
    if args.non_retryable is not None or getattr(args, "clear_non_retryable", False):
        policy.ClearField("non_retryable_reasons")
        policy.non_retryable_reasons.extend(args.non_retryable or [])
        paths.append("retry_policy.non_retryable_reasons")
    if args.label is not None or getattr(args, "clear_labels", False):
        agent.ClearField("labels")
        agent.labels.update(key_values(args.label, "--label"))
        paths.append("labels")
    return paths


async def list_agents(ctx: Context) -> int:
    args = ctx.args
    request = registry_service_pb2.ListAgentsRequest(page_size=args.page_size, page_token=args.page_token)
    return await ctx.show_list("registry", "ListAgents", request, "agents", AGENT_HEADERS, agent_row)


async def get_agent(ctx: Context) -> int:
    response = await ctx.call(
        "registry", "GetAgent", registry_service_pb2.GetAgentRequest(name=ctx.args.name)
    )
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        print_agent(ctx.out, response.agent)
    return 0


def agent_from_arguments(args: argparse.Namespace) -> agent_pb2.Agent:
    agent = agent_pb2.Agent()
    if args.from_file:
        source = "-" if args.from_file == "-" else f"@{args.from_file}"
        json_message(source, "--from-file", agent)
    if args.name:
        agent.name = args.name
    apply_definition_flags(args, agent)
    if not agent.name:
        raise UsageError("agents register needs a NAME (or a `name` in --from-file)")
    return agent


async def register_agent(ctx: Context) -> int:
    request = registry_service_pb2.RegisterAgentRequest(
        agent=agent_from_arguments(ctx.args), request_id=ctx.args.request_id
    )
    response = await ctx.call("registry", "RegisterAgent", request)
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        ctx.out.line(f"registered {response.agent.name} at {response.agent.endpoint}")
    return 0


def update_request(args: argparse.Namespace) -> registry_service_pb2.UpdateAgentRequest:
    request = registry_service_pb2.UpdateAgentRequest(request_id=args.request_id)
    request.agent.name = args.name
    paths = apply_definition_flags(args, request.agent)
    # An empty mask would replace every field: never send one.
    if not paths:
        raise UsageError("agents update needs at least one field to change (see `agents update --help`)")
    request.update_mask.paths.extend(paths)
    return request


async def update_agent(ctx: Context) -> int:
    request = update_request(ctx.args)
    response = await ctx.call("registry", "UpdateAgent", request)
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        ctx.out.line(f"updated {response.agent.name}: {', '.join(request.update_mask.paths)}")
        print_agent(ctx.out, response.agent)
    return 0


async def delete_agent(ctx: Context) -> int:
    request = registry_service_pb2.DeleteAgentRequest(name=ctx.args.name, request_id=ctx.args.request_id)
    response = await ctx.call("registry", "DeleteAgent", request)
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        ctx.out.line(f"deleted {ctx.args.name}")
    return 0
