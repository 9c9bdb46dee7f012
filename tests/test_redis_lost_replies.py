"""A Redis command whose reply is lost is run again, and counts once.

The shared Redis client (server/redis_connection.py) retries a command once
on a new connection when its connection fails. When the connection fails
after Redis ran the command and before its reply arrived, the retry runs it
a second time: a settle must not charge the call twice, a reservation must
not hold its amount twice, a per-minute take must not count twice nor its
give-back return twice (server/accounting/redis_backend.py keeps a mark per
holder for each), and a call must not wait on the cache lock it took
(server/cache/backends.py). A real redis-server, behind a proxy that drops
the connection instead of passing on the next reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.accounting.backend import BudgetCounter
from server.accounting.redis_backend import RedisBackend
from server.cache.backends import RedisCacheBackend
from server.config import RedisConfig
from tests.redis_fixtures import ReplyDropper, redis_server

LIMIT = 10_000_000


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


async def test_a_per_minute_take_whose_reply_is_lost_counts_once(tmp_path: Path) -> None:
    """Counted twice, the retry would find the window full and refuse the call
    that the first run admitted (and the key would wait a minute for nothing)."""
    async with backend_behind_dropper(tmp_path) as (backend, dropper):
        assert (await backend.take("tpm:{k}", 10, 1, holder="warm"))[0] == 0.0

        dropper.armed = True
        wait, slot = await backend.take("tpm:{k}", 10, 6, holder="call-1")
        assert dropper.dropped == 1
        assert (wait, slot is not None) == (0.0, True)
        assert (await backend.take("tpm:{k}", 10, 3, holder="call-2"))[0] == 0.0
        assert (await backend.take("tpm:{k}", 10, 1, holder="call-3"))[0] > 0  # 1 + 6 + 3: full


async def test_a_per_minute_give_back_whose_reply_is_lost_returns_once(tmp_path: Path) -> None:
    async with backend_behind_dropper(tmp_path) as (backend, dropper):
        wait, slot = await backend.take("tpm:{k}", 10, 8, holder="call-1")
        assert wait == 0.0
        # Scripts loaded before the reply that is lost: 8 + 2 - 1 counted.
        warm_wait, warm_slot = await backend.take("tpm:{k}", 10, 2, holder="warm")
        assert warm_wait == 0.0
        await backend.give_back("tpm:{k}", 10, 1, warm_slot, holder="warm")

        dropper.armed = True
        await backend.give_back("tpm:{k}", 10, 5, slot, holder="call-1")
        assert dropper.dropped == 1
        # 9 - 5 = 4 counted: 6 more fit, 7 do not (returned twice, 7 would).
        assert (await backend.take("tpm:{k}", 10, 7, holder="call-2"))[0] > 0
        assert (await backend.take("tpm:{k}", 10, 6, holder="call-3"))[0] == 0.0


async def test_per_minute_marks_expire_and_calls_without_a_holder_count_each_time(
    tmp_path: Path,
) -> None:
    async with redis_server(tmp_path) as redis:
        backend = RedisBackend(RedisConfig(url=redis.url, timeout_s=0.25))
        try:
            assert (await backend.take("rpm:{k}", 10, 4, holder="call-1"))[0] == 0.0
            # The same holder again within the mark's life: the same take, counted once.
            assert (await backend.take("rpm:{k}", 10, 4, holder="call-1"))[0] == 0.0
            assert (await backend.take("rpm:{k}", 10, 4))[0] == 0.0
            assert (await backend.take("rpm:{k}", 10, 4))[0] > 0  # 4 + 4 + 4 > 10
            client = backend._redis
            marks = await client.keys("llmgw:rpm:{k}:taken:*")
            assert marks == [b"llmgw:rpm:{k}:taken:call-1"]
            ttl = await client.ttl(marks[0])
            assert 0 < ttl <= backend.window_mark_s
        finally:
            await backend.aclose()


async def test_a_cache_lock_whose_reply_is_lost_is_still_held_by_its_call(tmp_path: Path) -> None:
    """Without it, the call that took the lock waits on itself until the lock expires
    (cache.lock_timeout_s, 30 s), and so does every call for the same answer."""
    async with redis_server(tmp_path) as redis:
        dropper = ReplyDropper(redis.port)
        await dropper.start()
        cache = RedisCacheBackend(RedisConfig(url=dropper.url, timeout_s=5.0))
        try:
            token = await cache.acquire("warm", 30)  # script loaded, connection made
            assert token is not None
            await cache.release("warm", token)

            dropper.armed = True
            token = await cache.acquire("answer", 30)
            assert dropper.dropped == 1
            assert token is not None  # the retry found the lock this call holds
            assert await cache.acquire("answer", 30) is None  # another call waits
            await cache.release("answer", token)
            assert await cache.acquire("answer", 30) is not None
        finally:
            await cache.aclose()
            await dropper.stop()
