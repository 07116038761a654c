"""`make up`'s launcher: five servers SERVING with reflection, credentials kept
0600, a clean stop on Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.harness.suite import free_port

EXPECTED = {
    "auth": "switchboard.auth.v1.AuthService",
    "registry": "switchboard.registry.v1.RegistryService",
    "executor": "switchboard.executor.v1.ExecutorService",
    "events": "switchboard.events.v1.EventsService",
    "worker": "switchboard.agent.v1.AgentWorker",
}


async def listed_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def request() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for response in stub.ServerReflectionInfo(request(), timeout=5):
            return {service.name for service in response.list_services_response.service}
    return set()


async def test_launcher_brings_up_five_servers_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {service: free_port() for service in EXPECTED}
    env = dict(os.environ, SWITCHBOARD_DATA_DIR=str(tmp_path / "state"))
    env.update({f"SWITCHBOARD_{service.upper()}_PORT": str(port) for service, port in ports.items()})
    # Free metrics ports too: the defaults (9151-9155) may be taken by a running `make up`.
    metrics_ports = {service: free_port() for service in EXPECTED}
    env.update({f"SWITCHBOARD_{s.upper()}_METRICS_PORT": str(p) for s, p in metrics_ports.items()})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.launcher",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        banner = []
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "the launcher exited before it was up"
            banner.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(banner)
        for service, port in ports.items():
            assert f"127.0.0.1:{port}" in text, service
            assert f"http://127.0.0.1:{metrics_ports[service]}/metrics" in text, service
            assert EXPECTED[service] in await listed_services(f"127.0.0.1:{port}")
            assert "grpc.health.v1.Health" in await listed_services(f"127.0.0.1:{port}")

        credentials = tmp_path / "state" / "credentials.json"
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        stored = json.loads(credentials.read_text())
        assert len(stored["admin"]["password"]) >= 16
        assert str(credentials) in text
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0
