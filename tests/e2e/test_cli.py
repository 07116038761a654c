"""The `switchboard` CLI as a user runs it: a real subprocess against the running
suite, with its own HOME and XDG_CONFIG_HOME, every subcommand once, people's
output and --json output, exit codes, and errors without a traceback."""

from __future__ import annotations

import asyncio
import copy
import http.server
import json
import os
import pty
import stat
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from switchboard.auth.v1 import auth_service_pb2

from tests.harness.suite import TEST_PASSWORD, Suite, free_port, start_suite

CLIENT_SERVICES = ("auth", "registry", "executor", "events")
# Generous: CLI start-up plus a run with retries, on a loaded 2-core machine.
PATIENCE_SECONDS = 120.0
T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


class Cli:
    """`python -m switchboard_client.cli` with a private HOME, pointed at the suite."""

    def __init__(self, suite: Suite, home: Path, **env: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SWITCHBOARD_", "XDG_", "OTEL_")) and key != "COLUMNS"
        }
        self.env = {
            **inherited,
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "PYTHONIOENCODING": "utf-8",
            "SWITCHBOARD_TRACE_FILE": str(suite.layout.data_dir / "traces.jsonl"),
            **{f"SWITCHBOARD_{s.upper()}_ADDRESS": suite.address[s] for s in CLIENT_SERVICES},
            **env,
        }

    def with_env(self, **env: str) -> Cli:
        """The same user and HOME, with more environment."""
        other = copy.copy(self)
        other.env = {**self.env, **env}
        return other

    @property
    def credentials_file(self) -> Path:
        return self.home / "config" / "switchboard" / "credentials.json"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "switchboard_client.cli"]

    async def spawn(self, *args: str, stdin: bool = False, stderr: int = asyncio.subprocess.PIPE) -> Any:
        return await asyncio.create_subprocess_exec(
            *self.command(),
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=self.env,
            cwd=self.home,
        )

    async def __call__(self, *args: str, stdin: str | None = None) -> Result:
        process = await self.spawn(*args, stdin=stdin is not None)
        return await self.finish(process, stdin)

    async def finish(self, process: Any, stdin: str | None = None) -> Result:
        try:
            out, err = await asyncio.wait_for(
                process.communicate(stdin.encode() if stdin is not None else None), PATIENCE_SECONDS
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        result = Result(process.returncode, out.decode(), (err or b"").decode())
        # Whatever happens, a user never sees a stack trace.
        assert "Traceback" not in result.err + result.out, result
        return result


@dataclass(frozen=True)
class Account:
    cli: Cli
    username: str
    user_id: str


async def logged_in(suite: Suite, home: Path, role: str = "user") -> Account:
    username = f"cli-{uuid.uuid4().hex[:10]}"
    user_id, _ = await suite.create_user(username, role)
    cli = Cli(suite, home)
    result = await cli("login", "--username", username, "--password-stdin", stdin=TEST_PASSWORD + "\n")
    assert result.code == 0, result
    return Account(cli, username, user_id)


@pytest.fixture
async def account(suite: Suite, tmp_path: Path) -> Account:
    return await logged_in(suite, tmp_path / "user")


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """`probe()` until it returns something, or fail after PATIENCE_SECONDS."""
    async with asyncio.timeout(PATIENCE_SECONDS):
        while True:
            value = await probe()
            if value is not None:
                return value
            await asyncio.sleep(0.5)
    raise AssertionError(what)  # unreachable: the timeout raises


def stored(cli: Cli) -> dict[str, str]:
    data: dict[str, str] = json.loads(cli.credentials_file.read_text())
    return data


async def start(cli: Cli, agent: str, input: dict[str, Any]) -> str:
    result = await cli("run", "start", agent, "--input", json.dumps(input), "--json")
    assert result.code == 0, result
    run_id: str = result.json()["run"]["runId"]
    return run_id


# -- login


async def test_login_keeps_the_tokens_private_and_never_prints_them(suite: Suite, tmp_path: Path) -> None:
    account = await logged_in(suite, tmp_path)
    cli = account.cli
    path = cli.credentials_file

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Written atomically: no temporary file is left beside it.
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    tokens = stored(cli)
    assert tokens["username"] == account.username and tokens["access_token"] and tokens["refresh_token"]

    whoami = await cli("whoami", "--json")
    assert whoami.code == 0, whoami
    assert whoami.json()["user"]["userId"] == account.user_id
    people = await cli("whoami")
    assert account.username in people.out
    for result in (whoami, people):
        for secret in (tokens["access_token"], tokens["refresh_token"]):
            assert secret not in result.out + result.err

    wrong = await Cli(suite, tmp_path / "other")(
        "login", "-u", account.username, "--password-stdin", stdin="not the password\n"
    )
    assert wrong.code == 1
    assert "UNAUTHENTICATED" in wrong.err and "INVALID_CREDENTIALS" in wrong.err
    assert not (tmp_path / "other" / "config" / "switchboard" / "credentials.json").exists()

    no_terminal = await Cli(suite, tmp_path / "other")("login", "-u", account.username)
    assert no_terminal.code == 2 and "--password-stdin" in no_terminal.err


async def test_login_with_an_api_key(suite: Suite, account: Account, tmp_path: Path) -> None:
    created = await suite.auth_stub().CreateApiKey(
        auth_service_pb2.CreateApiKeyRequest(display_name="cli test"),
        metadata=suite.metadata(await suite.login(account.username, TEST_PASSWORD)),
        timeout=10,
    )
    cli = Cli(suite, tmp_path / "keyed")

    result = await cli("login", "--api-key", "--password-stdin", "--json", stdin=created.secret + "\n")

    assert result.code == 0, result
    assert result.json()["user"]["username"] == account.username
    assert created.secret not in result.out + result.err
    assert stat.S_IMODE(cli.credentials_file.stat().st_mode) == 0o600
    assert (await cli("whoami", "--json")).json()["user"]["userId"] == account.user_id


async def test_an_expired_access_token_is_refreshed_with_the_refresh_token(account: Account) -> None:
    cli = account.cli
    before = stored(cli)
    expired = {**before, "access_token_expire_time": "2001-01-01T00:00:00Z"}
    cli.credentials_file.write_text(json.dumps(expired))

    result = await cli("runs", "list", "--json")

    assert result.code == 0, result
    after = stored(cli)
    # Refresh tokens rotate: the spent one is replaced, and so is the access token.
    assert after["refresh_token"] != before["refresh_token"]
    assert after["access_token"] != before["access_token"]
    assert after["access_token_expire_time"] > "2001"
    assert stat.S_IMODE(cli.credentials_file.stat().st_mode) == 0o600
    # Several commands at once all find a valid token (one of them refreshes, the
    # others reuse it): spending a refresh token twice would end the session.
    cli.credentials_file.write_text(json.dumps({**after, "access_token_expire_time": "2001-01-01T00:00:00Z"}))
    results = await asyncio.gather(*(cli("whoami", "--json") for _ in range(3)))
    assert [r.code for r in results] == [0, 0, 0], results
    assert (await cli("whoami")).code == 0


async def test_logout_revokes_the_session_and_forgets_it(suite: Suite, account: Account) -> None:
    cli = account.cli
    access_token = stored(cli)["access_token"]

    result = await cli("logout")

    assert result.code == 0, result
    assert not cli.credentials_file.exists()
    after = await cli("whoami")
    assert after.code == 1 and "not logged in" in after.err

    async def refused() -> bool | None:
        try:
            await suite.auth_stub().GetCurrentUser(
                auth_service_pb2.GetCurrentUserRequest(), metadata=suite.metadata(access_token), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED or None
        return None

    assert await eventually(refused, "the logged-out access token is still accepted")


# -- agents


async def test_agents_register_get_and_list(suite: Suite, tmp_path: Path) -> None:
    admin = await logged_in(suite, tmp_path / "admin", role="admin")
    name = f"cli-agent-{uuid.uuid4().hex[:8]}"
    schema = {"type": "object", "required": ["text"]}

    registered = await admin.cli(
        "agents",
        "register",
        name,
        "--endpoint",
        suite.address["worker"],
        "--description",
        "registered by the CLI test",
        "--tool",
        "word_count",
        "--input-schema",
        json.dumps(schema),
        "--max-concurrency",
        "3",
        "--timeout-seconds",
        "20",
        "--label",
        "team=cli",
        "--json",
    )
    assert registered.code == 0, registered
    assert registered.json()["agent"]["name"] == name

    got = await admin.cli("agents", "get", name, "--json")
    agent = got.json()["agent"]
    assert agent["endpoint"] == suite.address["worker"]
    assert agent["tools"] == ["word_count"] and agent["maxConcurrency"] == 3
    assert agent["timeout"] == "20s" and agent["labels"] == {"team": "cli"}
    assert agent["inputSchema"] == schema
    people = await admin.cli("agents", "get", name)
    assert "registered by the CLI test" in people.out and "word_count" in people.out

    listed = await admin.cli("agents", "list", "--all", "--json")
    names = [a["name"] for a in listed.json()["agents"]]
    assert name in names and "text-stats" in names and names == sorted(names)
    table = await admin.cli("agents", "list", "--all")
    assert table.out.splitlines()[0].split()[:2] == ["NAME", "ENDPOINT"]
    assert any(line.split()[0] == name for line in table.out.splitlines()[1:])
    # Without --all: one page, and the token of the next one.
    first = await admin.cli("agents", "list", "--page-size", "1", "--json")
    assert [a["name"] for a in first.json()["agents"]] == names[:1]
    token = first.json()["nextPageToken"]
    second = await admin.cli("agents", "list", "--page-size", "1", "--page-token", token)
    assert second.out.splitlines()[1].split()[0] == names[1]
    assert "more: --page-token" in second.err

    again = await admin.cli("agents", "register", name, "--endpoint", suite.address["worker"])
    assert again.code == 1 and "ALREADY_EXISTS" in again.err

    user = await logged_in(suite, tmp_path / "user")
    denied = await user.cli("agents", "register", f"{name}-x", "--endpoint", suite.address["worker"])
    assert denied.code == 1 and "PERMISSION_DENIED" in denied.err


async def registered_agent(suite: Suite, admin: Account) -> str:
    """A new agent of the test's own (the built-in ones are shared by other tests)."""
    name = f"cli-agent-{uuid.uuid4().hex[:8]}"
    result = await admin.cli(
        "agents",
        "register",
        name,
        "--endpoint",
        suite.address["worker"],
        "--tool",
        "word_count",
        "--input-schema",
        '{"type": "object"}',
        "--heartbeat-timeout-seconds",
        "7",
        "--label",
        "team=cli",
    )
    assert result.code == 0, result
    return name


async def test_agents_update_changes_exactly_the_fields_given(suite: Suite, tmp_path: Path) -> None:
    admin = await logged_in(suite, tmp_path / "admin", role="admin")
    name = await registered_agent(suite, admin)
    before = (await admin.cli("agents", "get", name, "--json")).json()["agent"]

    updated = await admin.cli(
        "agents",
        "update",
        name,
        "--max-concurrency",
        "7",
        "--timeout-seconds",
        "12.5",
        "--max-attempts",
        "5",
        "--initial-backoff-seconds",
        "0.5",
        "--non-retryable",
        "BAD_INPUT",
        "--label",
        "tier=gold",
        "--description",
        "changed by the CLI",
        "--json",
    )

    assert updated.code == 0, updated
    agent = updated.json()["agent"]
    assert agent["maxConcurrency"] == 7 and agent["timeout"] == "12.500s"
    assert agent["retryPolicy"]["maxAttempts"] == 5 and agent["retryPolicy"]["initialBackoff"] == "0.500s"
    assert agent["retryPolicy"]["nonRetryableReasons"] == ["BAD_INPUT"]
    assert agent["labels"] == {"tier": "gold"} and agent["description"] == "changed by the CLI"
    # Fields not given are as they were, the rest of the retry policy included.
    for field in ("endpoint", "tools", "inputSchema", "heartbeatTimeout", "createTime"):
        assert agent[field] == before[field], field
    for field in ("maxBackoff", "backoffMultiplier"):
        assert agent["retryPolicy"][field] == before["retryPolicy"][field], field
    assert agent["updateTime"] != before["updateTime"]
    assert (await admin.cli("agents", "get", name, "--json")).json()["agent"] == agent

    # For people: which fields changed, then the agent as it is now. 0 restores a default.
    people = await admin.cli("agents", "update", name, "--max-concurrency", "0", "--clear-labels")
    assert people.code == 0, people
    lines = people.out.splitlines()
    assert lines[0] == f"updated {name}: max_concurrency, labels"
    assert "max concurrency    10" in lines and "max attempts       5" in lines
    assert not any(line.startswith("label ") for line in lines)
    assert (await admin.cli("agents", "get", name, "--json")).json()["agent"]["labels"] == {}

    # Nothing to change is a usage error: an empty mask would replace every field.
    nothing = await admin.cli("agents", "update", name)
    assert nothing.code == 2 and "at least one field" in nothing.err
    missing = await admin.cli("agents", "update", f"{name}-gone", "--max-concurrency", "2")
    assert missing.code == 1 and "NOT_FOUND (registry)" in missing.err


async def test_agents_update_names_a_bad_value(suite: Suite, tmp_path: Path) -> None:
    admin = await logged_in(suite, tmp_path / "admin", role="admin")
    name = await registered_agent(suite, admin)

    too_many = await admin.cli("agents", "update", name, "--max-concurrency", "100000")
    assert too_many.code == 1 and too_many.out == ""
    assert too_many.err.startswith("switchboard: error: INVALID_ARGUMENT (registry):")
    assert "field agent.max_concurrency: must be between 0 (10) and 10000" in too_many.err

    as_json = await admin.cli(
        "agents", "update", name, "--timeout-seconds", "-5", "--max-attempts", "50", "--json"
    )
    assert as_json.code == 1 and as_json.out == ""
    status = json.loads(as_json.err)["error"]["status"]
    assert status["code"] == "INVALID_ARGUMENT"
    violations = next(d for d in status["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert sorted(v["field"] for v in violations["fieldViolations"]) == [
        "agent.retry_policy.max_attempts",
        "agent.timeout",
    ]
    # A value that is not a number never reaches the server.
    not_a_number = await admin.cli("agents", "update", name, "--timeout-seconds", "soon")
    assert not_a_number.code == 2 and "--timeout-seconds" in not_a_number.err
    # Nothing was changed by the refused updates.
    agent = (await admin.cli("agents", "get", name, "--json")).json()["agent"]
    assert agent["maxConcurrency"] == 10 and agent["timeout"] == "60s"


async def test_agents_update_and_delete_are_for_admins(suite: Suite, tmp_path: Path) -> None:
    admin = await logged_in(suite, tmp_path / "admin", role="admin")
    user = await logged_in(suite, tmp_path / "user")
    name = await registered_agent(suite, admin)

    refused_update = await user.cli("agents", "update", name, "--max-concurrency", "1")
    refused_delete = await user.cli("agents", "delete", name)
    for refused in (refused_update, refused_delete):
        assert refused.code == 1 and refused.out == "", refused
        assert refused.err.startswith("switchboard: error: PERMISSION_DENIED (registry):"), refused
    assert (await user.cli("agents", "get", name, "--json")).json()["agent"]["maxConcurrency"] == 10

    deleted = await admin.cli("agents", "delete", name)
    assert deleted.code == 0, deleted
    assert deleted.out == f"deleted {name}\n"
    gone = await admin.cli("agents", "get", name)
    assert gone.code == 1 and "NOT_FOUND (registry)" in gone.err
    again = await admin.cli("agents", "delete", name)
    assert again.code == 1 and "NOT_FOUND (registry)" in again.err and f"agent: {name}" in again.err
    assert name not in [
        a["name"] for a in (await admin.cli("agents", "list", "--all", "--json")).json()["agents"]
    ]

    other = await registered_agent(suite, admin)
    as_json = await admin.cli("agents", "delete", other, "--json")
    assert as_json.code == 0 and as_json.json() == {}


# -- runs and events


async def test_run_start_follow_prints_the_events_live_and_exits_0_on_success(account: Account) -> None:
    result = await account.cli(
        "run", "start", "text-stats", "--input", '{"text": "Follow me. Then stop."}', "--follow"
    )

    assert result.code == 0, result
    lines = result.out.splitlines()
    run_id = lines[0].split()[1]
    events = [line.split() for line in lines[1:] if line[:4].strip().isdigit()]
    # Every event once, in seq order, from run_queued to run_completed. The CLI
    # leaves only when the service says the run's stream is complete, which it
    # says only once every event was acknowledged.
    assert [int(e[0]) for e in events] == list(range(1, len(events) + 1))
    types = [e[2] for e in events]
    assert types[0] == "run_queued" and types[-1] == "run_completed"
    assert {"agent_started", "tool_executing", "tool_completed", "agent_completed"} <= set(types)
    assert f"run {run_id} SUCCEEDED" in result.out
    assert '"words": 4' in result.out

    as_json = await account.cli(
        "run", "start", "text-stats", "--input", '{"text": "Once more."}', "--follow", "--json"
    )
    assert as_json.code == 0, as_json
    documents = as_json.json_lines()
    assert documents[0]["run"]["state"] in ("RUN_STATE_QUEUED", "RUN_STATE_RUNNING")
    followed = [d["event"] for d in documents[1:-1]]
    assert [int(e["seq"]) for e in followed] == list(range(1, len(followed) + 1))
    assert {e["runId"] for e in followed} == {documents[0]["run"]["runId"]}
    assert followed[-1]["type"] == "EVENT_TYPE_RUN_COMPLETED"
    assert documents[-1]["run"]["state"] == "RUN_STATE_SUCCEEDED"
    assert documents[-1]["run"]["output"]["words"] == 2


async def test_run_start_follow_exits_non_zero_when_the_run_fails(account: Account) -> None:
    result = await account.cli(
        "run", "start", "chaos", "--input", '{"action": "fail", "reason": "CLI_BOOM"}', "--follow"
    )

    assert result.code == 3, result
    assert "agent_failed" in result.out
    assert "FAILED" in result.out and "CLI_BOOM: chaos failed as asked" in result.out


async def test_a_workflow_runs_from_a_file(account: Account) -> None:
    workflow = {
        "steps": [
            {"stepId": "count", "agent": "text-stats", "input": {"text": "One fish. Two fish."}},
            {
                "stepId": "pick",
                "agent": "json-transform",
                "input": {"data": "${steps.count.output}", "mapping": {"n": "words"}},
                "dependsOn": ["count"],
            },
        ]
    }
    path = account.cli.home / "workflow.json"
    path.write_text(json.dumps(workflow))

    followed = await account.cli("run", "start", "--workflow", str(path), "--follow", "--json")

    assert followed.code == 0, followed
    run = followed.json_lines()[-1]["run"]
    assert [s["stepId"] for s in run["steps"]] == ["count", "pick"]
    shown = await account.cli("runs", "get", run["runId"])
    assert "count" in shown.out and "pick" in shown.out and "SUCCEEDED" in shown.out


async def test_runs_list_get_wait_and_cancel(account: Account) -> None:
    cli = account.cli
    hanging = await start(cli, "chaos", {"action": "hang"})

    listed = (await cli("runs", "list", "--json")).json()
    assert hanging in [r["runId"] for r in listed["runs"]]
    table = await cli("runs", "list", "--agent", "chaos")
    assert any(line.startswith(hanging) for line in table.out.splitlines())
    assert (await cli("runs", "get", hanging, "--json")).json()["run"]["agent"] == "chaos"

    # Not over within the wait: exit 6, the run as it is now.
    waited = await cli("runs", "wait", hanging, "--timeout", "1", "--json")
    assert waited.code == 6, waited
    assert waited.json()["done"] is False
    # Silent on stderr when it is not a terminal.
    assert waited.err == ""

    cancelled = await cli("runs", "cancel", hanging, "--reason", "stopped by the CLI test")
    assert cancelled.code == 0, cancelled
    assert f"run {hanging}: CANCELLED" in cancelled.out

    ended = await cli("runs", "wait", hanging)
    assert ended.code == 4, ended
    assert "CANCELLED" in ended.out and "stopped by the CLI test" in ended.out
    assert (await cli("runs", "get", hanging, "--json")).json()["run"]["state"] == "RUN_STATE_CANCELLED"
    only_cancelled = (await cli("runs", "list", "--state", "cancelled", "--json")).json()["runs"]
    assert hanging in [r["runId"] for r in only_cancelled]
    assert all(r["state"] == "RUN_STATE_CANCELLED" for r in only_cancelled)

    succeeded = await start(cli, "calculator", {"expression": "6*7"})
    done = await cli("runs", "wait", succeeded, "--json")
    assert done.code == 0, done
    assert done.json()["run"]["output"]["value"] == 42


async def on_terminal(cli: Cli, *args: str) -> tuple[str, Result]:
    """Runs the CLI with its stderr on a pseudo-terminal; returns what the terminal
    showed (progress and errors) and the result (stdout, exit code)."""
    controller, terminal = pty.openpty()

    def read_terminal() -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: every holder of the terminal's other end closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        try:
            process = await cli.spawn(*args, stderr=terminal)
        finally:
            os.close(terminal)  # the CLI holds its own copy
        shown = (await asyncio.to_thread(read_terminal)).decode(errors="replace")
        result = await cli.finish(process)
    finally:
        os.close(controller)
    assert "Traceback" not in shown, shown
    return shown, result


async def test_runs_wait_shows_progress_on_a_terminal(account: Account) -> None:
    hanging = await start(account.cli, "chaos", {"action": "hang"})

    shown, result = await on_terminal(account.cli, "runs", "wait", hanging, "--timeout", "2")

    assert result.code == 6
    assert f"waiting for run {hanging}" in shown and "RUNNING" in shown
    assert (await account.cli("runs", "cancel", hanging)).code == 0


async def test_events_tail_prints_a_runs_events(account: Account) -> None:
    cli = account.cli
    run_id = await start(cli, "chaos", {"thoughts": 3, "sleep_seconds": 1})

    # Started while the run goes on: prints what is there, then what comes, then stops.
    tail = await cli("events", "tail", run_id)
    assert tail.code == 0, tail
    seqs = [int(line.split()[0]) for line in tail.out.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert tail.out.count("agent_thinking") == 3 and "run_completed" in tail.out.splitlines()[-1]

    as_json = (await cli("events", "tail", run_id, "--json")).json_lines()
    assert [int(e["seq"]) for e in as_json] == seqs
    assert {e["runId"] for e in as_json} == {run_id}
    later = (await cli("events", "tail", run_id, "--after-seq", "3", "--json")).json_lines()
    assert [int(e["seq"]) for e in later] == seqs[3:]


class Gate:
    """A TCP relay from the executor to the events service that the test opens and
    closes: closed, it drops every connection (a partition between the two), so a run
    exists while its events wait in the executor's outbox, for as long as the test says."""

    def __init__(self) -> None:
        self.target = ""
        self.is_open = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def open(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.is_open = False
        for writer in list(self._writers):
            writer.close()

    async def stop(self) -> None:
        self.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            writer.close()
            return
        host, port = self.target.rsplit(":", 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        self._writers |= {writer, upstream_writer}
        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self._writers -= {writer, upstream_writer}


async def note_on_stderr(process: Any, text: str) -> str:
    """Reads the CLI's stderr until a line with `text` (the rest is left for `finish`)."""
    seen = []
    async with asyncio.timeout(PATIENCE_SECONDS):
        while line := (await process.stderr.readline()).decode():
            seen.append(line)
            if text in line:
                return line
    raise AssertionError(f"never said {text!r}: {seen}")


async def test_events_tail_waits_for_the_events_of_a_run_that_exists(tmp_path: Path) -> None:
    """The events service does not know a run until the executor's outbox relay has
    published its first event. `events tail` (like `run start --follow`) asks the
    executor whether the run exists, and if so waits for its events - within a bound."""
    gate = Gate()
    relay_address = await gate.start()
    try:
        async with start_suite(
            tmp_path / "suite", env={"executor": {"SWITCHBOARD_EXECUTOR_EVENTS_ADDRESS": relay_address}}
        ) as suite:
            gate.target = suite.address["events"]
            cli = (await logged_in(suite, tmp_path / "user")).cli
            run_id = await start(cli, "text-stats", {"text": "Held back. Then let go."})
            # The run goes on without the events service; its events wait in the outbox.
            assert (await cli("runs", "wait", run_id)).code == 0

            # Past the bound it gives up, saying why; on a terminal it showed a spinner meanwhile.
            shown, gave_up = await on_terminal(cli, "events", "tail", run_id, "--max-wait", "2")
            assert gave_up.code == 1 and gave_up.out == ""
            assert f"waiting for the events of run {run_id}" in shown
            assert (
                f"switchboard: error: run {run_id} exists, but its events have not reached the "
                "events service in 2s" in shown
            )
            assert "RUN_NOT_FOUND" in shown

            # Not the user's run: NOT_FOUND at once, exactly as for a run that does not exist.
            other = (await logged_in(suite, tmp_path / "other")).cli
            missing = str(uuid.uuid4())
            refused, absent = await other("events", "tail", run_id), await other("events", "tail", missing)
            assert refused.code == absent.code == 1, (refused, absent)
            assert refused.err.startswith("switchboard: error: NOT_FOUND (events):")
            assert refused.err.replace(run_id, "<id>") == absent.err.replace(missing, "<id>")
            assert "waiting" not in refused.err

            # Within the bound, the events arrive once the relay gets through, all of them.
            tail = await cli.spawn("events", "tail", run_id, "--max-wait", "90")
            await note_on_stderr(tail, "have not reached the events service yet: waiting up to 90s")
            gate.open()
            tailed = await cli.finish(tail)
            assert tailed.code == 0, tailed
            seqs = [int(line.split()[0]) for line in tailed.out.splitlines()]
            assert seqs == list(range(1, len(seqs) + 1))
            assert "run_queued" in tailed.out.splitlines()[0]
            assert "run_completed" in tailed.out.splitlines()[-1]

            # `run start --follow` waits the same way (the code is the same).
            gate.close()
            follow = await cli.spawn(
                "run", "start", "text-stats", "--input", '{"text": "Again."}', "--follow", "--json"
            )
            await note_on_stderr(follow, "have not reached the events service yet: waiting up to 30s")
            gate.open()
            followed = await cli.finish(follow)
            assert followed.code == 0, followed
            documents = followed.json_lines()
            events = [d["event"] for d in documents[1:-1]]
            assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
            assert documents[-1]["run"]["state"] == "RUN_STATE_SUCCEEDED"
    finally:
        await gate.stop()


# -- traces


def service_names(spans: list[dict[str, Any]]) -> set[str]:
    return {span["service"] for span in spans}


async def test_trace_show_from_the_local_trace_file(account: Account) -> None:
    cli = account.cli
    run_id = await start(cli, "chaos", {"action": "fail", "reason": "TRACED_FAILURE", "thoughts": 0})
    assert (await cli("runs", "wait", run_id)).code == 3
    trace_id = (await cli("runs", "get", run_id, "--json")).json()["run"]["traceId"]

    async def complete_trace() -> list[dict[str, Any]] | None:
        result = await cli("trace", "show", run_id, "--json")
        if result.code != 0:
            return None
        spans: list[dict[str, Any]] = result.json()["spans"]
        wanted = {"switchboard-executor", "switchboard-worker", "switchboard-events"}
        failed = [s for s in spans if s["error"]]
        return spans if wanted <= service_names(spans) and len(failed) >= 2 else None

    spans = await eventually(complete_trace, "the run's spans never reached the trace file")
    assert {span["traceId"] for span in spans} == {trace_id}
    # Waterfall order: each span after its parent, one level deeper.
    position = {span["spanId"]: n for n, span in enumerate(spans)}
    for n, span in enumerate(spans):
        if span["parentSpanId"] in position:
            parent = spans[position[span["parentSpanId"]]]
            assert position[span["parentSpanId"]] < n and span["depth"] == parent["depth"] + 1

    shown = await cli("trace", "show", run_id, "--width", "120")
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert lines[0].startswith(f"trace {trace_id}") and "failed" in lines[0]
    worker_line = next(line for line in lines if "agent chaos" in line)
    assert worker_line.startswith("✗") and "worker" in worker_line and "█" in worker_line
    assert "failed spans:" in lines and "TRACED_FAILURE" in shown.out

    missing = await cli("trace", "show", run_id, "--trace-file", str(cli.home / "nothing.jsonl"))
    assert missing.code == 1 and "no trace file" in missing.err


@pytest.fixture
def jaeger() -> Iterator[tuple[str, dict[str, Any]]]:
    """A stand-in for Jaeger's query service: GET /api/traces/<id> answers the documents
    put in the dict, in Jaeger's documented response format, 404 otherwise."""
    documents: dict[str, Any] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            trace_id = self.path.removeprefix("/api/traces/")
            document = documents.get(trace_id)
            if not self.path.startswith("/api/traces/") or document is None:
                body = {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]}
                status = 404
            else:
                body, status = document, 200
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", documents
    finally:
        server.shutdown()
        server.server_close()


def jaeger_trace(trace_id: str) -> dict[str, Any]:
    start = 1_700_000_000_000_000  # microseconds

    def span(
        span_id: str, name: str, process: str, offset: int, duration: int, **more: Any
    ) -> dict[str, Any]:
        return {
            "traceID": trace_id,
            "spanID": span_id,
            "operationName": name,
            "references": more.pop("references", []),
            "startTime": start + offset,
            "duration": duration,
            "tags": more.pop("tags", []),
            "logs": [],
            "processID": process,
            "warnings": None,
        }

    def child_of(span_id: str) -> list[dict[str, str]]:
        return [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": span_id}]

    return {
        "data": [
            {
                "traceID": trace_id,
                "spans": [
                    span("00000000000000a1", "executor.run", "p1", 0, 400_000),
                    span(
                        "00000000000000b2",
                        "agent jaeger-test",
                        "p2",
                        100_000,
                        200_000,
                        references=child_of("00000000000000a1"),
                        tags=[
                            {"key": "error", "type": "bool", "value": True},
                            {"key": "otel.status_code", "type": "string", "value": "ERROR"},
                            {"key": "otel.status_description", "type": "string", "value": "it broke"},
                        ],
                    ),
                    span(
                        "00000000000000c3",
                        "switchboard.events.v1.EventsService/Publish",
                        "p3",
                        350_000,
                        10_000,
                        references=child_of("00000000000000a1"),
                    ),
                ],
                "processes": {
                    "p1": {"serviceName": "switchboard-executor", "tags": []},
                    "p2": {"serviceName": "switchboard-worker", "tags": []},
                    "p3": {"serviceName": "switchboard-events", "tags": []},
                },
                "warnings": None,
            }
        ],
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": None,
    }


async def test_trace_show_from_jaeger(account: Account, jaeger: tuple[str, dict[str, Any]]) -> None:
    url, documents = jaeger
    cli = account.cli
    run_id = await start(cli, "calculator", {"expression": "1+1"})
    trace_id = (await cli("runs", "get", run_id, "--json")).json()["run"]["traceId"]

    unknown = await cli("trace", "show", run_id, "--jaeger", url)
    assert unknown.code == 1 and f"has no trace {trace_id}" in unknown.err

    documents[trace_id] = jaeger_trace(trace_id)
    shown = await cli("trace", "show", run_id, "--jaeger", url, "--width", "100")
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert lines[0].startswith(f"trace {trace_id}  3 spans  400.0ms  1 failed")
    rows = lines[2:5]
    assert rows[0].split()[:2] == ["executor.run", "executor"]
    assert rows[1].startswith("✗   agent jaeger-test") and "100.0ms" in rows[1] and "200.0ms" in rows[1]
    assert rows[2].startswith("    EventsService/Publish")
    # The bars sit on one timeline: the root fills it, the child starts a quarter in.
    root_bar = rows[0][rows[0].index("█") :]
    child_bar = rows[1][rows[1].index("█") :]
    assert set(root_bar) == {"█"}
    assert rows[1].index("█") > rows[0].index("█") and len(child_bar) < len(root_bar)
    assert "agent jaeger-test (worker) at 100.0ms: it broke" in shown.out

    from_environment = cli.with_env(SWITCHBOARD_JAEGER_URL=url)
    as_json = (await from_environment("trace", "show", run_id, "--json")).json()
    assert as_json["traceId"] == trace_id
    spans = as_json["spans"]
    assert [s["name"] for s in spans] == [
        "executor.run",
        "agent jaeger-test",
        "switchboard.events.v1.EventsService/Publish",
    ]
    assert [s["depth"] for s in spans] == [0, 1, 1]
    assert spans[1]["parentSpanId"] == "00000000000000a1" and spans[1]["error"] is True
    assert spans[1]["startOffsetMs"] == 100.0 and spans[1]["durationMs"] == 200.0


# -- errors


async def test_bad_input_is_reported_readably_and_without_a_traceback(
    suite: Suite, account: Account, tmp_path: Path
) -> None:
    cli = account.cli
    invalid = await cli("run", "start", "text-stats", "--input", '{"text": 5}')
    assert invalid.code == 1 and invalid.out == ""
    assert invalid.err.startswith("switchboard: error: INVALID_ARGUMENT (executor):")
    assert "reason: INPUT_INVALID" in invalid.err and "field input.text:" in invalid.err

    as_json = await cli("run", "start", "text-stats", "--input", '{"text": 5}', "--json")
    assert as_json.code == 1 and as_json.out == ""
    status = json.loads(as_json.err)["error"]["status"]
    assert status["code"] == "INVALID_ARGUMENT"
    violations = [d for d in status["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert [v["field"] for v in violations[0]["fieldViolations"]] == ["input.text"]

    not_json = await cli("run", "start", "text-stats", "--input", '{"text": ')
    assert not_json.code == 2 and "--input is not valid JSON" in not_json.err
    not_object = await cli("run", "start", "text-stats", "--input", "[1, 2]")
    assert not_object.code == 2 and "must be a JSON object" in not_object.err
    no_target = await cli("run", "start")
    assert no_target.code == 2 and "AGENT or --workflow" in no_target.err
    unknown_command = await cli("runs", "explode")
    assert unknown_command.code == 2

    # Another user's run is NOT_FOUND, exactly like a run that does not exist.
    other = await logged_in(suite, tmp_path / "other")
    theirs = await start(other.cli, "calculator", {"expression": "2+2"})
    missing = str(uuid.uuid4())
    for command in (("runs", "get"), ("runs", "cancel"), ("events", "tail"), ("trace", "show")):
        refused = await cli(*command, theirs)
        absent = await cli(*command, missing)
        assert refused.code == absent.code == 1, (refused, absent)
        assert "NOT_FOUND" in refused.err
        assert refused.err.replace(theirs, "<id>") == absent.err.replace(missing, "<id>")

    unreachable = await cli("--executor", f"127.0.0.1:{free_port()}", "runs", "list")
    assert unreachable.code == 1 and "UNAVAILABLE (executor)" in unreachable.err

    stranger = await Cli(suite, tmp_path / "stranger")("runs", "list")
    assert stranger.code == 1 and "not logged in" in stranger.err


async def test_the_console_script_is_installed(account: Account) -> None:
    script = Path(sys.executable).parent / "switchboard"
    assert script.exists(), "reinstall the project: pip install -e ."
    cli = account.cli
    cli_by_script = copy.copy(cli)
    cli_by_script.command = lambda: [str(script)]  # type: ignore[method-assign]

    usage = await cli_by_script("--help")
    assert usage.code == 0 and "exit codes" in usage.out and "SWITCHBOARD_EXECUTOR_ADDRESS" in usage.out
    whoami = await cli_by_script("whoami", "--json")
    assert whoami.code == 0 and whoami.json()["user"]["username"] == account.username
