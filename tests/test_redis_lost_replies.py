"""A budget command whose reply is lost is run again, and counts once.

The shared Redis client (server/redis_connection.py) retries a command once
on a new connection when its connection fails. When the connection fails
after Redis ran the command and before its reply arrived, the retry runs it
a second time: a settle must not charge the call twice, and a reservation
must not hold its amount twice (server/accounting/redis_backend.py keeps a
mark per holder for that). A real redis-server, behind a proxy that drops
the connection instead of passing on the next reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.accounting.backend import BudgetCounter
from server.accounting.redis_backend import RedisBackend
from server.config import RedisConfig
from tests.redis_fixtures import redis_server

LIMIT = 10_000_000


class ReplyDropper:
    """A TCP proxy to Redis that, when armed, closes the connection a reply comes
    back on instead of passing that reply on (the command has run)."""

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self.armed = False
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._redis_port)

        async def up() -> None:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()

        async def down() -> None:
            while data := await redis_r.read(65536):
                if self.armed:
                    self.armed = False
                    self.dropped += 1
                    return  # the reply is lost: both connections close below
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, redis_w):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


@asynccontextmanager
async def backend_behind_dropper(
    tmp_path: Path,
) -> AsyncIterator[tuple[RedisBackend, ReplyDropper]]:
    async with redis_server(tmp_path) as redis:
        dropper = ReplyDropper(redis.port)
        await dropper.start()
        backend = RedisBackend(RedisConfig(url=dropper.url, timeout_s=5.0, failure_mode="closed"))
        try:
            yield backend, dropper
        finally:
            await backend.aclose()
            await dropper.stop()


async def test_a_settle_whose_reply_is_lost_charges_once(tmp_path: Path) -> None:
    async with backend_behind_dropper(tmp_path) as (backend, dropper):
        budgets = [BudgetCounter("budget:k:day", LIMIT), BudgetCounter("budget:k:month", LIMIT)]
        keys = [b.key for b in budgets]
        # Scripts loaded, connections made, before the reply that is lost.
        assert (await backend.reserve(budgets, 500, "warm", 60)).ok
        assert await backend.settle(keys, "warm", 100) == [100, 100]

        assert (await backend.reserve(budgets, 900, "call-1", 60)).ok
        dropper.armed = True
        spends = await backend.settle(keys, "call-1", 700)
        assert dropper.dropped == 1  # the first reply was lost, and the retry answered
        assert spends == [800, 800]
        for key in keys:
            assert await backend.budget_state(key) == (800, 0)

        # The same holder settling later (a bug, or a retry long after) changes nothing.
        assert await backend.settle(keys, "call-1", 700) == [800, 800]


async def test_a_reservation_whose_reply_is_lost_holds_once(tmp_path: Path) -> None:
    async with backend_behind_dropper(tmp_path) as (backend, dropper):
        budgets = [BudgetCounter("budget:k:day", LIMIT)]
        assert (await backend.reserve(budgets, 500, "warm", 60)).ok
        assert await backend.settle([budgets[0].key], "warm", 0) == [0]

        dropper.armed = True
        assert (await backend.reserve(budgets, 4_000_000, "call-1", 60)).ok
        assert dropper.dropped == 1
        assert await backend.budget_state(budgets[0].key) == (0, 4_000_000)
        # What is left of the budget is left to others: 6,000,000 fit, not 2,000,000.
        assert (await backend.reserve(budgets, 6_000_000, "call-2", 60)).ok

        assert await backend.settle([budgets[0].key], "call-1", 1_000) == [1_000]
        assert await backend.settle([budgets[0].key], "call-2", 2_000) == [3_000]
        assert await backend.budget_state(budgets[0].key) == (3_000, 0)


async def test_a_settled_holder_leaves_nothing_reserved_once_its_mark_expires(
    tmp_path: Path,
) -> None:
    """The mark a settle leaves is dropped like an expired hold, and frees nothing."""
    async with redis_server(tmp_path) as redis:
        backend = RedisBackend(RedisConfig(url=redis.url, timeout_s=5.0))
        backend.settled_mark_s = 1
        try:
            budgets = [BudgetCounter("budget:k:day", LIMIT)]
            assert (await backend.reserve(budgets, 900, "call-1", 60)).ok
            assert (await backend.reserve(budgets, 300, "call-2", 60)).ok
            assert await backend.settle([budgets[0].key], "call-1", 100) == [100]
            await asyncio.sleep(2.1)  # the mark's second passes (Redis's TIME, whole seconds)
            assert await backend.budget_state(budgets[0].key) == (100, 300)
            client = backend._redis
            assert await client.hkeys("llmgw:budget:k:day:amounts") == [b"call-2"]
            assert await client.zrange("llmgw:budget:k:day:holds", 0, -1) == [b"call-2"]
        finally:
            await backend.aclose()
