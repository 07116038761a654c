"""`run start` and `runs list | get | cancel | wait`."""

from __future__ import annotations

import argparse
import time

from switchboard.executor.v1 import executor_service_pb2, run_pb2

from switchboard_client.cli.context import Context, json_message, json_object, key_values, seconds_argument
from switchboard_client.cli.errors import ExitCode, UsageError
from switchboard_client.cli.events import RunFollower, print_event
from switchboard_client.cli.output import (
    RUN_HEADERS,
    Progress,
    compact_json,
    message_dict,
    print_run,
    run_duration,
    run_row,
    state_name,
    status_text,
    struct_value,
)

OUTCOMES = {
    run_pb2.RUN_STATE_SUCCEEDED: ExitCode.OK,
    run_pb2.RUN_STATE_FAILED: ExitCode.RUN_FAILED,
    run_pb2.RUN_STATE_CANCELLED: ExitCode.RUN_CANCELLED,
    run_pb2.RUN_STATE_TIMED_OUT: ExitCode.RUN_TIMED_OUT,
}
STATES = {
    run_pb2.RunState.Name(value).removeprefix("RUN_STATE_").lower(): value
    for value in run_pb2.RunState.values()
    if value != run_pb2.RUN_STATE_UNSPECIFIED
}
# One WaitRun long-poll lasts at most this long; a longer wait makes several.
WAIT_POLL_SECONDS = 30


def outcome(run: run_pb2.Run) -> ExitCode:
    return OUTCOMES.get(run.state, ExitCode.STILL_RUNNING)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    run = commands.add_parser("run", help="start a run")
    run_actions = run.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = run_actions.add_parser(
        "start",
        parents=[common],
        help="start a run of an agent (or a workflow), optionally following its events",
        description=(
            "Starts a run and prints it. With --follow, prints the run's events as they arrive "
            "(acknowledging them), then the outcome, and exits with it: 0 SUCCEEDED, 3 FAILED, "
            "4 CANCELLED, 5 TIMED_OUT. With --json and --follow: one JSON document a line, "
            '{"run": ...} first and last, {"event": ...} in between.'
        ),
    )
    start.add_argument("agent", nargs="?", metavar="AGENT")
    start.add_argument(
        "--input", default="{}", metavar="JSON", help="the input object: inline JSON, @file or - (stdin)"
    )
    start.add_argument(
        "--workflow", metavar="FILE", help='a Workflow as JSON ({"steps": [...]}) instead of AGENT'
    )
    start.add_argument("--thread", default="", help="thread (conversation) id")
    start.add_argument("--request-id", default="", help="idempotency key: a repeat returns the same run")
    start.add_argument(
        "--timeout", type=seconds_argument, dest="run_timeout", metavar="SECONDS", help="the run's deadline"
    )
    start.add_argument("--label", action="append", metavar="KEY=VALUE", help="repeatable")
    start.add_argument("-f", "--follow", action="store_true", help="print its events until it ends")
    start.set_defaults(handler=start_run)

    runs = commands.add_parser("runs", help="list, show, cancel and wait for your runs")
    actions = runs.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="your runs, newest first")
    listing.add_argument("--state", choices=sorted(STATES))
    listing.add_argument("--agent", default="")
    listing.add_argument("--thread", default="")
    listing.add_argument("--page-size", type=int, default=0, help="at most this many (server default 50)")
    listing.add_argument("--page-token", default="", help="continue a listing (printed after a full page)")
    listing.add_argument("--all", action="store_true", help="every page")
    listing.set_defaults(handler=list_runs)

    get = actions.add_parser("get", parents=[common], help="one run in full")
    get.add_argument("run_id", metavar="RUN")
    get.set_defaults(handler=get_run)

    cancel = actions.add_parser("cancel", parents=[common], help="cancel a run")
    cancel.add_argument("run_id", metavar="RUN")
    cancel.add_argument("--reason", default="", help="kept with the run")
    cancel.set_defaults(handler=cancel_run)

    wait = actions.add_parser(
        "wait",
        parents=[common],
        help="wait until a run ends; exit with its outcome",
        description=(
            "Waits until the run ends (a spinner on stderr when it is a terminal), prints it and exits "
            "with its outcome: 0 SUCCEEDED, 3 FAILED, 4 CANCELLED, 5 TIMED_OUT, 6 still going when "
            "--timeout passed."
        ),
    )
    wait.add_argument("run_id", metavar="RUN")
    wait.add_argument(
        "--timeout", type=float, dest="wait_timeout", metavar="SECONDS", help="give up after this long"
    )
    wait.set_defaults(handler=wait_run)


