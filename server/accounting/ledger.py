"""The usage ledger: one row per generation call, written off the request path.

`SqliteLedger.record` is a CallRecord observer: it turns the closed record
into a row tuple and appends it to a buffer (no I/O on the event loop, and
no thread wake-up per call). One writer thread owns the SQLite connection
(WAL mode); it wakes every `flush_interval_s`, or as soon as `max_batch`
rows wait, and writes them in batches. A crash loses at most the unwritten
rows; `aclose` (graceful shutdown, after the server has drained) writes
everything left. Queries run in worker threads on their own connections,
which WAL lets read while the writer writes.

With `ledger.durability: sync` the edges await `durable(record)` before the
caller hears how its call ended: it wakes the writer, which commits every row
waiting (the calls that ended while it wrote the previous batch share one
commit, and one sync to disk) and resolves the waiters from its thread
through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from server.calls import CallRecord

log = logging.getLogger(__name__)

Row = tuple[object, ...]
Grouping = Literal["", "key", "model", "provider"]

COLUMNS = (
    # Unique per call: a batch retried after a write that did commit (a
    # PostgreSQL timeout) is ignored row by row, so every call counts once.
    "call_id",
    "time",
    "key_id",
    "request_id",
    "method",
    "model_requested",
    "model_served",
    "provider",
    "deployment",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nanos",
    "latency_s",
    "ttft_s",
    "status",
    "error_reason",
    # 1 when the gateway estimated the tokens (the upstream reported no usage,
    # or the call ended before it did): server/calls.py.
    "usage_estimated",
    # Which edge served the call: grpc, or http (the HTTP front door's protocol
    # is in `method`, e.g. anthropic.messages).
    "edge",
    # Who the caller says the call is for (an end user, or Claude Code's session).
    "end_user",
    # The response cache's outcome: hit, miss, bypass, refresh, or '' (the cache
    # is off for the model). A hit costs 0 (cost_nanos); its tokens are the
    # answer's, and cache_saved_nanos what it cost when it was made.
    "cache",
    "cache_saved_nanos",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    call_id TEXT,                    -- unique per call (index below)
    time REAL NOT NULL,              -- when the call started, Unix seconds
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    model_requested TEXT NOT NULL,
    model_served TEXT NOT NULL,
    provider TEXT NOT NULL,
    deployment TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    latency_s REAL,
    ttft_s REAL,
    status TEXT NOT NULL,            -- the gRPC status code name
    error_reason TEXT NOT NULL,
    usage_estimated INTEGER NOT NULL DEFAULT 0,
    edge TEXT NOT NULL DEFAULT 'grpc',
    end_user TEXT NOT NULL DEFAULT '',
    cache TEXT NOT NULL DEFAULT '',
    cache_saved_nanos INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (time);
CREATE INDEX IF NOT EXISTS usage_by_key_time ON usage (key_id, time);
"""
# Ledgers created before call_id existed gain the column (SQLite cannot add a
# UNIQUE column, hence the separate unique index).
_CALL_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS usage_by_call ON usage (call_id)"

