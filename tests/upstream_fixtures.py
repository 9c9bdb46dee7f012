"""Fixtures for provider tests: a fake upstream, and a gateway whose providers use it.

The fake upstream (tests/fake_upstream) and the gateway both run in the
session's event loop on 127.0.0.1, port 0; calls go through a real gRPC
channel, and the providers reach the fake through the real SDKs over HTTP.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from server.routing import Router
from tests.conftest import RunningGateway, started
from tests.fake_upstream import FakeUpstream

# Upstream keys: tests check that they never reach a log line or a caller.
ANTHROPIC_KEY = "sk-ant-test-Zx81-never-log-me"
OPENAI_KEY = "sk-openai-test-Qw27-never-log-me"
OPENAI_KEY_ENV = "UPSTREAM_TEST_OPENAI_KEY"

PRICING = {
    "input_per_mtok": 3.0,
    "output_per_mtok": 15.0,
    "cache_read_per_mtok": 0.3,
    "cache_creation_per_mtok": 3.75,
}


# The HTTP client under the SDK providers: the default (aiohttp) unless
# LLMGW_TEST_HTTP_TRANSPORT names another, so that a file's tests run over
# either transport (tests/test_transport.py tests what differs between them).
TRANSPORT: dict[str, str] = (
    {"http_transport": os.environ["LLMGW_TEST_HTTP_TRANSPORT"]}
    if os.environ.get("LLMGW_TEST_HTTP_TRANSPORT")
    else {}
)


def provider_config(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "anthropic": {
            "type": "anthropic",
            **TRANSPORT,
            "api_key": ANTHROPIC_KEY,
            "base_url": fake.anthropic_url,
            "models": [
                {
                    "id": "claude-test",
                    "upstream_id": "claude-upstream-1",
                    "display_name": "Claude (test)",
                    "aliases": ["claude-test-latest"],
                    "context_window": 200_000,
                    "max_output_tokens": 16_000,
                    "default_max_tokens": 1_024,
                    "thinking": "budget",
                    "pricing": PRICING,
                },
                # Everything else from the shipped catalog.
                {"id": "claude-sonnet-5-5"},
            ],
        },
        "openai": {
            "type": "openai",
            **TRANSPORT,
            "api_key_env": OPENAI_KEY_ENV,
            "base_url": fake.openai_url,
            # The fake speaks the Responses API too: the front door relays to it.
            "responses_api": True,
            "models": [
                {
                    "id": "gpt-test",
                    "upstream_id": "gpt-upstream-1",
                    "context_window": 400_000,
                    "max_output_tokens": 32_000,
                    "default_max_tokens": 2_048,
                    "reasoning": True,
                    "cache_breakpoints": True,
                    "pricing": PRICING,
                },
                {"id": "gpt-6-sol"},
            ],
        },
        # An OpenAI-compatible server (vLLM-like): no prefix routing, top_k, max_tokens.
        "local": {
            "type": "openai",
            **TRANSPORT,
            "api_key": "unused",
            "base_url": fake.openai_url,
            "route_prefixes": [],
            "max_tokens_field": "max_tokens",
            "models": [
                {"id": "llama-local", "sampling": ["temperature", "top_p", "top_k"]},
            ],
        },
    }


@pytest.fixture(scope="session")
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The fake upstream, with no requests recorded and no replies queued."""
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture(scope="session")
def _openai_key_in_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPENAI_KEY_ENV, OPENAI_KEY)
        yield


# One attempt, no breaker: tests see each upstream failure as the provider
# maps it (tests/test_retries.py covers the router's part).
SINGLE_ATTEMPT = {"retry": {"max_attempts": 1}, "breaker": {"enabled": False}}


async def start_upstream_gateway(fake: FakeUpstream, **overrides: Any) -> RunningGateway:
    """A gateway serving the providers above on the fake upstream, with `overrides`
    (dotted config keys) over the tests' base settings."""
    config = load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            # Auth has its own tests; these are about what reaches the providers.
            "auth.enabled": False,
            # One gateway event per upstream event, so these tests see the
            # translation itself (tests/test_coalescing.py covers merging).
            "server.coalesce_stream_deltas": False,
            "providers": provider_config(fake),
            "routing": SINGLE_ATTEMPT,
            **overrides,
        },
    )
    return await started(Gateway(config, router=Router.from_config(config)))


@pytest.fixture(scope="session")
async def upstream_gateway(
    fake_upstream: FakeUpstream, _openai_key_in_environment: None
) -> AsyncIterator[RunningGateway]:
    """A gateway serving the Anthropic, OpenAI and OpenAI-compatible providers above."""
    gw = await start_upstream_gateway(fake_upstream)
    yield gw
    await gw.aclose()


@pytest.fixture
def upstream_stub(upstream_gateway: RunningGateway) -> pb_grpc.GenerationServiceStub:
    return upstream_gateway.stub


PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


def user_blocks(*blocks: pb.ContentBlock) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=list(blocks))


def assistant(*blocks: pb.ContentBlock) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=list(blocks))


def text(value: str, **fields: object) -> pb.ContentBlock:
    return pb.ContentBlock(text=value, **fields)  # type: ignore[arg-type]


def ask(model: str, *texts: str, **fields: Any) -> pb.GenerateRequest:
    """A one-turn request to `model`."""
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=t) for t in texts])
    return pb.GenerateRequest(model=model, messages=[message], **fields)


async def stream_all(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest
) -> tuple[list[pb.StreamGenerateResponse], dict[str, str]]:
    """Every event of a StreamGenerate call, and its trailing metadata."""
    call = stub.StreamGenerate(req)
    events = [event async for event in call]
    return events, {k: v for k, v in await call.trailing_metadata() if isinstance(v, str)}


async def generate(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest
) -> tuple[pb.GenerateResponse, dict[str, str]]:
    """A Generate call's response, and its trailing metadata."""
    call = stub.Generate(req)
    response = await call
    return response, {k: v for k, v in await call.trailing_metadata() if isinstance(v, str)}


def fold_stream(events: list[pb.StreamGenerateResponse]) -> pb.GenerateResponse:
    """Folds wire events into a response, independently of the server's fold
    (written from the proto's documentation), checking the stream's shape:
    blocks open in order, deltas only to open blocks, every block closed."""
    assert events[0].WhichOneof("event") == "message_start"
    assert events[-1].WhichOneof("event") == "message_stop"
    start = events[0].message_start
    response = pb.GenerateResponse(
        id=start.id,
        model=start.model,
        provider=start.provider,
        request_id=start.request_id,
        upstream_request_id=start.upstream_request_id,
        usage=start.usage,
    )
    if start.HasField("routing"):
        response.routing.CopyFrom(start.routing)
    blocks: list[pb.ContentBlock] = []
    tool_json: dict[int, str] = {}
    open_blocks: set[int] = set()
    for event in events[1:-1]:
        kind = event.WhichOneof("event")
        if kind == "content_block_start":
            index = event.content_block_start.index
            assert index == len(blocks), "blocks open in order"
            block = pb.ContentBlock()
            block.CopyFrom(event.content_block_start.content_block)
            blocks.append(block)
            open_blocks.add(index)
        elif kind == "content_block_delta":
            delta = event.content_block_delta
            assert delta.index in open_blocks
            block = blocks[delta.index]
            which = delta.WhichOneof("delta")
            if which == "text":
                block.text += delta.text
            elif which == "tool_input_json":
                tool_json[delta.index] = tool_json.get(delta.index, "") + delta.tool_input_json
            elif which == "thinking":
                block.thinking.text += delta.thinking
            elif which == "thinking_signature":
                block.thinking.signature += delta.thinking_signature
        elif kind == "content_block_stop":
            index = event.content_block_stop.index
            open_blocks.remove(index)
            if index in tool_json:
                blocks[index].tool_use.input.update(json.loads(tool_json[index]))
        elif kind == "message_delta":
            response.stop_reason = event.message_delta.stop_reason
            response.stop_sequence = event.message_delta.stop_sequence
            response.usage.CopyFrom(event.message_delta.usage)
            response.cost.CopyFrom(event.message_delta.cost)
        else:
            raise AssertionError(f"unexpected event {kind} mid-stream")
    assert not open_blocks, "every block is closed"
    response.content.extend(blocks)
    return response


def kinds(events: list[pb.StreamGenerateResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


# -- Routed gateways (tests/test_retries.py, test_fallback.py, test_breaker.py, ...) --

FAST_RETRIES = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.05}


class ManualClock:
    """A monotonic clock tests move by hand (circuit breakers' recovery time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


RoutedGatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_routed_gateway(
    fake: FakeUpstream, _openai_key_in_environment: None
) -> AsyncIterator[RoutedGatewayFactory]:
    """Builds gateways with a `routing` section (fast retries unless given), stopped after the test.

    Deltas are not coalesced, so tests see every upstream chunk.
    """
    running: list[RunningGateway] = []

    async def make(
        routing: dict[str, Any],
        *,
        providers: dict[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> RunningGateway:
        config = load_config(
            environ={},
            overrides={
                "server.host": "127.0.0.1",
                "server.port": 0,
                "http.port": 0,
                "server.coalesce_stream_deltas": False,
                "auth.enabled": False,
                "providers": providers or provider_config(fake),
                "routing": {"retry": FAST_RETRIES, **routing},
            },
        )
        router = Router.from_config(config, clock=clock or time.monotonic, rng=rng)
        gw = await started(Gateway(config, router=router))
        running.append(gw)
        return gw

    yield make
    for gw in running:
        await gw.aclose()
