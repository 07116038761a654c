"""`trace show RUN`: the run's trace as a waterfall."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
from pathlib import Path

from switchboard.executor.v1 import executor_service_pb2

from switchboard_client.cli import waterfall
from switchboard_client.cli.context import Context
from switchboard_client.cli.errors import CliError
from switchboard_client.cli.output import can_encode
from switchboard_client.cli.settings import JAEGER_VARIABLE, TRACE_FILE_VARIABLE, default_trace_file
from switchboard_client.cli.spans import fetch_jaeger, read_trace_file


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    group = commands.add_parser("trace", help="a run's trace")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        parents=[common],
        help="the run's trace as a waterfall",
        description=(
            "Shows the run's trace (its trace id comes from GetRun) as a waterfall: a line per span, "
            "indented under its parent, with service, start offset, duration and a bar on the "
            "trace's timeline; failed spans are marked. Spans come from Jaeger's query API when "
            f"--jaeger or {JAEGER_VARIABLE} is set, otherwise from the services' local trace file "
            f"(--trace-file, {TRACE_FILE_VARIABLE}, default .switchboard/traces.jsonl). Spans reach "
            "either a few seconds after they end. With --json: the spans in waterfall order."
        ),
    )
    show.add_argument("run_id", metavar="RUN")
    show.add_argument("--trace-file", type=Path, metavar="PATH")
    show.add_argument("--jaeger", metavar="URL", help="Jaeger query base URL, e.g. http://127.0.0.1:16686")
    show.add_argument("--width", type=int, help="columns (default: the terminal's, else 100)")
    show.set_defaults(handler=show_trace)


async def show_trace(ctx: Context) -> int:
    args = ctx.args
    run = (await ctx.call("executor", "GetRun", executor_service_pb2.GetRunRequest(run_id=args.run_id))).run
    if not run.trace_id:
        raise CliError(f"run {run.run_id} has no trace id")
    jaeger = args.jaeger or os.environ.get(JAEGER_VARIABLE, "")
    if jaeger:
        spans = await asyncio.to_thread(fetch_jaeger, jaeger, run.trace_id)
        source = f"Jaeger at {jaeger}"
    else:
        path = args.trace_file or default_trace_file()
        spans = await asyncio.to_thread(read_trace_file, path, run.trace_id)
        source = str(path)
    if not spans:
        raise CliError(
            f"no spans of trace {run.trace_id} (run {run.run_id}) in {source}",
            details=["spans arrive a few seconds after they end: try again shortly"],
        )
    if ctx.out.json_mode:
        ctx.out.json({"runId": run.run_id, "traceId": run.trace_id, "spans": waterfall.to_json(spans)})
        return 0
    width = args.width or shutil.get_terminal_size(fallback=(100, 24)).columns
    glyphs = waterfall.UNICODE if can_encode(ctx.out.stdout, "█✗…µ") else waterfall.ASCII
    for line in waterfall.render(spans, width=width, glyphs=glyphs):
        ctx.out.line(line)
    return 0