_INSERT = (
    f"INSERT OR IGNORE INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)
_GROUP_COLUMNS = {"": "''", "key": "key_id", "model": "model_served", "provider": "provider"}


def row_of(record: CallRecord) -> Row:
    """The ledger row of a closed call."""
    usage = record.usage
    return (
        record.call_id,
        record.started_wall,
        record.key_id,
        record.request_id,
        record.method,
        record.model_requested,
        record.model_served,
        record.provider,
        record.deployment,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        record.cost.total_nanos,
        record.latency_s,
        record.time_to_first_token_s,
        record.status.name,
        record.error_reason,
        int(record.usage_estimated),
        record.edge,
        record.end_user,
        record.cache,
        record.cache_saved_nanos,
    )


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Sums over the calls of one group in a time window."""

    group: str
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_nanos: int = 0


class UsageLedger(Protocol):
    """Where rows go: `SqliteLedger` here, `PostgresLedger` in postgres_ledger.py."""

    rows_written: int
    rows_dropped: int  # beyond max_buffered while the ledger could not be written

    @property
    def failures(self) -> int:
        """Failed write attempts so far."""
        ...

    def record(self, record: CallRecord) -> None: ...

    async def durable(self, record: CallRecord) -> None:
        """Returns once `record`'s row is committed (ledger.durability: sync).

        Called right after the record closed, it waits for every row buffered
        until then. It returns at once while the ledger cannot write (its last
        attempt failed): calls do not wait out an outage, their rows stay
        buffered and are retried.
        """
        ...

    async def start(self) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...

    async def totals(
        self, since: float, until: float, group_by: Grouping, key_id: str = ""
    ) -> list[UsageTotals]: ...

    async def spent_by_key(self, since: float) -> dict[str, int]: ...


_STOP = object()


def next_backoff(backoff: float) -> float:
    """The pause before the next write attempt after a failed one: 0.25 s, doubling to 30 s."""
    return min(max(backoff * 2, 0.25), 30.0)


class OutageLog:
    """The log lines of a ledger that cannot write: the first failure, then at
    most one every `every_s` while it lasts, one line when writing works again,
    and the rows dropped once the buffer is full."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self._log = logger
        self._every = every_s
        self._since: float | None = None
        self._last = 0.0

    def failed(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        elif now - self._last < self._every:
            return
        self._last = now
        self._log.log(level, message, *args)

    def recovered(self, message: str, *args: object) -> None:
        """Logs `message` with the outage's length in seconds appended to `args`."""
        if self._since is not None:
            self._log.info(message, *args, time.monotonic() - self._since)
            self._since = None

    def dropped(self, dropped: int, buffered: int, where: object) -> None:
        """A row dropped at the buffer's limit: logged the first time, then every 10,000th."""
        if dropped == 1 or dropped % 10_000 == 0:
            self._log.error(
                "usage ledger: %d rows wait for %s, the most kept; %d rows dropped so far",
                buffered,
                where,
                dropped,
            )


class SqliteLedger:
    """The embedded ledger: SQLite in WAL mode, written in batches by one thread."""

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 1.0,
        max_batch: int = 500,
        max_buffered: int = 100_000,
        sync_to_disk: bool = False,
    ) -> None:
        self.path = path
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._max_buffered = max_buffered
        # NORMAL: a commit survives the process dying (kill -9), not the machine
        # losing power; FULL (ledger.durability: sync) syncs the WAL at each commit.
        self._synchronous = "FULL" if sync_to_disk else "NORMAL"
        self._rows: deque[Row] = deque()  # appended by the loop, drained by the writer
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()  # flushes, _STOP
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._outage = OutageLog(log, every_s=60.0)
        # Rows are committed in the order they were buffered, so row number n
        # (counted by `_accepted`) is durable once `rows_written` reaches n.
        self._accepted = 0  # rows ever buffered (the event loop's)
        self._committed = 0  # rows_written as the event loop last heard it
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # durable() calls
        self._failing = False  # the last write attempt failed (set by the writer)
        self.rows_written = 0  # the writer's
        self.rows_dropped = 0
        self.failures = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    async def start(self) -> None:
        def create() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
                if "call_id" not in columns:
                    conn.execute("ALTER TABLE usage ADD COLUMN call_id TEXT")
                if "usage_estimated" not in columns:
                    conn.execute(
                        "ALTER TABLE usage ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0"
                    )
                if "edge" not in columns:
                    conn.execute("ALTER TABLE usage ADD COLUMN edge TEXT NOT NULL DEFAULT 'grpc'")
                if "end_user" not in columns:
                    conn.execute("ALTER TABLE usage ADD COLUMN end_user TEXT NOT NULL DEFAULT ''")
                if "cache" not in columns:
                    conn.execute("ALTER TABLE usage ADD COLUMN cache TEXT NOT NULL DEFAULT ''")
                if "cache_saved_nanos" not in columns:
                    conn.execute(
                        "ALTER TABLE usage ADD COLUMN cache_saved_nanos INTEGER NOT NULL DEFAULT 0"
                    )
                conn.execute(_CALL_ID_INDEX)
            conn.close()

        await asyncio.to_thread(create)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_loop, name="usage-ledger", daemon=True)
        self._thread.start()

    def record(self, record: CallRecord) -> None:
        """CallRecord observer: buffers the row (never blocks, never wakes the writer early)."""
        if self._closed:
            return
        if len(self._rows) >= self._max_buffered:
            # The disk has been failing for a long while: keep memory bounded
            # (to max_buffered, plus at most the one batch being retried).
            self.rows_dropped += 1
            self._outage.dropped(self.rows_dropped, len(self._rows), self.path)
            return
        self._rows.append(row_of(record))
        self._accepted += 1
        if len(self._rows) >= self._max_batch:
            self._wake.set()

    async def durable(self, record: CallRecord) -> None:
        """Returns once `record`'s row is committed (see UsageLedger.durable)."""
        target = self._accepted
        if target <= self._committed or self._failing or self._closed or self._loop is None:
            return
        waiter = self._loop.create_future()
        self._waiters.append((target, waiter))
        self._wake.set()
        await waiter

    def _settle(self, committed: int) -> None:
        """On the event loop: the writer has committed `committed` rows in all."""
        self._committed = max(self._committed, committed)
        while self._waiters and self._waiters[0][0] <= self._committed:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _release_waiters(self) -> None:
        """On the event loop: a write failed, or the writer stopped; nobody waits on it."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _tell_loop(self, callback: Callable[..., None], *args: object) -> None:
        """From the writer thread: runs `callback` on the event loop (if it still runs)."""
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        backoff = 0.0
        try:
            while True:
                self._wake.wait(backoff or self._interval)
                self._wake.clear()
                conn, ok = self._write(conn)
                while True:
                    try:
                        item = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    # Rows buffered before the request was made are written first
                    # (tried once more: a flush or the shutdown is waiting on it).
                    conn, ok = self._write(conn)
                    if item is _STOP:
                        if self._rows:
                            log.error(
                                "usage ledger: %d rows could not be written to %s",
                                len(self._rows),
                                self.path,
                            )
                        return
                    if callable(item):  # a flush waiting for the rows so far
                        item()
                backoff = 0.0 if ok else next_backoff(backoff)
        finally:
            if conn is not None:
                conn.close()

    def _write(self, conn: sqlite3.Connection | None) -> tuple[sqlite3.Connection | None, bool]:
        """Writes every buffered row, `max_batch` per transaction; False when SQLite failed.

        A batch that fails goes back to the front of the buffer, in order,
        and is tried again after a backoff: a full disk or a locked file loses
        no row while it lasts (up to `max_buffered`).
        """
        while self._rows:
            batch: list[Row] = []
            try:
                while len(batch) < self._max_batch:
                    batch.append(self._rows.popleft())
            except IndexError:
                pass
            try:
                if conn is None:
                    conn = self._connect()
                with conn:
                    conn.executemany(_INSERT, batch)
            except sqlite3.Error as err:
                self._rows.extendleft(reversed(batch))
                self.failures += 1
                self._failing = True
                self._tell_loop(self._release_waiters)
                if conn is not None:
                    conn.close()
                self._outage.failed(
                    logging.ERROR,
                    "usage ledger: writing to %s failed (%s); %d rows kept, retrying",
                    self.path,
                    str(err).splitlines()[0] if str(err) else type(err).__name__,
                    len(self._rows),
                )
                return None, False
            self.rows_written += len(batch)
            self._failing = False
            self._outage.recovered("usage ledger: writing to %s again after %.0f s", self.path)
        # Also when there was nothing to write: a waiter may have come after the
        # last batch committed and before the event loop heard of it.
        self._tell_loop(self._settle, self.rows_written)
        return conn, True

    async def flush(self) -> None:
        """Waits until every row queued so far is written."""
        if self._thread is None or not self._thread.is_alive():
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def written() -> None:
            loop.call_soon_threadsafe(resolve)

        self._requests.put(written)
        self._wake.set()
        await done

    async def aclose(self) -> None:
        """Writes what is queued and stops the writer (graceful shutdown)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._requests.put(_STOP)
            self._wake.set()
            await asyncio.to_thread(self._thread.join)
        self._release_waiters()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
        try:
            yield conn
        finally:
            conn.close()

    async def _query(self, run: Callable[[sqlite3.Connection], list[Row]]) -> list[Row]:
        def query() -> list[Row]:
            with self._reading() as conn:
                return run(conn)

        return await asyncio.to_thread(query)

    async def totals(
        self, since: float, until: float, group_by: Grouping, key_id: str = ""
    ) -> list[UsageTotals]:
        """Sums per group of the calls started in [since, until)."""
        group = _GROUP_COLUMNS[group_by]
        sql = (
            f"SELECT {group}, COUNT(*), SUM(status != 'OK'), SUM(input_tokens),"
            " SUM(output_tokens), SUM(cache_read_tokens), SUM(cache_write_tokens),"
            " SUM(cost_nanos) FROM usage WHERE time >= ? AND time < ?"
        )
        params: list[object] = [since, until]
        if key_id:
            sql += " AND key_id = ?"
            params.append(key_id)
        sql += f" GROUP BY {group} ORDER BY {group}"
        rows = await self._query(lambda conn: conn.execute(sql, params).fetchall())
        return [
            UsageTotals(str(r[0]), *(int(v or 0) for v in r[1:]))  # type: ignore[call-overload]
            for r in rows
            if r[1]
        ]

    async def spent_by_key(self, since: float) -> dict[str, int]:
        """Cost per key of the calls started since `since` (seeds budgets at start)."""
        sql = "SELECT key_id, SUM(cost_nanos) FROM usage WHERE time >= ? GROUP BY key_id"
        rows = await self._query(lambda conn: conn.execute(sql, (since,)).fetchall())
        return {str(r[0]): int(r[1] or 0) for r in rows}  # type: ignore[call-overload]

    async def rows(self) -> list[dict[str, object]]:
        """Every row, oldest first (for tests and small exports)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage ORDER BY id"
        rows = await self._query(lambda conn: conn.execute(sql).fetchall())
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]
