"""Callers that stop reading: bounded memory, stopped upstreams, a stalled-stream timeout.

A stream's writes wait for the caller's side (gRPC flow control, a full
socket over HTTP), and the upstream behind it is read no further. A stream
nobody reads for `server.stalled_stream_timeout_s` ends with
DEADLINE_EXCEEDED, reason STALLED_READER: its ledger row says so, its
upstream is closed, and a caller that reads again later gets what was sent
and then that status. A caller that reads slowly is never cut. The upstream
streams without end (tests/fake_upstream/endless.py), so only the gateway's
own backpressure stops it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2
import pytest
from google.rpc import error_details_pb2

from bench.unread_streams import CLIENT_OPTIONS, ask, probe
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import IdempotencyConfig, load_config
from tests.conftest import detail, rich_status
from tests.fake_upstream.endless import EndlessUpstream, provider_config
from tests.test_shutdown_recording import ledger_rows

STALL_S = 2.0
MiB = 1024 * 1024


@dataclass
class Served:
    gateway: Gateway
    upstream: EndlessUpstream
    ledger: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def upstream_written(self) -> int:
        return sum(self.upstream.written.values())


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    upstream = EndlessUpstream()
    await upstream.start()
    path = tmp_path / "usage.sqlite3"
    config = load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": provider_config(upstream),
            "routing": {"retry": {"max_attempts": 1}},
            "ledger.path": str(path),
            "server.stalled_stream_timeout_s": STALL_S,
        },
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield Served(gateway, upstream, path)
    finally:
        await gateway.stop(grace=1)
        await upstream.stop()


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def _earlier_garbage_collected(caplog: pytest.LogCaptureFixture) -> None:
    # What earlier tests left for the collector (asyncio logs an unclosed
    # session at ERROR when it collects one) is not these tests' to answer for.
    gc.collect()
    caplog.clear()


async def settled(served: Served, quiet_s: float = 0.5, limit_s: float = 10.0) -> int:
    """What the upstream has written once it writes no more (the gateway stopped reading)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    last = -1
    while loop.time() - started < limit_s:
        written = served.upstream_written()
        if written == last:
            return written
        last = written
        await asyncio.sleep(quiet_s)
    raise AssertionError(f"the upstream was still being read after {limit_s} s")


async def test_an_unread_grpc_stream_stops_its_upstream_then_times_out_recorded(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(served.address, options=CLIENT_OPTIONS) as channel:
        call = pb_grpc.GenerationServiceStub(channel).StreamGenerate(ask(5_000_000, "unread-grpc"))
        assert (await call.read()).HasField("message_start")
        started = loop.time()
        # The gateway stops reading the upstream long before its answer ends
        # (5M tokens: ~600 MB), once the caller's window and the sockets are full.
        written = await settled(served, quiet_s=0.3, limit_s=STALL_S - 0.2)
        assert written < 64 * MiB, written
        assert served.upstream.disconnected == 0

        # Nothing read for STALL_S: the stream ends and its upstream is closed.
        await asyncio.wait_for(served.upstream.gone.wait(), STALL_S + 5)
        assert served.upstream.disconnected == 1
        assert loop.time() - started >= STALL_S

        # A caller that reads again gets what was sent, then why the stream ended.
        received = 1
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await call.read() is not grpc.aio.EOF:
                received += 1
        assert received > 10
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        info = detail(rich_status(ended.value), error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert info.reason == "STALLED_READER"
        assert "stalled_stream_timeout_s" in ended.value.details()
    await served.gateway.stop(grace=1)
    assert ledger_rows(served.ledger)["unread-grpc"] == ("DEADLINE_EXCEEDED", "STALLED_READER")
    assert errors(caplog) == []


async def test_a_slow_grpc_reader_is_never_cut_and_gets_merged_messages(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.address, options=CLIENT_OPTIONS) as channel:
        # 40,000 one-token deltas: the first 64 KiB window holds a few thousand.
        call = pb_grpc.GenerationServiceStub(channel).StreamGenerate(ask(40_000, "slow-grpc"))
        messages = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Pauses of a quarter of the stall limit, for over twice the limit: each
        # pause leaves a write waiting, none for the whole limit.
        while loop.time() - started < 2.5 * STALL_S:
            for _ in range(50):
                assert await call.read() is not grpc.aio.EOF
                messages += 1
            await asyncio.sleep(STALL_S / 4)
        while await call.read() is not grpc.aio.EOF:
            messages += 1
        assert await call.code() == grpc.StatusCode.OK
    # The deltas that waited while the caller was slow went out merged.
    assert messages < 40_000 / 4, messages
    await served.gateway.stop(grace=1)
    assert ledger_rows(served.ledger)["slow-grpc"] == ("OK", "")


async def test_an_unread_http_stream_stops_its_upstream_then_times_out_recorded(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    body = {
        "model": "endless",
        "max_tokens": 5_000_000,
        "stream": True,
        "messages": [{"role": "user", "content": "go on"}],
    }
    loop = asyncio.get_running_loop()
    async with (
        httpx2.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{served.http_url}/v1/messages",
            content=json.dumps(body),
            headers={"content-type": "application/json", "x-request-id": "unread-http"},
        ) as response,
    ):
        assert response.status_code == 200
        chunks = response.aiter_raw()
        assert b"message_start" in await anext(chunks)
        started = loop.time()
        written = await settled(served, quiet_s=0.3, limit_s=STALL_S - 0.2)
        assert written < 64 * MiB, written
        assert served.upstream.disconnected == 0
        await asyncio.wait_for(served.upstream.gone.wait(), STALL_S + 5)
        assert served.upstream.disconnected == 1
        assert loop.time() - started >= STALL_S
    await served.gateway.stop(grace=1)
    assert ledger_rows(served.ledger)["unread-http"] == ("DEADLINE_EXCEEDED", "STALLED_READER")
    # The answer left unfinished is expected: uvicorn's word on it is no ERROR.
    assert errors(caplog) == []


async def test_unread_grpc_streams_cost_the_gateway_at_most_256_kib_each() -> None:
    # A gateway process of its own, so its resident memory is only its own.
    result = await probe(100)
    print("\n".join(result.lines()))
    # Each stream stopped its upstream (no stream read its whole answer).
    assert max(result.upstream_bytes) < 64 * MiB
    assert result.per_stream <= 256 * 1024, result.lines()


async def test_unread_idempotent_streams_keep_their_answers_within_one_budget() -> None:
    # With a request id, a stream's answer so far is kept for its repeats
    # (server/cache/idempotency.py): all of them together within
    # idempotency.max_pending_bytes, however many streams read nothing.
    streams = 100
    result = await probe(streams, request_ids=True)
    print("\n".join(result.lines()))
    budget = IdempotencyConfig().max_pending_bytes
    # Half again for what keeping events costs beyond their estimate (the
    # allocator's pages); unbounded, each stream kept ~1.3 MiB more.
    assert result.per_stream <= 256 * 1024 + 1.5 * budget / streams, result.lines()
