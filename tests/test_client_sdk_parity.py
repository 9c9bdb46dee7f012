"""The Python client meets what the official SDKs taught callers to expect (issue 18, item 9).

Stop reasons are names, tool inputs plain dicts with their integers, a
misspelt keyword raises TypeError, `max_retries` retries what may be
retried (and nothing else), and `stream.text_stream` is an iterator, as
the anthropic SDK spells them. Checked against the in-process gateway and
a scripted server that fails or answers exactly as told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from clients import (
    GatewayClient,
    GatewayClientSync,
    InvalidArgumentError,
    RateLimitedError,
    UnavailableError,
    build_request,
    response_text,
    tool,
)
from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server import errors as server_errors
from tests.conftest import RunningGateway

WEATHER = tool("get_weather", "Weather for a city", {"type": "object"})
TOOL_INPUT = {"count": 2, "ratio": 0.5, "nested": {"ids": [1, 2, 3]}, "name": "x"}
# Past 2**53 a double cannot hold it: only the stream's JSON keeps it.
BIG = 2**63 - 1


@pytest.fixture
async def client(running: RunningGateway) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(running.address, timeout=10) as client:
        yield client


@dataclass
class Scripted(pb_grpc.GenerationServiceServicer):
    """Fails the first `failures` calls with `error`, then answers with a tool call."""

    failures: int = 0
    error: server_errors.GatewayError = field(
        default_factory=lambda: server_errors.ShuttingDownError("draining")
    )
    times: list[float] = field(default_factory=list)

    def _fails(self) -> bool:
        self.times.append(time.monotonic())
        return len(self.times) <= self.failures

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        if self._fails():
            await context.abort_with_status(self.error.to_status("scripted"))
        tool_input = struct_pb2.Struct()
        tool_input.update(TOOL_INPUT)
        block = pb.ContentBlock(tool_use=pb.ToolUseBlock(id="t1", name="f", input=tool_input))
        return pb.GenerateResponse(content=[block], stop_reason=pb.STOP_REASON_TOOL_USE)

    async def StreamGenerate(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        if self._fails():
            await context.abort_with_status(self.error.to_status("scripted"))
        use = pb.ContentBlock(tool_use=pb.ToolUseBlock(id="t1", name="f"))
        for event in (
            pb.StreamGenerateResponse(message_start=pb.MessageStart(id="m1")),
            pb.StreamGenerateResponse(content_block_start=pb.ContentBlockStart(index=0)),
            pb.StreamGenerateResponse(
                content_block_delta=pb.ContentBlockDelta(index=0, text="Let me check.")
            ),
            pb.StreamGenerateResponse(content_block_stop=pb.ContentBlockStop(index=0)),
            pb.StreamGenerateResponse(
                content_block_start=pb.ContentBlockStart(index=1, content_block=use)
            ),
            pb.StreamGenerateResponse(
                content_block_delta=pb.ContentBlockDelta(
                    index=1, tool_input_json='{"count": 2, "big": ' + str(BIG)
                )
            ),
            pb.StreamGenerateResponse(
                content_block_delta=pb.ContentBlockDelta(index=1, tool_input_json=', "r": 0.5}')
            ),
            pb.StreamGenerateResponse(content_block_stop=pb.ContentBlockStop(index=1)),
            pb.StreamGenerateResponse(
                message_delta=pb.MessageDelta(stop_reason=pb.STOP_REASON_TOOL_USE)
            ),
            pb.StreamGenerateResponse(message_stop=pb.MessageStop()),
        ):
            yield event


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


# -- stop reasons and tool inputs -------------------------------------------------


async def test_stop_reasons_are_names(client: GatewayClient) -> None:
    assert (await client.generate("echo", "hi")).stop_reason == "end_turn"
    tools = await client.generate("echo", "weather please", tools=[WEATHER])
    assert tools.stop_reason == "tool_use"
    assert tools.proto.stop_reason == pb.STOP_REASON_TOOL_USE  # the number, for who wants it
    streamed = await client.stream("echo", "weather please", tools=[WEATHER]).final_response()
    assert streamed.stop_reason == "tool_use"
    assert [block.type for block in streamed.content] == ["text", "tool_use", "tool_use"]


async def test_tool_input_is_a_plain_dict_with_integers(scripted: tuple[Scripted, str]) -> None:
    _, address = scripted
    async with GatewayClient(address, timeout=10) as client:
        (block,) = (await client.generate("m", "hi")).content
        assert (block.type, block.id, block.name) == ("tool_use", "t1", "f")
        assert block.input == TOOL_INPUT
        assert type(block.input) is dict and type(block.input["count"]) is int
        assert type(block.input["nested"]["ids"][0]) is int
        assert type(block.input["ratio"]) is float
        streamed = await client.stream("m", "hi").final_response()
    assert streamed.content[1].input == {"count": 2, "big": BIG, "r": 0.5}
    assert streamed.content[1].tool_use.name == "f"  # the protobuf block is still there


# -- unknown keyword arguments -----------------------------------------------------


async def test_unknown_keyword_arguments_raise(client: GatewayClient) -> None:
    with pytest.raises(TypeError, match="max_token"):
        await client.generate("echo", "hi", max_token=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="stop_sequence"):
        client.stream("echo", "hi", stop_sequence=["x"])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="temprature"):
        build_request("echo", "hi", temprature=0.5)  # type: ignore[call-arg]
    with GatewayClientSync(client.address) as sync, pytest.raises(TypeError):
        sync.generate("echo", "hi", tool=[WEATHER])  # type: ignore[call-arg]


# -- retries -------------------------------------------------------------------------


async def test_unavailable_is_retried_twice_by_default(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.failures = 3
    async with GatewayClient(address, timeout=10) as client:
        with pytest.raises(UnavailableError):
            await client.generate("m", "hi")
        assert len(servicer.times) == 3  # one call, two retries
        servicer.times.clear()
        servicer.failures = 2
        assert (await client.generate("m", "hi")).stop_reason == "tool_use"
    # Backoff: 0.5 s, then 1 s, less up to a quarter of jitter.
    first, second, third = servicer.times
    assert 0.35 <= second - first <= 1.0 and 0.7 <= third - second <= 1.5


async def test_max_retries_zero_makes_one_attempt(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.failures = 1
    async with GatewayClient(address, timeout=10, max_retries=0) as client:
        with pytest.raises(UnavailableError):
            await client.generate("m", "hi")
    assert len(servicer.times) == 1


async def test_rate_limits_are_retried_after_retry_info(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.failures = 1
    servicer.error = server_errors.RateLimitedError("slow down", retry_after=0.3)
    async with GatewayClient(address, timeout=10) as client:
        response = await client.generate("m", "hi")
    assert response.stop_reason == "tool_use"
    first, second = servicer.times
    assert second - first >= 0.3


async def test_a_retry_info_past_the_deadline_is_not_waited_for(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    servicer.failures = 1
    servicer.error = server_errors.RateLimitedError("slow down", retry_after=5)
    async with GatewayClient(address, timeout=1, max_retries=5) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.generate("m", "hi")
    assert caught.value.retry_delay == 5 and len(servicer.times) == 1


async def test_invalid_argument_is_never_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.failures = 1
    servicer.error = server_errors.InvalidArgumentError(
        [server_errors.FieldViolation("model", "bad")]
    )
    async with GatewayClient(address, timeout=10, max_retries=5) as client:
        with pytest.raises(InvalidArgumentError):
            await client.generate("m", "hi")
    assert len(servicer.times) == 1


async def test_a_stream_is_retried_before_its_first_event(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    servicer.failures = 1
    async with GatewayClient(address, timeout=10) as client, client.stream("m", "hi") as stream:
        texts = [text async for text in stream.text_stream]
    assert texts == ["Let me check."] and len(servicer.times) == 2

    def sync_stream() -> list[str]:
        servicer.times.clear()
        with GatewayClientSync(address, timeout=10) as client:
            retried = response_text(client.stream("m", "hi").final_response())
            generated = client.generate("m", "hi").stop_reason
            assert generated == "tool_use"
            return [retried]

    assert await asyncio.to_thread(sync_stream) == ["Let me check."]
    assert len(servicer.times) == 3  # the stream's two attempts, then Generate's one


async def test_the_sync_client_retries_unavailable(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.failures = 2

    def call() -> str | None:
        with GatewayClientSync(address, timeout=10) as client:
            return client.generate("m", "hi").stop_reason

    assert await asyncio.to_thread(call) == "tool_use"
    assert len(servicer.times) == 3


# -- text_stream ------------------------------------------------------------------


async def test_text_stream_is_an_iterator_as_in_the_anthropic_sdk(
    client: GatewayClient, running: RunningGateway
) -> None:
    async with client.stream("echo", "one two three") as stream:
        texts = [text async for text in stream.text_stream]
    assert "".join(texts) == "one two three" and len(texts) > 1
    async with client.stream("echo", "old spelling") as stream:  # still callable
        assert "".join([text async for text in stream.text_stream()]) == "old spelling"

    def sync_texts() -> str:
        with (
            GatewayClientSync(running.address, timeout=10) as sync,
            sync.stream("echo", "sync one two") as stream,
        ):
            return "".join(stream.text_stream)

    assert await asyncio.to_thread(sync_texts) == "sync one two"
