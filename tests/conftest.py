"""Shared fixtures: an in-process gateway on port 0, called through real channels.

One event loop serves the whole session (grpc.aio objects are bound to the
loop that made them); see asyncio_default_*_loop_scope in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every default state path (API keys, the usage ledger, the audit file) lives
# under XDG_STATE_HOME: point it at a temporary folder for the whole session,
# subprocess servers included, so tests never touch the user's own state.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="llmgw-test-state-")

# Scripts every in-process gateway knows, so tests can ask for tool calls and refusals.
TEST_CONFIG = {
    "server.host": "127.0.0.1",
    "server.port": 0,
    "http.port": 0,
    "server.shutdown_grace_s": 5,
    # Local-development mode, explicitly: these tests are about generation, not
    # credentials (tests/test_auth*.py build gateways with auth on).
    "auth.enabled": False,
    "providers": {
        "offline": {
            "type": "offline",
            "models": [
                {"id": "echo", "display_name": "Echo (offline)"},
                {
                    "id": "tiny",
                    "aliases": ["tiny-latest"],
                    "context_window": 1000,
                    "max_output_tokens": 50,
                    "default_max_tokens": 20,
                },
            ],
            "scripts": [
                {
                    "match": {"contains": "weather"},
                    "reply": {
                        "text": "Let me check.",
                        "tool_calls": [
                            {"name": "get_weather", "input": {"city": "Paris"}},
                            {"name": "get_weather", "input": {"city": "Oslo", "days": 2}},
                        ],
                    },
                },
                {"match": {"regex": "^forbidden"}, "reply": {"stop_reason": "refusal"}},
            ],
        }
    },
}


# What no log line may ever hold (issue 4): an API key, a token, or a key hash
# or secret (48 or 64 hex digits, standing alone).
_CREDENTIAL_IN_LOG = re.compile(
    r"llmgw_[0-9a-f]{12}_"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\."
    r"|(?<![0-9a-f])(?:[0-9a-f]{48}|[0-9a-f]{64})(?![0-9a-f])"
)


class _LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if _CREDENTIAL_IN_LOG.search(text):
            self.leaks.append(f"{record.name}: {text}")


@pytest.fixture(scope="session", autouse=True)
def _no_credentials_in_logs() -> Iterator[None]:
    """Every record logged in the whole suite, at every level, is checked for credentials."""
    recorder, root, grpc_log = _LogRecorder(), logging.getLogger(), logging.getLogger("grpc")
    levels = root.level, grpc_log.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    # grpc's own DEBUG records (from Cython, mid-call) break pytest's log capture.
    grpc_log.setLevel(logging.INFO)
    yield
    root.removeHandler(recorder)
    root.setLevel(levels[0])
    grpc_log.setLevel(levels[1])
    assert not recorder.leaks, "credentials in logs:\n" + "\n".join(recorder.leaks[:5])


@dataclass
class RunningGateway:
    gateway: Gateway
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationServiceStub

    async def aclose(self) -> None:
        await self.channel.close()
        await self.gateway.stop(grace=1)


async def started(gateway: Gateway) -> RunningGateway:
    """Starts `gateway` on its configured port (0 in tests) with a channel and stub to it."""
    port = await gateway.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    return RunningGateway(gateway, address, channel, pb_grpc.GenerationServiceStub(channel))


@pytest.fixture(scope="session")
async def running() -> AsyncIterator[RunningGateway]:
    config = load_config(environ={}, overrides=TEST_CONFIG)
    gw = await started(Gateway(config))
    yield gw
    await gw.aclose()


@pytest.fixture
def stub(running: RunningGateway) -> pb_grpc.GenerationServiceStub:
    return running.stub


def user(*texts: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=t) for t in texts])


def request(
    text: str = "Hello there, friend", model: str = "echo", **fields: object
) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, messages=[user(text)], **fields)  # type: ignore[arg-type]


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status in an error's trailers (fails the test when absent)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status in trailers of {error.code()}: {error.details()}")


def detail(status: status_pb2.Status, message_type: type) -> object:
    """The first detail of a type in a rich status, or None."""
    for any_detail in status.details:
        candidate = message_type()
        if any_detail.Unpack(candidate):
            return candidate
    return None


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    bad_request = detail(rich_status(error), error_details_pb2.BadRequest)
    assert isinstance(bad_request, error_details_pb2.BadRequest), "no BadRequest detail"
    return {v.field: v.description for v in bad_request.field_violations}


_T = TypeVar("_T")


async def ticks_during(work: Awaitable[_T]) -> tuple[_T, int]:
    """What `work` returns, and how many times another task got the event loop
    while it ran (0: it held the loop throughout)."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker started
    ticks = 0
    try:
        return await work, ticks
    finally:
        done = True
        await task


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need a fixed one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    port: int
    log: list[str]


async def start_server_process(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Runs `python -m server --port 0 ARGS` and waits until it says where it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--port",
        "0",
        *args,
        cwd=REPO_ROOT,
        # Auth off unless a test says otherwise (tests/test_auth*.py do).
        env={
            **os.environ,
            "LLMGW_AUTH__ENABLED": "false",
            "LLMGW_HTTP__PORT": "0",
            **(env or {}),
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    async with asyncio.timeout(30):
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError("server exited before serving:\n" + "".join(log))
            log.append(line)
            found = re.search(r"serving on [^ ]+:(\d+)", line)
            if found:
                return ServerProcess(process, int(found.group(1)), log)


# Provider tests' fixtures (fake upstreams, a gateway pointed at them) and the
# PostgreSQL server of the ledger tests.
pytest_plugins = ["tests.upstream_fixtures", "tests.postgres_fixtures", "tests.http_fixtures"]
