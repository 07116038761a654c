"""`agents list | get | register`."""

from __future__ import annotations

import argparse

from switchboard.registry.v1 import agent_pb2, registry_service_pb2

from switchboard_client.cli.context import Context, json_message, json_object, key_values
from switchboard_client.cli.errors import UsageError
from switchboard_client.cli.output import AGENT_HEADERS, agent_row, print_agent


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    group = commands.add_parser("agents", help="list, show and register agents")
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
    create.add_argument("--endpoint", help="host:port of its AgentWorker")
    create.add_argument("--description")
    create.add_argument("--tool", action="append", dest="tools", metavar="NAME", help="repeatable")
    create.add_argument(
        "--input-schema", metavar="JSON", help="JSON Schema of the input (inline, @file or -)"
    )
    create.add_argument("--max-concurrency", type=int)
    create.add_argument("--timeout-seconds", type=float, dest="agent_timeout", metavar="SECONDS")
    create.add_argument(
        "--heartbeat-timeout-seconds", type=float, dest="heartbeat_timeout", metavar="SECONDS"
    )
    create.add_argument("--max-attempts", type=int)
    create.add_argument("--non-retryable", action="append", metavar="REASON", help="repeatable")
    create.add_argument("--label", action="append", metavar="KEY=VALUE", help="repeatable")
    create.add_argument("--request-id", default="", help="idempotency key")
    create.set_defaults(handler=register_agent)


async def list_agents(ctx: Context) -> int:
    args = ctx.args
    request = registry_service_pb2.ListAgentsRequest(page_size=args.page_size, page_token=args.page_token)
    response = await ctx.call("registry", "ListAgents", request)
    agents = list(response.agents)
    while args.all and response.next_page_token:
        request.page_token = response.next_page_token
        response = await ctx.call("registry", "ListAgents", request)
        agents.extend(response.agents)
    if ctx.out.json_mode:
        ctx.out.message(
            registry_service_pb2.ListAgentsResponse(agents=agents, next_page_token=response.next_page_token)
        )
        return 0
    ctx.out.table(AGENT_HEADERS, [agent_row(agent) for agent in agents])
    if response.next_page_token:
        ctx.out.note(f"more: --page-token {response.next_page_token} (or --all)")
    return 0


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
    if args.endpoint:
        agent.endpoint = args.endpoint
    if args.description is not None:
        agent.description = args.description
    if args.tools:
        agent.ClearField("tools")
        agent.tools.extend(args.tools)
    if args.input_schema:
        agent.input_schema.CopyFrom(json_object(args.input_schema, "--input-schema"))
    if args.max_concurrency is not None:
        agent.max_concurrency = args.max_concurrency
    if args.agent_timeout is not None:
        agent.timeout.FromMilliseconds(round(args.agent_timeout * 1000))
    if args.heartbeat_timeout is not None:
        agent.heartbeat_timeout.FromMilliseconds(round(args.heartbeat_timeout * 1000))
    if args.max_attempts is not None:
        agent.retry_policy.max_attempts = args.max_attempts
    if args.non_retryable:
        agent.retry_policy.ClearField("non_retryable_reasons")
        agent.retry_policy.non_retryable_reasons.extend(args.non_retryable)
    agent.labels.update(key_values(args.label, "--label"))
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
