"""Merging stream deltas that are already waiting (server/grpc_edge/coalescing.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from server.errors import UpstreamOverloadedError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    ResponseAccumulator,
    StreamEvent,
    TextDelta,
    ToolInputDelta,
)
from server.grpc_edge.coalescing import coalesce
from server.schema import StopReason, TextBlock, ToolUseBlock
from tests.fake_upstream import FakeUpstream
from tests.fake_upstream.script import Reply, Text
from tests.upstream_fixtures import ask, fold_stream, generate, kinds, provider_config, stream_all

EVENTS: list[StreamEvent] = [
    MessageStart("m", "model", "p"),
    ContentBlockStart(0, TextBlock("")),
    *(TextDelta(0, f"w{i} ") for i in range(10)),
    ContentBlockStop(0),
    ContentBlockStart(1, ToolUseBlock(id="t", name="f")),
    ToolInputDelta(1, '{"a":'),
    ToolInputDelta(1, " 1}"),
    ContentBlockStop(1),
    MessageDelta(StopReason.TOOL_USE),
    MessageStop(),
]


async def source(events: list[StreamEvent], pause: float = 0.0) -> AsyncIterator[StreamEvent]:
    for event in events:
        if pause:
            await asyncio.sleep(pause)
        yield event


async def slow_consumer(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    """Reads like a gRPC sender: each message takes a while to go out."""
    received = []
    async for event in stream:
        received.append(event)
        await asyncio.sleep(0.002)
    return received


def folded(events: list[StreamEvent]) -> object:
    accumulator = ResponseAccumulator()
    for event in events:
        accumulator.add(event)
    return accumulator.result()


async def test_waiting_deltas_of_one_block_merge_and_fold_the_same() -> None:
    received = await slow_consumer(coalesce(source(EVENTS)))
    texts = [e for e in received if isinstance(e, TextDelta)]
    assert len(texts) < 10
    assert "".join(t.text for t in texts) == "".join(f"w{i} " for i in range(10))
    tool = [e for e in received if isinstance(e, ToolInputDelta)]
    assert [t.partial_json for t in tool] == ['{"a": 1}']
    # Everything else passes through, in order.
    others = [e for e in received if not isinstance(e, TextDelta | ToolInputDelta)]
    assert others == [e for e in EVENTS if not isinstance(e, TextDelta | ToolInputDelta)]
    assert folded(received) == folded(EVENTS)


async def test_nothing_more_is_read_upstream_until_the_first_content_is_sent() -> None:
    pulled: list[StreamEvent] = []

    async def counted() -> AsyncIterator[StreamEvent]:
        for event in EVENTS:
            pulled.append(event)
            yield event

    stream = coalesce(counted())
    received = []
    async for event in stream:
        received.append(event)
        if isinstance(event, TextDelta):
            # Reading on would only hold up the messages before the first delta.
            assert pulled == EVENTS[:3]
            break
        await asyncio.sleep(0.002)  # a preamble message being written
    await stream.aclose()  # type: ignore[attr-defined]
    assert received == EVENTS[:3]


async def test_a_source_slower_than_the_sender_is_not_merged() -> None:
    received = [e async for e in coalesce(source(EVENTS, pause=0.003))]
    assert received == EVENTS


async def test_an_error_comes_after_the_events_before_it() -> None:
    async def failing() -> AsyncIterator[StreamEvent]:
        yield MessageStart("m", "model", "p")
        yield ContentBlockStart(0, TextBlock(""))
        yield TextDelta(0, "partial")
        raise UpstreamOverloadedError("overloaded")

    received: list[StreamEvent] = []
    with pytest.raises(UpstreamOverloadedError):
        async for event in coalesce(failing()):
            received.append(event)
    assert [type(e) for e in received] == [MessageStart, ContentBlockStart, TextDelta]


async def test_closing_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[StreamEvent]:
        try:
            yield MessageStart("m", "model", "p")
            while True:
                await asyncio.sleep(0.001)
                yield TextDelta(0, "x")
        finally:
            closed.set()

    stream = coalesce(endless())
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(closed.wait(), 1)


async def test_gateway_merges_a_burst_from_the_anthropic_sdk(fake: FakeUpstream) -> None:
    """Through the real SDK: a response that arrives in one read goes out in fewer messages."""
    config = load_config(
        environ={},
        overrides={
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": {"anthropic": provider_config(fake)["anthropic"]},
        },
    )
    gateway = Gateway(config)
    port = await gateway.start()
    words = [f"w{i} " for i in range(40)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            fake.enqueue(Reply(blocks=[Text("".join(words), pieces=words)]))
            events, _ = await stream_all(stub, ask("claude-test", "Hello", request_id="burst"))
            fake.enqueue(Reply(blocks=[Text("".join(words), pieces=words)]))
            # Another request id: the same one would be a repeat, replayed.
            unary, _ = await generate(stub, ask("claude-test", "Hello", request_id="burst-2"))
    finally:
        await gateway.stop(grace=1)
    deltas = kinds(events).count("content_block_delta")
    assert 1 <= deltas < len(words)
    folded = fold_stream(events)
    folded.request_id = unary.request_id
    assert folded == unary


async def test_the_first_delta_goes_out_before_the_rest_of_a_burst_is_read() -> None:
    """Time to first token: a burst already buffered upstream must not be read whole first."""
    produced = 0

    async def burst() -> AsyncIterator[StreamEvent]:
        nonlocal produced
        # No awaits between events: as an SDK parsing a response already in memory.
        for event in EVENTS[:2] + [TextDelta(0, f"w{i} ") for i in range(50)]:
            produced += 1
            yield event

    received: list[StreamEvent] = []
    produced_at_first_delta = None
    async for event in coalesce(burst()):
        if isinstance(event, TextDelta) and produced_at_first_delta is None:
            produced_at_first_delta = produced
        received.append(event)
        for _ in range(3):  # a send takes a few turns of the loop
            await asyncio.sleep(0)
    assert produced_at_first_delta is not None
    assert produced_at_first_delta <= 10, produced_at_first_delta
    # After the first delta, the backlog is merged.
    assert sum(isinstance(e, TextDelta) for e in received) < 25
    assert "".join(e.text for e in received if isinstance(e, TextDelta)) == "".join(
        f"w{i} " for i in range(50)
    )


async def test_no_pump_runs_before_the_first_content() -> None:
    # The preamble is read and sent by the sender itself (a pump task for it
    # would only add hops); a stream without deltas never starts one.
    preamble = [MessageStart("m", "model", "p"), ContentBlockStart(0, TextBlock(""))]
    tail = [ContentBlockStop(0), MessageDelta(StopReason.END_TURN), MessageStop()]
    before = len(asyncio.all_tasks())
    counts = []
    async for _ in coalesce(source(preamble + tail)):
        counts.append(len(asyncio.all_tasks()) - before)
    assert counts == [0] * 5
    counts = []
    async for _ in coalesce(source([*preamble, TextDelta(0, "a"), TextDelta(0, "b"), *tail])):
        counts.append(len(asyncio.all_tasks()) - before)
    assert counts[:3] == [0, 0, 0]  # up to the first delta; then the pump reads on
