"""Overload is shed, not queued: a full gateway refuses new calls at once, and says so.

With `server.max_concurrent_calls` generation calls in flight (both edges
together), a new call waits at most `server.max_queue_s` for a slot, then is
refused: UNAVAILABLE with ErrorInfo GATEWAY_OVERLOADED, RetryInfo and a
`retry-after` trailer over gRPC, a 529 with `retry-after` over HTTP, and a
ledger row like any refusal. A call that finds a slot freed within the wait
is served. Health checks are not counted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from tests.conftest import detail, request, rich_status
from tests.test_shutdown_recording import ledger_rows

SLOW_OFFLINE = {"offline": {"type": "offline", "chunk_delay_ms": 100}}
SLOW_TEXT = " ".join(f"w{i}" for i in range(100))  # ~10 s at 100 ms a chunk


async def start(tmp_path: Path, **overrides: Any) -> Gateway:
    config = load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": SLOW_OFFLINE,
            "ledger.path": str(tmp_path / "usage.sqlite3"),
            "server.max_concurrent_calls": 2,
            **overrides,
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    return gateway


@pytest.fixture
async def full(tmp_path: Path) -> AsyncIterator[tuple[Gateway, grpc.aio.Channel, list[Any]]]:
    """A gateway whose two slots are taken by two slow streams (one per edge)."""
    gateway = await start(tmp_path, **{"server.max_queue_s": 0})
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    stream = pb_grpc.GenerationServiceStub(channel).StreamGenerate(
        request(SLOW_TEXT, request_id="held-grpc")
    )
    assert (await stream.read()).HasField("message_start")
    async with httpx2.AsyncClient(timeout=20) as client:
        body = {
            "model": "echo",
            "max_tokens": 500,
            "stream": True,
            "messages": [{"role": "user", "content": SLOW_TEXT}],
        }
        async with client.stream(
            "POST",
            f"http://127.0.0.1:{gateway.http_port}/v1/messages",
            content=json.dumps(body),
            headers={"content-type": "application/json", "x-request-id": "held-http"},
        ) as held:
            chunks = held.aiter_raw()  # held: closing it would end the call
            assert b"message_start" in await anext(chunks)
            try:
                yield gateway, channel, [stream, chunks]
            finally:
                stream.cancel()
                await channel.close()
    await gateway.stop(grace=1)


async def test_a_call_beyond_the_limit_is_refused_at_once_over_grpc(
    full: tuple[Gateway, grpc.aio.Channel, list[Any]], tmp_path: Path
) -> None:
    gateway, channel, _ = full
    stub = pb_grpc.GenerationServiceStub(channel)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(request("hello", request_id="shed-grpc"), timeout=30)
    assert loop.time() - began < 0.5
    error = refused.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    status = rich_status(error)
    info = detail(status, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "GATEWAY_OVERLOADED"
    retry = detail(status, error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds >= 1
    assert ("retry-after", "1") in list(error.trailing_metadata() or ())
    # Streams are refused the same way; the health service still answers.
    with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
        async for _ in stub.StreamGenerate(request("hello", request_id="shed-stream")):
            pass
    assert stream_refused.value.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    await gateway.stop(grace=0)
    rows = ledger_rows(tmp_path / "usage.sqlite3")
    assert rows["shed-grpc"] == ("UNAVAILABLE", "GATEWAY_OVERLOADED")
    assert rows["shed-stream"] == ("UNAVAILABLE", "GATEWAY_OVERLOADED")


async def test_a_call_beyond_the_limit_is_refused_at_once_over_http(
    full: tuple[Gateway, grpc.aio.Channel, list[Any]], tmp_path: Path
) -> None:
    gateway, _, _ = full
    body = {"model": "echo", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    loop = asyncio.get_running_loop()
    async with httpx2.AsyncClient(timeout=30) as client:
        began = loop.time()
        response = await client.post(
            f"http://127.0.0.1:{gateway.http_port}/v1/messages",
            content=json.dumps(body),
            headers={"content-type": "application/json", "x-request-id": "shed-http"},
        )
        assert loop.time() - began < 0.5
    assert response.status_code == 529
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "overloaded_error"
    await gateway.stop(grace=0)
    rows = ledger_rows(tmp_path / "usage.sqlite3")
    assert rows["shed-http"] == ("UNAVAILABLE", "GATEWAY_OVERLOADED")


async def test_a_call_that_finds_a_slot_within_the_wait_is_served(tmp_path: Path) -> None:
    gateway = await start(tmp_path, **{"server.max_queue_s": 5})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            held = [stub.StreamGenerate(request(SLOW_TEXT)) for _ in range(2)]
            for stream in held:
                assert (await stream.read()).HasField("message_start")
            waiting = asyncio.ensure_future(stub.Generate(request("hello"), timeout=30))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            assert gateway.overload_gate.waiting == 1
            held[0].cancel()  # frees a slot: the waiting call takes it
            response = await asyncio.wait_for(waiting, 10)
            assert response.content[0].text == "hello"
            held[1].cancel()
        async with asyncio.timeout(5):  # the server sees the cancel a moment later
            while gateway.overload_gate.in_flight:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.01)
    finally:
        await gateway.stop(grace=1)
