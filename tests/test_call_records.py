"""Every generation call produces exactly one CallRecord, whichever way it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.calls import UNCOUNTED_CHARS, UNCOUNTED_DELTAS, CallRecord, new_call_id
from server.events import MessageDelta, MessageStart, TextDelta
from server.schema import Usage
from server.token_estimate import count_text
from tests.conftest import RunningGateway, request


@pytest.fixture
def records(running: RunningGateway) -> Iterator[list[CallRecord]]:
    seen: list[CallRecord] = []
    observers = running.gateway.servicer.observers
    observers.append(seen.append)
    yield seen
    observers.remove(seen.append)


async def settle(records: list[CallRecord], count: int) -> None:
    """Waits for `count` records, then a little longer so a duplicate would show."""
    for _ in range(500):
        if len(records) >= count:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def test_successful_calls(
    stub: pb_grpc.GenerationServiceStub, records: list[CallRecord]
) -> None:
    await stub.Generate(request("one two three", request_id="rec-1"))
    [_ async for _ in stub.StreamGenerate(request("four five", request_id="rec-2"))]
    await settle(records, 2)
    assert len(records) == 2
    unary, stream = records
    assert (unary.method, unary.request_id, unary.status) == (
        "Generate",
        "rec-1",
        grpc.StatusCode.OK,
    )
    assert (stream.method, stream.request_id) == ("StreamGenerate", "rec-2")
    for record in records:
        assert (record.model_requested, record.model_served, record.provider) == (
            "echo",
            "echo",
            "offline",
        )
        assert record.usage.input_tokens > 0
        assert record.time_to_first_token_s is not None
        assert record.latency_s is not None
        assert record.latency_s >= record.time_to_first_token_s
    assert unary.usage.output_tokens == 3
    assert stream.usage.output_tokens == 2


@pytest.mark.parametrize(
    ("req", "code", "reason"),
    [
        (request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (request(model="nope"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (request(request_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
    ids=["invalid", "unknown-model", "bad-request-id"],
)
async def test_refused_calls_are_recorded(
    stub: pb_grpc.GenerationServiceStub,
    records: list[CallRecord],
    req: object,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(req)
    await settle(records, 1)
    assert [(r.status, r.error_reason) for r in records] == [(code, reason)]


async def test_a_cancelled_stream_is_recorded_once(
    stub: pb_grpc.GenerationServiceStub, records: list[CallRecord]
) -> None:
    req = request(" ".join(f"w{i}" for i in range(50)), request_id="rec-cancel")
    req.provider_options.update({"chunk_delay_ms": 20})
    call = stub.StreamGenerate(req)
    for _ in range(5):
        await call.read()
    call.cancel()
    await settle(records, 1)
    assert [(r.request_id, r.status) for r in records] == [
        ("rec-cancel", grpc.StatusCode.CANCELLED)
    ]
    assert records[0].time_to_first_token_s is not None


async def test_a_deadline_is_recorded_as_deadline_exceeded(
    stub: pb_grpc.GenerationServiceStub, records: list[CallRecord]
) -> None:
    req = request(" ".join(f"w{i}" for i in range(50)), request_id="rec-deadline")
    req.provider_options.update({"chunk_delay_ms": 20})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(req, timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await settle(records, 1)
    assert [(r.request_id, r.status) for r in records] == [
        ("rec-deadline", grpc.StatusCode.DEADLINE_EXCEEDED)
    ]


def test_call_ids_are_unique_and_sort_in_creation_order() -> None:
    first = [new_call_id() for _ in range(5_000)]
    time.sleep(0.001)
    later = [new_call_id() for _ in range(5_000)]
    assert len(set(first + later)) == 10_000
    # A later call's id sorts after every earlier one: the ledgers' unique
    # index on call_id grows at its right edge.
    assert max(first) < min(later)
    assert len({len(i) for i in first + later}) == 1  # fixed width, so text order is time order
    assert CallRecord("Generate", "r").call_id != CallRecord("Generate", "r").call_id


def test_deltas_are_counted_only_when_the_final_usage_does_not_come() -> None:
    """A record counts its deltas lazily, a bounded number at a time, each on its own."""
    texts = [f"w{i} and more {i * 7}" for i in range(UNCOUNTED_DELTAS * 3 + 5)]
    record = CallRecord("StreamGenerate", "r")
    record.observe(MessageStart("m", "model", "p"))
    for text in texts:
        record.observe(TextDelta(0, text))
        # What waits uncounted stays within its bounds however long the stream.
        assert len(record.uncounted) < UNCOUNTED_DELTAS
        assert record.uncounted_chars < UNCOUNTED_CHARS
    assert record.streamed_output_tokens == sum(count_text(t) for t in texts)

    finished = CallRecord("StreamGenerate", "r")
    for text in texts[:10]:
        finished.observe(TextDelta(0, text))
    finished.observe(MessageDelta(usage=Usage(input_tokens=3, output_tokens=4)))
    finished.observe(TextDelta(0, "after"))
    # The provider's usage is in: nothing is kept to count.
    assert (finished.uncounted, finished.uncounted_chars) == ([], 0)
    finished.ended_at = time.monotonic()
    finished._fill_missing_usage()
    assert (finished.usage.output_tokens, finished.usage_estimated) == (4, False)
