"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, no generated code)
reads protos/ and does Login → StartRun → Subscribe with acknowledgements."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.conftest import backends_required
from tests.harness.suite import TEST_PASSWORD, Suite

CLIENT = Path(__file__).resolve().parent.parent / "polyglot" / "client.mjs"
MODULES = CLIENT.parent / "node_modules"


async def test_node_client_runs_an_agent_and_acknowledges_its_events(suite: Suite) -> None:
    node = shutil.which("node")
    if node is None or not MODULES.is_dir():
        message = "node or its npm packages are absent (`make test` installs them when npm exists)"
        if backends_required():
            pytest.fail(message + ": required in CI")
        pytest.skip(message + ": skipping the polyglot client")
    username = f"node-{uuid.uuid4().hex[:6]}"
    await suite.create_user(username)
    env = dict(
        os.environ,
        SWITCHBOARD_AUTH_ADDRESS=suite.address["auth"],
        SWITCHBOARD_EXECUTOR_ADDRESS=suite.address["executor"],
        SWITCHBOARD_EVENTS_ADDRESS=suite.address["events"],
        SWITCHBOARD_USERNAME=username,
        SWITCHBOARD_PASSWORD=TEST_PASSWORD,
    )
    process = await asyncio.create_subprocess_exec(
        node, str(CLIENT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["state"] == "RUN_STATE_SUCCEEDED"
    seqs = [event["seq"] for event in result["events"]]
    assert seqs == list(range(1, len(seqs) + 1))
    types = [event["type"] for event in result["events"]]
    assert types[-1] == "EVENT_TYPE_RUN_COMPLETED"
    for expected in (
        "AGENT_STARTED",
        "AGENT_THINKING",
        "TOOL_EXECUTING",
        "TOOL_COMPLETED",
        "AGENT_COMPLETED",
    ):
        assert f"EVENT_TYPE_{expected}" in types
