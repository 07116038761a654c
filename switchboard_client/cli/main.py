"""The `switchboard` command: argument parsing, dispatch, errors and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import Sequence

from switchboard_client.cli import agents, events, login, runs, trace
from switchboard_client.cli.context import Context
from switchboard_client.cli.credentials import CredentialStore
from switchboard_client.cli.errors import CliError, ExitCode
from switchboard_client.cli.settings import (
    DEFAULT_ADDRESSES,
    JAEGER_VARIABLE,
    SERVICES,
    TRACE_FILE_VARIABLE,
    Endpoints,
    address_variable,
    config_dir,
)

DEFAULT_CALL_TIMEOUT = 30.0

EPILOG = f"""\
addresses (flag, else environment variable, else default):
{chr(10).join(f"  --{s:<9} {address_variable(s):<31} {DEFAULT_ADDRESSES[s]}" for s in SERVICES)}

files:
  tokens       $XDG_CONFIG_HOME/switchboard/credentials.json (default ~/.config/switchboard/), mode 0600
  trace file   {TRACE_FILE_VARIABLE} or --trace-file (default .switchboard/traces.jsonl);
               Jaeger instead with {JAEGER_VARIABLE} or --jaeger URL

output:
  people: tables and one line per event; --json (before or after the command): protobuf's JSON
  mapping of the response (lowerCamelCase); streams print one JSON document per line

exit codes:
  0    success (and, for run start --follow and runs wait, the run SUCCEEDED)
  1    error: an RPC failed (its code, message and details are printed on stderr), the server is
       unreachable, not logged in, a file cannot be read
  2    usage: bad arguments or a bad JSON argument
  3    the run FAILED          4  the run was CANCELLED     5  the run TIMED_OUT
  6    runs wait --timeout passed before the run ended
  130  interrupted (Ctrl-C)

examples:
  switchboard login -u admin
  switchboard agents list
  switchboard agents update chaos --max-concurrency 20 --heartbeat-timeout-seconds 5
  switchboard run start text-stats --input '{{"text": "Hello there. Bye."}}' --follow
  switchboard runs list --state failed
  switchboard runs wait RUN
  switchboard events tail RUN --json
  switchboard trace show RUN
"""


def common_options(*, top_level: bool) -> argparse.ArgumentParser:
    """Options accepted before the command and after it (where they win)."""
    parser = argparse.ArgumentParser(add_help=False)
    # Below the command, an option left out must not hide the value given above it.
    default = {} if top_level else {"default": argparse.SUPPRESS}
    for service in SERVICES:
        parser.add_argument(
            f"--{service}",
            metavar="HOST:PORT",
            help=f"{service} service address" if top_level else argparse.SUPPRESS,
            **default,  # type: ignore[arg-type]
        )
    parser.add_argument(
        "--json",
        action="store_true",
        help="machine-readable JSON on stdout",
        **default,  # type: ignore[arg-type]
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        dest="timeout",
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_CALL_TIMEOUT:g})" if top_level else argparse.SUPPRESS,
        **({"default": DEFAULT_CALL_TIMEOUT} if top_level else default),  # type: ignore[arg-type]
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Switchboard from the command line: log in, register, list and update agents, start runs "
        "and follow their events, list, wait for and cancel runs, show a run's trace.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options(top_level=True)],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options(top_level=False)
    for group in (login, agents, runs, events, trace):
        group.register(commands, common)
    return parser


async def _run(ctx: Context) -> int:
    try:
        return int(await ctx.args.handler(ctx))
    finally:
        await ctx.close()


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # A payload in a script the terminal cannot show is escaped, not a crash.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--call-timeout must be positive")
    flags = {service: getattr(args, service) for service in SERVICES}
    ctx = Context(args, Endpoints.resolve(flags, os.environ), CredentialStore(config_dir()))
    try:
        return asyncio.run(_run(ctx))
    except CliError as error:
        if args.json:
            print(json.dumps(error.document()), file=sys.stderr)
        else:
            print(f"{parser.prog}: error: {error.message}", file=sys.stderr)
            for line in error.details:
                print(f"  {line}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        if ctx.interrupt_note:
            print(f"  {ctx.interrupt_note}", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours. Quiet the final flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return int(ExitCode.ERROR)
