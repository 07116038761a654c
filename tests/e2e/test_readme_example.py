"""The README's client example is examples/quickstart.py, and it works as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from tests.harness.suite import Suite

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_readme_shows_the_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks


async def test_example_runs_against_the_suite(suite: Suite, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(
        json.dumps({"admin": {"username": suite.admin_username, "password": suite.admin_password}})
    )
    env = dict(
        os.environ,
        SWITCHBOARD_AUTH_ADDRESS=suite.address["auth"],
        SWITCHBOARD_EXECUTOR_ADDRESS=suite.address["executor"],
        SWITCHBOARD_EVENTS_ADDRESS=suite.address["events"],
        SWITCHBOARD_CREDENTIALS=str(credentials),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert "started run" in text
    assert "EVENT_TYPE_TOOL_COMPLETED" in text
    assert "EVENT_TYPE_RUN_COMPLETED" in text
    assert "output: {" in text
