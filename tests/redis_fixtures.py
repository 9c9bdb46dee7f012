"""Fixtures for the accounting tests: gateways with limits and a ledger, and a real Redis.

`limited_gateway` starts an in-process gateway (auth off: calls count as key
"") serving `PricedOffline`, the offline provider with prices and two
failure scripts, so budgets and costs have something to count. `redis_server`
runs a real `redis-server` on a free port in a temporary folder for one test
and stops it; the binary is installed by `make test` (Debian's redis-server,
see the Makefile). Without it the Redis tests are skipped, except in CI
(CI=true), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from llmgateway.v1 import usage_pb2_grpc
from server.app import Gateway
from server.config import load_config
from server.errors import UpstreamUnavailableError
from server.events import StreamEvent, TextDelta
from server.providers.offline import OfflineProvider, OfflineSettings
from server.routing import Router
from server.schema import GenerationRequest, ModelInfo, Pricing
from tests.conftest import TEST_CONFIG, free_port

# $1 per million output tokens: 1,000 nano-dollars a token; input is free, so a
# call that ends before any output costs nothing.
PRICING = Pricing(input_per_mtok=0.0, output_per_mtok=1.0)
NANOS_PER_OUTPUT_TOKEN = 1_000


class PricedOffline(OfflineProvider):
    """The offline provider with prices; "explode" breaks the stream after two
    deltas (an upstream failure after partial output), "crash" raises a bug."""

    def models(self) -> Sequence[ModelInfo]:
        return [dataclasses.replace(m, pricing=PRICING) for m in super().models()]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        text = request.messages[-1].content[0]
        prompt = getattr(text, "text", "")
        deltas = 0
        async for event in super().stream(request):
            if isinstance(event, TextDelta):
                deltas += 1
                if deltas > 2 and "explode" in prompt:
                    raise UpstreamUnavailableError("the upstream connection broke")
                if "crash" in prompt:
                    raise RuntimeError("a bug in the provider")
            yield event


@dataclass
class LimitedGateway:
    gateway: Gateway
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationServiceStub
    usage: usage_pb2_grpc.UsageServiceStub
    ledger_path: Path


@asynccontextmanager
async def limited_gateway(tmp_path: Path, **overrides: Any) -> AsyncIterator[LimitedGateway]:
    """An in-process gateway with `overrides` (dotted config keys) over TEST_CONFIG."""
    settings: dict[str, Any] = {
        **TEST_CONFIG,
        "ledger.path": str(tmp_path / f"usage-{os.urandom(4).hex()}.sqlite3"),
        "ledger.flush_interval_s": 0.05,
        **overrides,
    }
    config = load_config(environ={}, overrides=settings)
    offline = config.providers["offline"].settings()
    provider = PricedOffline("offline", OfflineSettings.model_validate(offline))
    gateway = Gateway(config, router=Router([provider], config.routing))
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield LimitedGateway(
            gateway,
            channel,
            pb_grpc.GenerationServiceStub(channel),
            usage_pb2_grpc.UsageServiceStub(channel),
            Path(settings["ledger.path"]),
        )
    finally:
        await channel.close()
        await gateway.stop(grace=1)


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()),
        None,
    )
    if found is None:
        message = "redis-server is not installed (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class RedisServer:
    port: int
    process: asyncio.subprocess.Process | None
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self.process.wait(), 10)
        self.process = None

    async def restart(self) -> None:
        """Stops the server and starts an empty one on the same port (nothing is saved)."""
        await self.stop()
        self.process = await _start_redis(self.port, self.folder)


async def _start_redis(port: int, folder: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(folder),
        "--save",
        "",
        "--appendonly",
        "no",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return process
        await asyncio.sleep(0.025)
    process.terminate()
    await process.wait()
    raise AssertionError("redis-server did not start")


@asynccontextmanager
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A fresh redis-server on a free port, stopped afterwards."""
    redis_server_binary()
    port = free_port()
    server = RedisServer(port, await _start_redis(port, tmp_path), tmp_path)
    try:
        yield server
    finally:
        await server.stop()


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, closes the connection a reply comes
    back on instead of passing that reply on (the command has run)."""

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self.armed = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._redis_port)

        async def up() -> None:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()

        async def down() -> None:
            while data := await redis_r.read(65536):
                if self.armed:
                    self.armed = False
                    self.dropped += 1
                    return  # the reply is lost: both connections close below
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, redis_w):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
