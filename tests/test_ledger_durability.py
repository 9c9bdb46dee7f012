"""ledger.durability: sync: a call's row is committed before its caller hears it ended.

So a gateway killed with SIGKILL right after its callers got their answers
has every one of their rows, on both edges. The rows of concurrent calls
share commits, and a ledger that cannot write (SQLite or PostgreSQL) does
not hold calls.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import grpc
import httpx2
import psycopg
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.accounting import Accounting
from server.accounting.ledger import SqliteLedger
from server.accounting.postgres_ledger import PostgresLedger
from server.calls import close_record, open_record
from server.config import LedgerConfig, load_config
from tests.conftest import ServerProcess, free_port, request, start_server_process

# Nothing reaches the file by the periodic flush during a test: only the
# commits a call waits for.
SYNC_ENV = {
    "LLMGW_LEDGER__DURABILITY": "sync",
    "LLMGW_LEDGER__FLUSH_INTERVAL_S": "60",
    "LLMGW_LOGGING__CALLS": "false",
}


def rows_by_request(path: Path) -> dict[str, tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT request_id, status, edge FROM usage").fetchall()
    finally:
        conn.close()
    assert len(rows) == len({r[0] for r in rows}), "a call was recorded twice"
    return {r[0]: (r[1], r[2]) for r in rows}


async def killed(server: ServerProcess) -> None:
    server.process.kill()
    await asyncio.wait_for(server.process.wait(), 10)


async def test_sync_rows_survive_sigkill_right_after_grpc_calls_returned(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    server = await start_server_process(env={**SYNC_ENV, "LLMGW_LEDGER__PATH": str(path)})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def unary(i: int) -> None:
                await stub.Generate(request(f"hello {i}", request_id=f"u{i}"), timeout=20)

            async def stream(i: int) -> None:
                call = stub.StreamGenerate(request(f"hello {i}", request_id=f"s{i}"), timeout=20)
                assert [_ async for _ in call]
                assert await call.code() == grpc.StatusCode.OK

            await asyncio.gather(*(unary(i) for i in range(20)), *(stream(i) for i in range(20)))
            # Every caller has its OK status: kill before anything else can flush.
            await killed(server)
    finally:
        if server.process.returncode is None:
            await killed(server)
    expected = {f"u{i}" for i in range(20)} | {f"s{i}" for i in range(20)}
    assert rows_by_request(path) == {rid: ("OK", "grpc") for rid in expected}


async def test_sync_rows_survive_sigkill_right_after_http_answers_ended(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    server = await start_server_process(env={**SYNC_ENV, "LLMGW_LEDGER__PATH": str(path)})
    url = f"http://127.0.0.1:{http_port(server)}/v1/messages"
    try:
        async with httpx2.AsyncClient(timeout=20) as client:

            async def call(rid: str, stream: bool) -> None:
                body = {
                    "model": "echo",
                    "max_tokens": 20,
                    "stream": stream,
                    "messages": [{"role": "user", "content": f"hello {rid}"}],
                }
                headers = {"content-type": "application/json", "x-request-id": rid}
                response = await client.post(url, content=json.dumps(body), headers=headers)
                assert response.status_code == 200, response.text
                if stream:
                    assert response.text.rstrip().endswith('data: {"type":"message_stop"}')

            await asyncio.gather(
                *(call(f"w{i}", False) for i in range(15)),
                *(call(f"s{i}", True) for i in range(15)),
            )
            await killed(server)
    finally:
        if server.process.returncode is None:
            await killed(server)
    expected = {f"w{i}" for i in range(15)} | {f"s{i}" for i in range(15)}
    assert rows_by_request(path) == {rid: ("OK", "http") for rid in expected}


def http_port(server: ServerProcess) -> int:
    for line in server.log:
        if "serving on" in line and "http://" in line:
            return int(line.split("http://", 1)[1].split(" ", 1)[0].rsplit(":", 1)[1])
    raise AssertionError("no HTTP port in the log:\n" + "".join(server.log))


async def test_concurrent_calls_share_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = SqliteLedger(tmp_path / "usage.sqlite3", flush_interval_s=60, sync_to_disk=True)
    commits: list[str] = []
    connect = ledger._connect

    def counting() -> sqlite3.Connection:
        conn = connect()
        conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        return conn

    monkeypatch.setattr(ledger, "_connect", counting)
    await ledger.start()

    async def call(i: int) -> None:
        record = open_record("Generate", "echo")
        record.request_id = f"r{i}"
        await asyncio.sleep(0.001 * (i % 5))
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        await ledger.durable(record)
        # Durable means committed: another connection sees the row now.
        assert f"r{i}" in await asyncio.to_thread(rows_by_request, ledger.path)

    await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(100))), 20)
    await ledger.aclose()
    assert len(rows_by_request(ledger.path)) == 100
    assert 1 <= len(commits) <= 50, f"{len(commits)} commits for 100 calls"


async def test_a_ledger_that_cannot_write_does_not_hold_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = SqliteLedger(tmp_path / "usage.sqlite3", flush_interval_s=60)
    await ledger.start()

    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ledger, "_connect", broken)
    for i in range(3):
        record = open_record("Generate", "echo")
        record.request_id = f"r{i}"
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        # The first waits for the failed attempt, the next ones not at all.
        await asyncio.wait_for(ledger.durable(record), 5)
    assert ledger.failures >= 1
    monkeypatch.undo()
    await ledger.aclose()  # the rows were kept, and are written now
    assert set(rows_by_request(ledger.path)) == {"r0", "r1", "r2"}


def test_durability_is_async_unless_asked() -> None:
    assert LedgerConfig().durability == "async"
    config = load_config(environ={}, overrides={"ledger.enabled": True})
    assert Accounting(config).durable is None
    synced = load_config(environ={}, overrides={"ledger.durability": "sync"})
    assert Accounting(synced).durable is not None


async def test_postgres_durable_means_committed(postgres_dsn: str) -> None:
    ledger = PostgresLedger(postgres_dsn, flush_interval_s=60)
    await ledger.start()

    async def call(i: int) -> None:
        record = open_record("Generate", "echo")
        record.request_id = f"r{i}"
        await asyncio.sleep(0.001 * (i % 5))
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        await ledger.durable(record)
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            cursor = await conn.execute("SELECT 1 FROM usage WHERE request_id = %s", (f"r{i}",))
            assert await cursor.fetchone() is not None

    try:
        await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(40))), 30)
    finally:
        await ledger.aclose()


async def test_an_unreachable_postgres_does_not_hold_calls() -> None:
    ledger = PostgresLedger(
        f"postgresql://llmgw@127.0.0.1:{free_port()}/llmgw", flush_interval_s=60, timeout_s=1
    )
    await ledger.start()  # logs the failure, keeps retrying
    try:
        record = open_record("Generate", "echo")
        close_record(record, [ledger.record], grpc.StatusCode.OK)
        await asyncio.wait_for(ledger.durable(record), 0.5)
    finally:
        await ledger.aclose()
