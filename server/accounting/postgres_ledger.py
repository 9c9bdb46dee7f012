"""The usage ledger in PostgreSQL: the scale-out option (`ledger.backend: postgres`).

The same rows, queries and batching as `SqliteLedger`, in a database that
replicas share. `record` appends the row to a bounded in-memory buffer (no
I/O on the request path); one asyncio task owns a psycopg async connection
and writes the buffer in batches, `flush_interval_s` after a batch's first
row or as soon as `max_batch` rows wait. `aclose` (graceful shutdown) writes
everything left. With `ledger.durability: sync`, `durable(record)` is a flush:
the rows of the calls ending while a batch is written go in the next one.

When PostgreSQL is unreachable the writer logs a warning (where it writes,
never the DSN's password), keeps buffering up to `max_buffered` rows (newer
rows beyond are dropped and counted) and retries with backoff. Every database
round trip is bounded by `timeout_s`, so `flush`, the queries and `aclose`
return even then: queries raise `UnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence

import psycopg

from server.accounting.ledger import (
    COLUMNS,
    Grouping,
    OutageLog,
    Row,
    UsageTotals,
    next_backoff,
    row_of,
)
from server.calls import CallRecord
from server.errors import UnavailableError
from server.postgres_dsn import Dsn

log = logging.getLogger(__name__)

# Replicas starting together would race on CREATE ... IF NOT EXISTS: one lock
# (an arbitrary constant) serialises them.
_SCHEMA_LOCK = 0x6C6C6D67_7700
_SCHEMA = (
    f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})",
    """
    CREATE TABLE IF NOT EXISTS usage (
        id BIGSERIAL PRIMARY KEY,
        "time" DOUBLE PRECISION NOT NULL,  -- when the call started, Unix seconds
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
        status TEXT NOT NULL,            -- the gRPC status code name
        error_reason TEXT NOT NULL
    )
    """,
    # Ledgers created before call_id existed gain it; the unique index makes a
    # retried batch idempotent (ON CONFLICT below).
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS call_id TEXT",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS usage_estimated SMALLINT NOT NULL DEFAULT 0",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS edge TEXT NOT NULL DEFAULT 'grpc'",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS end_user TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS cache TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS cache_saved_nanos BIGINT NOT NULL DEFAULT 0",
    "CREATE UNIQUE INDEX IF NOT EXISTS usage_by_call ON usage (call_id)",
    'CREATE INDEX IF NOT EXISTS usage_by_time ON usage ("time")',
    'CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_id, "time")',
)

_QUOTED = ", ".join(f'"{c}"' for c in COLUMNS)
_INSERT = (
    f"INSERT INTO usage ({_QUOTED}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    " ON CONFLICT (call_id) DO NOTHING"
)
_GROUP_COLUMNS = {"key": "key_id", "model": "model_served", "provider": "provider"}
_LOG_EVERY_S = 30.0


class PostgresLedger:
    """The shared ledger: rows batched by one asyncio task into PostgreSQL."""

    def __init__(
        self,
        dsn: str,
        *,
        flush_interval_s: float = 1.0,
        max_batch: int = 500,
        max_buffered: int = 100_000,
        timeout_s: float = 5.0,
    ) -> None:
        self._dsn = Dsn(dsn)
        self.where = self._dsn.where
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._max_buffered = max_buffered
        self._timeout = timeout_s
        self._buffer: deque[Row] = deque()
        self._first_at = 0.0  # when the oldest buffered row arrived (monotonic)
        self._accepted = 0  # rows ever buffered
        self._flush_target = 0  # flush/aclose want rows up to this count written now
        self._failures = 0  # failed write attempts, ever
        self._failing = False  # the last attempt to connect or write failed
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._schema_ready = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._outage = OutageLog(log, every_s=_LOG_EVERY_S)
        self.rows_written = 0
        self.rows_dropped = 0

    @property
    def failures(self) -> int:
        """Failed write attempts so far."""
        return self._failures

    # -- connections ---------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await psycopg.AsyncConnection.connect(
            self._dsn.text, autocommit=True, connect_timeout=max(1, round(self._timeout))
        )
        if not self._schema_ready:
            try:
                async with conn.transaction():
                    for statement in _SCHEMA:
                        await conn.execute(statement)
            except BaseException:
                await _discard(conn)
                raise
            self._schema_ready = True
        return conn

    async def start(self) -> None:
        """Creates the table if needed and starts the writer; an unreachable
        database is logged and retried, not fatal."""
        try:
            async with asyncio.timeout(self._timeout):
                self._conn = await self._connect()
        except (psycopg.Error, OSError, TimeoutError) as err:
            self._failing = True
            self._note_failure(err)
        self._task = asyncio.create_task(self._run(), name="usage-ledger-postgres")

    # -- writing -------------------------------------------------------------

    def record(self, record: CallRecord) -> None:
        """CallRecord observer: buffers the row (never blocks)."""
        if self._closed:
            return
        if len(self._buffer) >= self._max_buffered:
            self.rows_dropped += 1
            self._outage.dropped(self.rows_dropped, len(self._buffer), self.where)
            return
        if not self._buffer:
            self._first_at = time.monotonic()
        self._buffer.append(row_of(record))
        self._accepted += 1
        if len(self._buffer) >= self._max_batch:
            self._wake.set()

    async def durable(self, record: CallRecord) -> None:
        """Returns once `record`'s row is committed (see UsageLedger.durable)."""
        if not self._failing:
            await self.flush()

    @property
    def _written_or_gone(self) -> int:
        return self._accepted - len(self._buffer)

    def _due(self) -> bool:
        if not self._buffer:
            return False
        return (
            self._stopping
            or self._written_or_gone < self._flush_target
            or len(self._buffer) >= self._max_batch
            or time.monotonic() >= self._first_at + self._interval
        )

    async def _run(self) -> None:
        backoff = 0.0
        try:
            while True:
                self._wake.clear()
                if self._due():
                    if await self._write_batch():
                        backoff = 0.0
                    else:
                        backoff = next_backoff(backoff)
                        await self._pause(backoff)
                    continue
                if self._stopping:
                    return
                wait = self._first_at + self._interval - time.monotonic() if self._buffer else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            if self._conn is not None:
                await _discard(self._conn)
                self._conn = None

    async def _pause(self, seconds: float) -> None:
        """Sleeps before a retry; a new flush cuts it short, the shutdown shortens it."""
        end = time.monotonic() + (min(seconds, 1.0) if self._stopping else seconds)
        while (left := end - time.monotonic()) > 0:
            if self._written_or_gone < self._flush_target:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def _write_batch(self) -> bool:
        """Writes the oldest rows (up to max_batch); False when PostgreSQL failed."""
        batch = list(itertools.islice(self._buffer, self._max_batch))
        try:
            async with asyncio.timeout(self._timeout):
                if self._conn is None:
                    self._conn = await self._connect()
                async with self._conn.transaction(), self._conn.cursor() as cur:
                    await cur.executemany(_INSERT, batch)
        except (psycopg.Error, OSError, TimeoutError) as err:
            self._failures += 1
            self._failing = True
            # The waiting flushes return on this failure; later ones ask again.
            self._flush_target = self._written_or_gone
            if self._conn is not None:
                await _discard(self._conn)
                self._conn = None
            self._note_failure(err)
            self._signal_progress()
            return False
        # Only this task takes rows off the left, so these are the rows written.
        for _ in batch:
            self._buffer.popleft()
        if self._buffer:
            self._first_at = time.monotonic() - self._interval  # still due: keep draining
        self.rows_written += len(batch)
        self._failing = False
        self._outage.recovered(
            "usage ledger: PostgreSQL at %s reachable again after %.0fs", self.where
        )
        self._signal_progress()
        return True

    def _note_failure(self, err: BaseException) -> None:
        self._outage.failed(
            logging.WARNING,
            "usage ledger: PostgreSQL at %s is unreachable (%s); %d rows buffered, retrying",
            self.where,
            self._dsn.scrubbed(err),
            len(self._buffer),
        )

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def flush(self) -> None:
        """Waits until every row buffered so far is written, or one write attempt
        fails (PostgreSQL unreachable: a flush never hangs)."""
        if self._task is None or self._task.done():
            return
        target = self._accepted
        failures = self._failures
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        while (
            self._written_or_gone < target and self._failures == failures and not self._task.done()
        ):
            waiter = asyncio.ensure_future(self._progress.wait())
            try:
                await asyncio.wait({waiter, self._task}, timeout=1.0)
            finally:
                waiter.cancel()

    async def aclose(self) -> None:
        """Writes what is buffered and stops the writer (graceful shutdown); gives
        up, logging the rows lost, after a few attempts when PostgreSQL is down."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._timeout * 3)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._buffer:
            log.error(
                "usage ledger: %d rows could not be written to PostgreSQL at %s before shutdown",
                len(self._buffer),
                self.where,
            )

    # -- queries -------------------------------------------------------------

    async def _query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connect()
                try:
                    cursor = await conn.execute(sql, params)
                    return await cursor.fetchall()
                finally:
                    await _discard(conn)
        except (psycopg.Error, OSError, TimeoutError) as err:
            raise UnavailableError(
                f"the usage ledger (PostgreSQL at {self.where}) cannot answer:"
                f" {self._dsn.scrubbed(err)}"
            ) from None

    async def totals(
        self, since: float, until: float, group_by: Grouping, key_id: str = ""
    ) -> list[UsageTotals]:
        """Sums per group of the calls started in [since, until)."""
        group = _GROUP_COLUMNS.get(group_by)
        selected = group or "''"
        sql = (
            f"SELECT {selected}, COUNT(*), COUNT(*) FILTER (WHERE status <> 'OK'),"
            " SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens),"
            ' SUM(cache_write_tokens), SUM(cost_nanos) FROM usage WHERE "time" >= %s'
            ' AND "time" < %s'
        )
        params: list[object] = [since, until]
        if key_id:
            sql += " AND key_id = %s"
            params.append(key_id)
        if group:  # PostgreSQL refuses GROUP BY a constant: one row, or none
            sql += f" GROUP BY {group} ORDER BY {group}"
        rows = await self._query(sql, params)
        return [
            UsageTotals(str(r[0]), *(int(v or 0) for v in r[1:]))  # type: ignore[call-overload]
            for r in rows
            if r[1]
        ]

    async def spent_by_key(self, since: float) -> dict[str, int]:
        """Cost per key of the calls started since `since` (seeds budgets at start)."""
        sql = 'SELECT key_id, SUM(cost_nanos) FROM usage WHERE "time" >= %s GROUP BY key_id'
        rows = await self._query(sql, (since,))
        return {str(r[0]): int(r[1] or 0) for r in rows}  # type: ignore[call-overload]

    async def rows(self) -> list[dict[str, object]]:
        """Every row, oldest first (for tests and small exports)."""
        rows = await self._query(f"SELECT {_QUOTED} FROM usage ORDER BY id")
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


async def _discard(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Closes a connection without waiting long on a broken one."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 1.0)
