"""The usage ledger in PostgreSQL: the same rows as SQLite, and no hang when it is down.

Runs against a real server (tests/postgres_fixtures.py), one fresh database per test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from psycopg.rows import dict_row

from llmgateway.v1 import usage_pb2
from server.accounting import Accounting
from server.accounting.postgres_ledger import PostgresLedger
from server.calls import close_record, open_record
from server.config import ConfigError, load_config
from server.errors import UnavailableError
from server.postgres_dsn import describe
from tests.conftest import TEST_CONFIG, request
from tests.redis_fixtures import free_port, limited_gateway
from tests.test_ledger import call_every_exit_path, call_many_before_shutdown, check_every_exit_path


def postgres(dsn: str, **overrides: Any) -> dict[str, Any]:
    return {"ledger.backend": "postgres", "ledger.dsn": dsn, **overrides}


async def ledger_rows(dsn: str) -> dict[str, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
        rows = await (await conn.execute("SELECT * FROM usage")).fetchall()
    by_id = {row["request_id"]: row for row in rows}
    assert len(by_id) == len(rows), "a call was recorded twice"
    return by_id


async def test_one_row_per_call_on_every_exit_path(tmp_path: Path, postgres_dsn: str) -> None:
    async with limited_gateway(tmp_path, **postgres(postgres_dsn)) as gw:
        assert isinstance(gw.gateway.accounting.ledger, PostgresLedger)
        await call_every_exit_path(gw)
    check_every_exit_path(await ledger_rows(postgres_dsn))


async def test_no_row_lost_across_a_graceful_shutdown(tmp_path: Path, postgres_dsn: str) -> None:
    overrides = postgres(postgres_dsn, **{"ledger.flush_interval_s": 60})
    async with limited_gateway(tmp_path, **overrides) as gw:
        await call_many_before_shutdown(gw)
    assert set(await ledger_rows(postgres_dsn)) == {f"r{i}" for i in range(40)}


async def test_usage_service_totals_and_budget_seeding(tmp_path: Path, postgres_dsn: str) -> None:
    async with limited_gateway(tmp_path, **postgres(postgres_dsn)) as gw:
        await gw.stub.Generate(request("one two three"))
        await gw.stub.Generate(request("four five"))
        by_model = await gw.usage.GetUsage(
            usage_pb2.GetUsageRequest(group_by=usage_pb2.USAGE_GROUPING_MODEL)
        )
        assert [(t.group, t.requests, t.errors) for t in by_model.totals] == [("echo", 2, 0)]
        [total] = by_model.totals
        assert total.output_tokens == 5 and total.cost_nanos == 5_000
        empty = await gw.usage.GetUsage(usage_pb2.GetUsageRequest(key_id="someone-else"))
        assert list(empty.totals) == []
    # A new gateway on the same database starts its budgets from the spend so far.
    config = load_config(environ={}, overrides={**TEST_CONFIG, **postgres(postgres_dsn)})
    accounting = Accounting(config)
    await accounting.start()
    try:
        assert accounting.ledger is not None
        assert await accounting.ledger.spent_by_key(time.time() - 3600) == {"": 5_000}
    finally:
        await accounting.aclose()


async def test_unreachable_postgres_never_hangs_and_never_logs_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = f"postgresql://llmgw:pw-Secr3t-9@127.0.0.1:{free_port()}/llmgw"
    assert describe(dsn) == f"llmgw@127.0.0.1:{dsn.rsplit(':', 1)[1].split('/')[0]}/llmgw"
    ledger = PostgresLedger(dsn, flush_interval_s=0.05, max_batch=2, max_buffered=3, timeout_s=1)
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(10):
        await ledger.start()
        for i in range(5):
            record = open_record("Generate", "echo")
            record.request_id = f"r{i}"
            close_record(record, [ledger.record], grpc.StatusCode.OK)
        assert ledger.rows_dropped == 2  # beyond max_buffered
        await ledger.flush()  # one failed attempt, then it returns
        with pytest.raises(UnavailableError, match=r"127\.0\.0\.1"):
            await ledger.totals(0, time.time(), "model")
        await ledger.aclose()
    assert "unreachable" in caplog.text
    assert "pw-Secr3t-9" not in caplog.text


def test_postgres_needs_a_dsn() -> None:
    with pytest.raises(ConfigError, match=r"ledger\.dsn is required"):
        load_config(environ={}, overrides={"ledger.backend": "postgres"})


async def test_a_call_written_twice_is_stored_once(postgres_dsn: str) -> None:
    """A batch retried after a write that did commit must not count its calls twice."""
    ledger = PostgresLedger(postgres_dsn, flush_interval_s=0.05)
    await ledger.start()
    try:
        record = open_record("Generate", "echo")
        record.request_id = "written-twice"
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        await ledger.flush()
        ledger.record(record)  # the same call again, as a retried batch would
        await ledger.flush()
        rows = await ledger.rows()
    finally:
        await ledger.aclose()
    assert [r["request_id"] for r in rows] == ["written-twice"]