def start_request(args: argparse.Namespace) -> executor_service_pb2.StartRunRequest:
    if bool(args.agent) == bool(args.workflow):
        raise UsageError("run start needs an AGENT or --workflow FILE (not both)")
    request = executor_service_pb2.StartRunRequest(
        input=json_object(args.input, "--input"), thread_id=args.thread, request_id=args.request_id
    )
    if args.agent:
        request.agent = args.agent
    else:
        source = "-" if args.workflow == "-" else f"@{args.workflow}"
        json_message(source, "--workflow", request.workflow)
    if args.run_timeout is not None:
        request.timeout.FromMilliseconds(round(args.run_timeout * 1000))
    request.labels.update(key_values(args.label, "--label"))
    return request


async def start_run(ctx: Context) -> int:
    response = await ctx.call("executor", "StartRun", start_request(ctx.args))
    run = response.run
    if not ctx.args.follow:
        if ctx.out.json_mode:
            ctx.out.message(response)
        else:
            ctx.out.line(f"started run {run.run_id} ({state_name(run)})")
        return 0
    ctx.interrupt_note = f"run {run.run_id} goes on: cancel it with `switchboard runs cancel {run.run_id}`"
    if ctx.out.json_mode:
        ctx.out.json({"run": message_dict(run)}, compact=True)
    else:
        ctx.out.line(f"run {run.run_id} started: {run.agent or 'workflow'}")
    await RunFollower(
        ctx, run.run_id, lambda event: print_event(ctx, event, wrapped=True), run_exists=True
    ).follow()
    # The run's last event was delivered: its state is final.
    final = (await ctx.call("executor", "GetRun", executor_service_pb2.GetRunRequest(run_id=run.run_id))).run
    ctx.interrupt_note = ""
    if ctx.out.json_mode:
        ctx.out.json({"run": message_dict(final)}, compact=True)
    else:
        print_outcome(ctx, final)
    return outcome(final)


def print_outcome(ctx: Context, run: run_pb2.Run) -> None:
    ctx.out.line(f"run {run.run_id} {state_name(run)} in {run_duration(run)}")
    if run.HasField("error") and (run.error.code or run.error.message):
        ctx.out.line(f"error: {status_text(run.error)}")
    if run.HasField("output"):
        ctx.out.line(f"output: {compact_json(struct_value(run.output))}")


async def list_runs(ctx: Context) -> int:
    args = ctx.args
    request = executor_service_pb2.ListRunsRequest(
        page_size=args.page_size,
        page_token=args.page_token,
        state=STATES[args.state] if args.state else run_pb2.RUN_STATE_UNSPECIFIED,
        agent=args.agent,
        thread_id=args.thread,
    )
    return await ctx.show_list("executor", "ListRuns", request, "runs", RUN_HEADERS, run_row)


async def get_run(ctx: Context) -> int:
    response = await ctx.call(
        "executor", "GetRun", executor_service_pb2.GetRunRequest(run_id=ctx.args.run_id)
    )
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        print_run(ctx.out, response.run)
    return 0


async def cancel_run(ctx: Context) -> int:
    response = await ctx.call(
        "executor",
        "CancelRun",
        executor_service_pb2.CancelRunRequest(run_id=ctx.args.run_id, reason=ctx.args.reason),
    )
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        ctx.out.line(f"run {response.run.run_id}: {state_name(response.run)}")
    return 0


async def wait_run(ctx: Context) -> int:
    run_id = ctx.args.run_id
    limit: float | None = ctx.args.wait_timeout
    if limit is not None and limit < 0:
        raise UsageError("--timeout must not be negative")
    deadline = None if limit is None else time.monotonic() + limit
    run = (await ctx.call("executor", "GetRun", executor_service_pb2.GetRunRequest(run_id=run_id))).run
    response = executor_service_pb2.WaitRunResponse(run=run, done=run.state in OUTCOMES)
    async with Progress(ctx.out.stderr, f"waiting for run {run_id} ({state_name(run)})") as progress:
        while not response.done:
            remaining = WAIT_POLL_SECONDS if deadline is None else deadline - time.monotonic()
            poll = max(1, min(WAIT_POLL_SECONDS, int(remaining)))
            request = executor_service_pb2.WaitRunRequest(run_id=run_id)
            request.timeout.seconds = poll
            # The call's own deadline leaves the server time to answer at the end of the poll.
            response = await ctx.call("executor", "WaitRun", request, timeout=poll + ctx.timeout)
            progress.text = f"waiting for run {run_id} ({state_name(response.run)})"
            if deadline is not None and time.monotonic() >= deadline:
                break
    if ctx.out.json_mode:
        ctx.out.message(response)
    else:
        print_run(ctx.out, response.run)
        if not response.done:
            ctx.out.note(f"run {run_id} has not ended yet ({state_name(response.run)})")
    return outcome(response.run) if response.done else ExitCode.STILL_RUNNING
