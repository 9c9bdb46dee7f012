"""Every generation call produces exactly one CallRecord, whichever way it ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.calls import CallRecord, new_call_id
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
