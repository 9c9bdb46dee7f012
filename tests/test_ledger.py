"""The usage ledger: one row per call, whichever way it ended, none lost on shutdown."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.accounting.ledger import SqliteLedger
from server.calls import close_record, open_record
from server.token_estimate import count_text
from tests.conftest import request
from tests.redis_fixtures import NANOS_PER_OUTPUT_TOKEN, LimitedGateway, limited_gateway


def ledger_rows(path: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM usage").fetchall()
    finally:
        conn.close()
    by_id = {row["request_id"]: dict(row) for row in rows}
    assert len(by_id) == len(rows), "a call was recorded twice"
    return by_id


async def test_one_row_per_call_on_every_exit_path(tmp_path: Path) -> None:
    async with limited_gateway(tmp_path) as gw:
        await call_every_exit_path(gw)
        path = gw.ledger_path
    check_every_exit_path(ledger_rows(path))


async def test_no_row_lost_across_a_graceful_shutdown(tmp_path: Path) -> None:
    # A flush interval far longer than the test: only the shutdown flush writes.
    async with limited_gateway(tmp_path, **{"ledger.flush_interval_s": 60}) as gw:
        await call_many_before_shutdown(gw)
        path = gw.ledger_path
    assert set(ledger_rows(path)) == {f"r{i}" for i in range(40)}


# The calls and checks below are shared with tests/test_ledger_postgres.py.


async def call_every_exit_path(gw: LimitedGateway) -> None:
    """One call per way a call can end: ok, upstream error, cancel, deadline, not found."""
    slow = {"chunk_delay_ms": 100}
    await gw.stub.Generate(request("one two three", request_id="ok"))
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        [_ async for _ in gw.stub.StreamGenerate(request("explode a b c d", request_id="up"))]
    assert broken.value.code() is grpc.StatusCode.UNAVAILABLE
    stream = gw.stub.StreamGenerate(
        request("a b c d e f g h i j", request_id="cancel", provider_options=slow)
    )
    received = 0
    async for event in stream:
        received += event.HasField("content_block_delta")
        if received == 3:
            stream.cancel()
            break
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await gw.stub.Generate(
            request("a b c d e f", request_id="late", provider_options=slow), timeout=0.35
        )
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(request(model="nope", request_id="unknown"))
    await asyncio.sleep(0.3)


def check_every_exit_path(rows: Mapping[str, Mapping[str, Any]]) -> None:
    """The rows of `call_every_exit_path`, by request id."""
    assert set(rows) == {"ok", "up", "cancel", "late", "unknown"}

    ok = rows["ok"]
    assert (ok["status"], ok["method"], ok["key_id"]) == ("OK", "Generate", "")
    assert (ok["model_requested"], ok["model_served"], ok["provider"]) == ("echo",) * 2 + (
        "offline",
    )
    assert ok["deployment"] == "offline/echo"
    assert (ok["input_tokens"], ok["output_tokens"]) == (6, 3)
    assert ok["cost_nanos"] == 3 * NANOS_PER_OUTPUT_TOKEN
    assert ok["latency_s"] >= ok["ttft_s"] > 0

    up = rows["up"]
    assert (up["status"], up["error_reason"]) == ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE")
    # The two deltas sent before the upstream broke, at the gateway's estimate
    # (the usage that would have said otherwise never came).
    sent = count_text("explode") + count_text(" a")
    assert up["output_tokens"] == sent
    assert up["cost_nanos"] == sent * NANOS_PER_OUTPUT_TOKEN

    cancelled = rows["cancel"]
    assert cancelled["status"] == "CANCELLED"
    # What reached the caller (and perhaps a delta on its way): paid for.
    assert 3 <= cancelled["output_tokens"] <= 4
    assert cancelled["cost_nanos"] == cancelled["output_tokens"] * NANOS_PER_OUTPUT_TOKEN

    late_row = rows["late"]
    assert late_row["status"] == "DEADLINE_EXCEEDED"
    assert late_row["output_tokens"] <= 3
    assert rows["unknown"]["status"] == "NOT_FOUND"


async def call_many_before_shutdown(gw: LimitedGateway) -> None:
    """40 calls none of which is written before the shutdown (flush_interval_s: 60)."""
    await asyncio.gather(
        *(gw.stub.Generate(request(f"call {i}", request_id=f"r{i}")) for i in range(40))
    )
    ledger = gw.gateway.accounting.ledger
    assert ledger is not None and getattr(ledger, "rows_written", None) == 0


async def test_a_call_written_twice_is_stored_once(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "twice.sqlite3", flush_interval_s=0.05)
    await ledger.start()
    try:
        record = open_record("Generate", "echo")
        record.request_id = "written-twice"
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        ledger.record(record)
        await ledger.flush()
        rows = await ledger.rows()
    finally:
        await ledger.aclose()
    assert [r["request_id"] for r in rows] == ["written-twice"]


async def test_a_full_batch_is_written_without_waiting_for_the_interval(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "batch.sqlite3", flush_interval_s=60, max_batch=5)
    await ledger.start()
    try:
        for i in range(12):
            record = open_record("Generate", "echo")
            record.request_id = f"r{i}"
            close_record(record, [ledger.record], grpc.StatusCode.OK)
        for _ in range(100):  # two full batches are due now, not in 60 s
            if ledger.rows_written >= 10:
                break
            await asyncio.sleep(0.05)
        assert ledger.rows_written >= 10
        await ledger.flush()  # the last two
        assert [r["request_id"] for r in await ledger.rows()] == [f"r{i}" for i in range(12)]
    finally:
        await ledger.aclose()


def _drop_table(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DROP TABLE usage")
    conn.close()


async def test_rows_survive_a_failing_database_and_are_written_when_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "failing.sqlite3"
    # Written only when flushed (a long interval, batches larger than the test), so
    # the writer never holds rows while they are recorded: exactly 5 are kept.
    ledger = SqliteLedger(path, flush_interval_s=60, max_batch=100, max_buffered=5)
    await ledger.start()
    try:
        await ledger.flush()
        _drop_table(path)  # every insert now fails: "no such table"
        for i in range(7):
            record = open_record("Generate", "echo")
            record.request_id = f"r{i}"
            close_record(record, [ledger.record], grpc.StatusCode.OK)
        # A flush on a failing database returns (no hung shutdown) with nothing written.
        await asyncio.wait_for(ledger.flush(), 5)
        assert ledger.rows_written == 0 and ledger.failures >= 1
        assert ledger.rows_dropped == 2  # beyond max_buffered
        assert "writing to" in caplog.text and "failed" in caplog.text
        await asyncio.to_thread(_recreate_schema, path)
        await asyncio.wait_for(ledger.flush(), 5)
        assert "writing to" in caplog.text and "again after" in caplog.text
        rows = await ledger.rows()
    finally:
        await ledger.aclose()
    # The kept rows, in order, none twice.
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(5)]


def _recreate_schema(path: Path) -> None:
    from server.accounting.ledger import _CALL_ID_INDEX, _SCHEMA

    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(_SCHEMA)
        conn.execute(_CALL_ID_INDEX)
    conn.close()
