"""The Python client (clients/) against real gateways: async and sync, credentials, errors.

The sync client blocks, and the in-process gateway serves on the test's
event loop, so sync calls run in a worker thread (asyncio.to_thread).
Retries and rich errors are checked against a small scripted server that
fails on purpose, as a real gateway would while draining or rate-limited.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from clients import (
    DeadlineExceededError,
    GatewayClient,
    GatewayClientSync,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    StreamAccumulator,
    UnauthenticatedError,
    UnavailableError,
    build_request,
    image,
    response_message,
    response_text,
    tool,
    tool_choice,
    tool_result,
    user,
)
from clients.response import Response
from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server import errors as server_errors
from tests.conftest import RunningGateway
from tests.test_auth import AuthedGateway, start_authed_gateway
from tests.test_client_credentials import _invalidate_signing_keys as invalidate_signing_keys

WEATHER_TOOL = tool(
    "get_weather",
    "The weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def client(running: RunningGateway) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(running.address, timeout=10) as client:
        yield client


# -- async client -------------------------------------------------------------


async def test_generate_with_a_prompt_string(client: GatewayClient) -> None:
    response = await client.generate("echo", "Hello there", max_tokens=50, request_id="py-1")
    assert response_text(response) == "Hello there"
    assert response.stop_reason == "end_turn"
    assert response.request_id == "py-1"
    assert response.usage.output_tokens > 0


async def test_stream_text_and_final_response(client: GatewayClient) -> None:
    async with client.stream("echo", "one two three four") as stream:
        deltas = [text async for text in stream.text_stream()]
        response = await stream.final_response()
    assert len(deltas) > 1
    assert "".join(deltas) == response_text(response) == "one two three four"
    assert stream.accumulator.finished
    assert response.usage.output_tokens == 4


async def test_folded_stream_equals_generate_with_tool_calls(client: GatewayClient) -> None:
    # The offline provider's "weather" script answers with text and two tool calls.
    options: dict[str, Any] = {"tools": [WEATHER_TOOL], "request_id": "fold-1"}
    unary = await client.generate("echo", "weather please", **options)
    streamed = await client.stream("echo", "weather please", **options).final_response()
    assert unary.stop_reason == "tool_use"
    assert [b.WhichOneof("block") for b in unary.content] == ["text", "tool_use", "tool_use"]
    unary.ClearField("id")
    streamed.ClearField("id")
    assert streamed == unary


async def test_tool_round_trip_with_an_image(client: GatewayClient) -> None:
    first = await client.generate(
        "echo", "weather in Paris?", tools=[WEATHER_TOOL], tool_choice=tool_choice("auto")
    )
    calls = [b.tool_use for b in first.content if b.HasField("tool_use")]
    assert calls[0].input["city"] == "Paris"
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    conversation = [
        user("weather in Paris?"),
        response_message(first),
        user(*(tool_result(call.id, "Sunny, 21 C") for call in calls)),
        user("and this picture?", image(png, "image/png")),
    ]
    second = await client.generate("echo", conversation, tools=[WEATHER_TOOL], system="Be brief")
    assert response_text(second) == "and this picture?"


def test_build_request_sets_only_what_is_given() -> None:
    bare = build_request("echo", "hi")
    assert not bare.HasField("max_tokens") and not bare.HasField("temperature")
    full = build_request(
        "echo",
        "hi",
        system="sys",
        max_tokens=5,
        temperature=0.0,
        stop_sequences=["x"],
        thinking_budget=1024,
        end_user_id="u1",
        tags={"team": "a"},
        provider_options={"chunk_delay_ms": 5},
    )
    assert full.HasField("temperature") and full.temperature == 0.0
    assert full.system[0].text == "sys" and full.thinking.budget_tokens == 1024
    assert full.metadata.tags["team"] == "a"
    assert full.provider_options["chunk_delay_ms"] == 5


async def test_typed_errors_carry_reason_and_request_id(client: GatewayClient) -> None:
    with pytest.raises(NotFoundError) as missing:
        await client.generate("no-such-model", "hi", request_id="err-1")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert missing.value.request_id == "err-1"
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.generate("echo", [], max_tokens=-1)
    fields = {v.field for v in invalid.value.field_violations}
    assert {"messages", "max_tokens"} <= fields
    with pytest.raises(NotFoundError):  # a stream raises the same types
        await client.stream("no-such-model", "hi").final_response()


async def test_the_default_deadline_applies(running: RunningGateway) -> None:
    async with GatewayClient(running.address, timeout=0.3) as slow:
        stream = slow.stream("echo", "a b c d e f", provider_options={"chunk_delay_ms": 200})
        with pytest.raises(DeadlineExceededError):
            await stream.final_response()


async def test_list_models_and_count_tokens(client: GatewayClient) -> None:
    assert "echo" in [m.id for m in await client.list_models()]
    assert (await client.count_tokens("echo", "one two three")).input_tokens > 0


def test_accumulator_overwrites_cumulative_usage() -> None:
    accumulator = StreamAccumulator()
    for usage in (pb.Usage(output_tokens=3), pb.Usage(output_tokens=7)):
        accumulator.add(pb.StreamGenerateResponse(message_delta=pb.MessageDelta(usage=usage)))
    assert accumulator.response().usage.output_tokens == 7


# -- sync client ----------------------------------------------------------------


def _sync_round_trip(address: str) -> tuple[str, list[str], Response]:
    with GatewayClientSync(address, timeout=10) as client:
        text = response_text(client.generate("echo", "sync hello"))
        with client.stream("echo", "sync stream here") as stream:
            deltas = list(stream.text_stream())
            return text, deltas, stream.final_response()


async def test_sync_client_generate_and_stream(running: RunningGateway) -> None:
    text, deltas, response = await asyncio.to_thread(_sync_round_trip, running.address)
    assert text == "sync hello"
    assert "".join(deltas) == response_text(response) == "sync stream here"
    assert response.stop_reason == "end_turn"


async def test_sync_client_raises_typed_errors(running: RunningGateway) -> None:
    def fail() -> None:
        with GatewayClientSync(running.address, timeout=10) as client:
            client.generate("no-such-model", "hi")

    with pytest.raises(NotFoundError) as caught:
        await asyncio.to_thread(fail)
    assert caught.value.reason == "MODEL_NOT_FOUND" and caught.value.request_id


# -- credentials ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("client-auth"))
    yield gateway
    await gateway.close()


@pytest.mark.parametrize("credentials", ["token", "key"])
async def test_async_client_with_credentials(authed: AuthedGateway, credentials: str) -> None:
    key = authed.create_key("py-client")[1]
    async with GatewayClient(authed.address, key, credentials=credentials, timeout=10) as c:  # type: ignore[arg-type]
        assert response_text(await c.generate("echo", "authed")) == "authed"
        assert response_text(await c.stream("echo", "streamed").final_response()) == "streamed"
        if credentials == "token":
            assert c._tokens is not None and c._tokens.issued == 1


@pytest.mark.parametrize("credentials", ["token", "key"])
async def test_sync_client_with_credentials(authed: AuthedGateway, credentials: str) -> None:
    key = authed.create_key("py-sync-client")[1]

    def calls() -> tuple[str, str, int]:
        with GatewayClientSync(authed.address, key, credentials=credentials, timeout=10) as c:  # type: ignore[arg-type]
            unary = response_text(c.generate("echo", "authed"))
            streamed = response_text(c.stream("echo", "streamed").final_response())
            return unary, streamed, c._tokens.issued if c._tokens else 0

    unary, streamed, issued = await asyncio.to_thread(calls)
    assert (unary, streamed) == ("authed", "streamed")
    assert issued == (1 if credentials == "token" else 0)


async def test_wrong_key_is_unauthenticated(authed: AuthedGateway) -> None:
    bad = "llmgw_000000000000_" + "0" * 48
    async with GatewayClient(authed.address, bad, credentials="key", timeout=10) as c:
        with pytest.raises(UnauthenticatedError) as caught:
            await c.generate("echo", "hi")
    assert caught.value.reason == "UNAUTHENTICATED"

    def sync_with_tokens() -> None:
        with GatewayClientSync(authed.address, bad, timeout=10) as c:
            c.stream("echo", "hi").final_response()

    with pytest.raises(UnauthenticatedError):
        await asyncio.to_thread(sync_with_tokens)


async def test_sync_client_refreshes_a_refused_token_once(authed: AuthedGateway) -> None:
    key = authed.create_key("py-sync-refresh")[1]
    client = GatewayClientSync(authed.address, key, timeout=10)
    try:
        await asyncio.to_thread(client.generate, "echo", "warm up")
        await invalidate_signing_keys(authed)  # the held token is refused from now on
        response = await asyncio.to_thread(client.generate, "echo", "after")
        assert response_text(response) == "after"
        await invalidate_signing_keys(authed)
        stream = await asyncio.to_thread(client.stream, "echo", "stream after")
        assert response_text(await asyncio.to_thread(stream.final_response)) == "stream after"
        assert client._tokens is not None and client._tokens.issued == 3
    finally:
        client.close()


# -- retries and rich details, against a server that fails on purpose ------------


@dataclass
class FlakyGeneration(pb_grpc.GenerationServiceServicer):
    """Fails the first `failures` calls with `error`, then answers; counts every call."""

    failures: int = 0
    error: server_errors.GatewayError = field(
        default_factory=lambda: server_errors.ShuttingDownError("draining")
    )
    fail_after_first_event: bool = False
    calls: int = 0

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort_with_status(self.error.to_status("flaky-1"))
        return pb.GenerateResponse(content=[pb.ContentBlock(text="finally")])

    async def StreamGenerate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        self.calls += 1
        if self.fail_after_first_event:
            yield pb.StreamGenerateResponse(message_start=pb.MessageStart(id="m1"))
            await context.abort_with_status(self.error.to_status("flaky-2"))
        yield pb.StreamGenerateResponse(message_stop=pb.MessageStop())


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyGeneration, str]]:
    servicer = FlakyGeneration()
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_unavailable_before_any_response_is_retried(
    flaky: tuple[FlakyGeneration, str],
) -> None:
    servicer, address = flaky
    servicer.failures = 2
    async with GatewayClient(address, timeout=10) as client:
        assert response_text(await client.generate("echo", "hi")) == "finally"
    assert servicer.calls == 3


async def test_a_stream_is_not_retried_after_its_first_event(
    flaky: tuple[FlakyGeneration, str],
) -> None:
    servicer, address = flaky
    servicer.fail_after_first_event = True
    async with GatewayClient(address, timeout=10) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.stream("echo", "hi").final_response()
    assert servicer.calls == 1
    assert caught.value.reason == "SHUTTING_DOWN" and caught.value.request_id == "flaky-2"


async def test_rate_limit_exposes_retry_delay(flaky: tuple[FlakyGeneration, str]) -> None:
    servicer, address = flaky
    servicer.failures = 1
    servicer.error = server_errors.RateLimitedError("slow down", retry_after=2.5)
    async with GatewayClient(address, timeout=10, max_retries=0) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.generate("echo", "hi")
    assert servicer.calls == 1  # max_retries=0: the caller's call to retry
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.retry_delay, error.request_id) == (
        "UPSTREAM_RATE_LIMITED",
        2.5,
        "flaky-1",
    )
    assert "UPSTREAM_RATE_LIMITED" in str(error)


# -- a gateway without authentication, with a key set ------------------------------


async def test_a_key_against_a_no_auth_gateway_calls_without_credentials(
    running: RunningGateway,
) -> None:
    # IssueToken answers AUTH_DISABLED there: not an error, just no token to send.
    async with GatewayClient(running.address, "any value", timeout=10) as client:
        assert response_text(await client.generate("echo", "no auth")) == "no auth"
        assert response_text(await client.stream("echo", "streamed").final_response()) == "streamed"
        assert client._tokens is not None and client._tokens.auth_disabled

    def sync_calls() -> tuple[str, str]:
        with GatewayClientSync(running.address, "any value", timeout=10) as client:
            unary = response_text(client.generate("echo", "no auth"))
            return unary, response_text(client.stream("echo", "streamed").final_response())

    assert await asyncio.to_thread(sync_calls) == ("no auth", "streamed")
