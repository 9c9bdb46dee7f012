"""A ledger written by an older gateway: the new one adds its columns and keeps every row.

The usage table grew columns after its first release (call_id, usage_estimated,
edge, end_user, cache, cache_saved_nanos). A gateway started on a ledger
created before them must add them, with their defaults for the old rows,
and then record its own calls in full, on SQLite and on PostgreSQL (a real
server, tests/postgres_fixtures.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.conftest import request
from tests.redis_fixtures import limited_gateway

# The table as the first ledger of each backend created it.
_FIRST_COLUMNS = """
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    model_requested TEXT NOT NULL,
    model_served TEXT NOT NULL,
    provider TEXT NOT NULL,
    deployment TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_nanos BIGINT NOT NULL,
    latency_s DOUBLE PRECISION,
    ttft_s DOUBLE PRECISION,
    status TEXT NOT NULL,
    error_reason TEXT NOT NULL
"""
_SQLITE_FIRST = (
    f'CREATE TABLE usage (id INTEGER PRIMARY KEY, "time" REAL NOT NULL, {_FIRST_COLUMNS})'
)
_POSTGRES_FIRST = (
    "CREATE TABLE usage (id BIGSERIAL PRIMARY KEY,"
    f' "time" DOUBLE PRECISION NOT NULL, {_FIRST_COLUMNS})'
)
_OLD_ROW = (
    'INSERT INTO usage ("time", key_id, request_id, method, model_requested, model_served,'
    " provider, deployment, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
    " cost_nanos, latency_s, ttft_s, status, error_reason)"
    " VALUES (1.0, 'k1', 'old', 'Generate', 'echo', 'echo', 'offline', 'offline', 3, 4, 0, 0,"
    " 7000, 0.01, 0.005, 'OK', '')"
)
# What the columns added since hold for a row written before them.
_DEFAULTS = {
    "call_id": None,
    "usage_estimated": 0,
    "edge": "grpc",
    "end_user": "",
    "cache": "",
    "cache_saved_nanos": 0,
}


def _check(rows: list[dict[str, Any]]) -> None:
    by_id = {row["request_id"]: row for row in rows}
    assert set(by_id) == {"old", "new"}, rows
    old, new = by_id["old"], by_id["new"]
    assert {name: old[name] for name in _DEFAULTS} == _DEFAULTS, old
    assert (old["input_tokens"], old["output_tokens"], old["cost_nanos"]) == (3, 4, 7000)
    assert new["call_id"] and new["status"] == "OK" and new["edge"] == "grpc", new
    assert new["output_tokens"] > 0 and new["cost_nanos"] > 0, new


async def _one_call(tmp_path: Path, **overrides: Any) -> None:
    async with limited_gateway(tmp_path, **overrides) as gw:
        message = request("one two three")
        message.request_id = "new"
        await gw.stub.Generate(message)


async def test_a_sqlite_ledger_from_the_first_release_gains_the_new_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(_SQLITE_FIRST)
        conn.execute(_OLD_ROW)
    conn.close()
    await _one_call(tmp_path, **{"ledger.path": str(path)})
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(row) for row in conn.execute("SELECT * FROM usage")]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(usage)")}
    conn.close()
    _check(rows)
    assert "usage_by_call" in indexes  # a retried batch stays idempotent


async def test_a_postgres_ledger_from_the_first_release_gains_the_new_columns(
    tmp_path: Path, postgres_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(_POSTGRES_FIRST)
        await conn.execute(_OLD_ROW)
    await _one_call(tmp_path, **{"ledger.backend": "postgres", "ledger.dsn": postgres_dsn})
    async with await psycopg.AsyncConnection.connect(postgres_dsn, row_factory=dict_row) as conn:
        rows = await (await conn.execute("SELECT * FROM usage")).fetchall()
        indexes = await (
            await conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'usage'")
        ).fetchall()
    _check(rows)
    assert "usage_by_call" in {row["indexname"] for row in indexes}
