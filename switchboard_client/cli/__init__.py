"""The `switchboard` command-line client (console script `switchboard`, or
`python -m switchboard_client.cli`): log in, manage agents, start and follow
runs, tail events, show a run's trace. `switchboard --help` documents the
addresses, files, output formats and exit codes."""

from switchboard_client.cli.main import main

__all__ = ["main"]
