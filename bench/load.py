"""Load drivers shared by the benchmarks, and the baseline servers' child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.common.server import SUPERVISOR_PID_VARIABLE

# Generous: a loaded 2-core machine may be slow, but a stuck benchmark must end.
STARTUP_TIMEOUT_SECONDS = 60.0
READY_LINE = "ready"


@dataclass(frozen=True)
class Throughput:
    operations: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0


async def closed_loop(call: Callable[[], Awaitable[object]], in_flight: int, seconds: float) -> Throughput:
    """Calls with `in_flight` of them outstanding (each worker starts its next
    call as soon as its previous one answers) until `seconds` have passed; the
    calls still in flight then finish and count. Time-boxed, so that a slow
    machine measures fewer calls rather than taking longer."""
    deadline = time.perf_counter() + seconds
    completed = 0

    async def worker() -> None:
        nonlocal completed
        while time.perf_counter() < deadline:
            await call()
            completed += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return Throughput(completed, time.perf_counter() - started)


class ChildProcess:
    """A helper process of ours (`python -m <module> ...`) that prints READY_LINE
    once it serves; it stops when this process dies (like the services do)."""

    def __init__(self, module: str, arguments: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.module = module
        self.arguments = list(arguments)
        self.env = {**os.environ, **(env or {}), SUPERVISOR_PID_VARIABLE: str(os.getpid())}
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.arguments,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    code = await self.process.wait()
                    raise RuntimeError(f"{self.module} exited with code {code} before it was ready")
                if line.decode().strip() == READY_LINE:
                    return

    async def send_line(self, text: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()

    async def read_line(self, timeout: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        async with asyncio.timeout(timeout):
            return (await self.process.stdout.readline()).decode().strip()

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def child_process(
    module: str, arguments: Sequence[str], env: dict[str, str] | None = None
) -> AsyncIterator[ChildProcess]:
    child = ChildProcess(module, arguments, env)
    try:
        await child.start()
        yield child
    finally:
        await child.stop()


def announce_ready() -> None:
    """Called by a child process once it serves."""
    print(READY_LINE, flush=True)


def exit_on_sigterm() -> None:
    """For synchronous children: SIGTERM ends them with exit code 0."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
