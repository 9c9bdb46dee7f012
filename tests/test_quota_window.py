"""Per-minute limits hold over every span of a minute, in one process and across replicas.

The backends are driven directly: LocalBackend with a clock the test moves,
so minutes of traffic replay at once, and RedisBackend (a real redis-server,
tests/redis_fixtures.py) with a 3 s window and limits scaled to it, since
Redis takes its time from its own clock.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.accounting.backend import NEVER, LocalBackend, QuotaBackend
from server.accounting.redis_backend import RedisBackend
from server.config import RedisConfig
from tests.redis_fixtures import redis_server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def most_in_any_window(times: Sequence[float], amounts: Sequence[float], window_s: float) -> float:
    """The largest sum of `amounts` over any span [t, t + window_s) (times sorted)."""
    prefix = [0.0]
    for amount in amounts:
        prefix.append(prefix[-1] + amount)
    return max(
        (prefix[bisect.bisect_left(times, t + window_s)] - prefix[i] for i, t in enumerate(times)),
        default=0.0,
    )


async def test_600_calls_in_a_minute_against_300_rpm_in_one_process() -> None:
    clock = FakeClock()
    backend = LocalBackend(clock=clock)
    admitted: list[float] = []
    for i in range(1800):  # ten calls a second for three minutes
        clock.now = 1000.0 + i / 10
        if await backend.take("rpm:{k}", 300, 1) == 0.0:
            admitted.append(clock.now)
    # The first minute: its 300 at once, then nothing (a leaky bucket let 600 through).
    assert len([t for t in admitted if t < 1060.0]) == 300
    assert most_in_any_window(admitted, [1] * len(admitted), 60.0) == 300
    # The limit is used, not only refused: each minute's usage frees up a minute later.
    assert len(admitted) == 900


async def test_corrected_reservations_never_let_a_minute_hold_more_than_the_limit() -> None:
    """TPM: calls reserve, then give back what they did not use; what they
    used, counted when they started, stays within the limit over every
    minute. (Giving back the newest usage instead of the oldest fails this.)"""
    rng = random.Random(14)
    clock = FakeClock()
    backend = LocalBackend(clock=clock)
    capacity = 1000
    ends: list[tuple[float, int, int]] = []  # (time, call, reserved - used)
    used: list[tuple[float, int]] = []  # (start, tokens) of admitted calls
    t = 1000.0
    for call in range(3000):
        t += rng.expovariate(10)  # ten calls a second for five minutes
        while ends and ends[0][0] <= t:
            clock.now, _, give_back = heapq.heappop(ends)
            await backend.give_back("tpm:{k}", capacity, give_back)
        clock.now = t
        reserved = rng.randint(20, 200)
        if await backend.take("tpm:{k}", capacity, reserved) == 0.0:
            # Most calls are short and use what they reserved; some run long
            # and use little of it.
            if rng.random() < 0.7:
                tokens, lasts = reserved, rng.uniform(0, 2)
            else:
                tokens, lasts = rng.randint(0, reserved // 4), rng.uniform(20, 55)
            used.append((t, tokens))
            heapq.heappush(ends, (t + lasts, call, reserved - tokens))
    times = [start for start, _ in used]
    assert most_in_any_window(times, [tokens for _, tokens in used], 60.0) <= capacity
    # And the limit is used: five minutes hold at most 5,000.
    assert sum(tokens for _, tokens in used) > 3.5 * capacity


@dataclass
class Window:
    """A backend under test, its window, and how to let time pass for it."""

    backend: QuotaBackend
    window_s: float
    wait: Callable[[float], Awaitable[None]]


@asynccontextmanager
async def window_backend(kind: str, tmp_path: Path) -> AsyncIterator[Window]:
    if kind == "local":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield Window(LocalBackend(clock=clock), 60.0, advance)
        return
    async with redis_server(tmp_path) as redis:
        backend = RedisBackend(
            RedisConfig(url=redis.url, timeout_s=2.0, failure_mode="closed"), window_s=3.0
        )
        try:
            yield Window(backend, 3.0, asyncio.sleep)
        finally:
            await backend.aclose()


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_give_back_returns_usage(tmp_path: Path, kind: str) -> None:
    async with window_backend(kind, tmp_path) as w:
        slot = w.window_s / 60
        assert await w.backend.take("tpm:{k}", 100, 98) == 0.0
        wait = await w.backend.take("tpm:{k}", 100, 10)
        assert w.window_s - slot < wait <= w.window_s + slot
        # The call used 13 of its 98: 87 fit again, and not one more.
        await w.backend.give_back("tpm:{k}", 100, 85)
        assert await w.backend.take("tpm:{k}", 100, 87) == 0.0
        assert await w.backend.take("tpm:{k}", 100, 1) > w.window_s - 3 * slot
        # More than the limit can never fit: no point in retrying.
        assert await w.backend.take("tpm:{k}", 100, 101) == NEVER


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_give_back_below_zero_takes_past_the_limit(tmp_path: Path, kind: str) -> None:
    async with window_backend(kind, tmp_path) as w:
        slot = w.window_s / 60
        assert await w.backend.take("tpm:{k}", 100, 10) == 0.0
        await w.wait(w.window_s / 2)
        # The call used 200 more than it reserved: owed, even past the limit,
        # and counted for a whole window from now.
        await w.backend.give_back("tpm:{k}", 100, -200)
        wait = await w.backend.take("tpm:{k}", 100, 1)
        assert w.window_s - slot < wait <= w.window_s + slot
        await w.wait(w.window_s / 2 + 2 * slot)  # the first 10 have left: 200 remain
        assert await w.backend.take("tpm:{k}", 100, 1) > 0
        await w.wait(w.window_s / 2)
        assert await w.backend.take("tpm:{k}", 100, 100) == 0.0


async def test_600_calls_against_300_a_window_on_three_replicas_sharing_redis(
    tmp_path: Path,
) -> None:
    """300 RPM scaled to a 3 s window: 1,200 calls over two windows, spread
    over three backends sharing one Redis, each admitted call timed by when
    it was sent and answered (Redis admitted it in between)."""
    window_s, capacity, calls = 3.0, 300, 1200
    async with redis_server(tmp_path) as redis:
        config = RedisConfig(url=redis.url, timeout_s=2.0, failure_mode="closed")
        backends = [RedisBackend(config, window_s=window_s) for _ in range(3)]
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def one(i: int) -> tuple[float, float, float]:
            await asyncio.sleep(max(0.0, start + i * 2 * window_s / calls - loop.time()))
            sent = time.monotonic()
            wait = await backends[i % 3].take("rpm:{shared}", capacity, 1)
            return sent, time.monotonic(), wait

        try:
            results = await asyncio.gather(*(one(i) for i in range(calls)))
        finally:
            for backend in backends:
                await backend.aclose()
    admitted = sorted((sent, answered) for sent, answered, wait in results if wait == 0.0)
    # Surely inside [a, a + window): sent at or after a, answered before its end.
    surely_inside = max(
        sum(1 for s, answered in admitted if s >= a and answered < a + window_s)
        for a, _ in admitted
    )
    assert surely_inside <= capacity
    # And the limit is used: a window's worth at the start, another once it has left.
    assert 2 * capacity - 30 <= len(admitted) <= 2 * capacity
    refused = [wait for _, _, wait in results if wait]
    assert refused and all(0 < wait <= window_s + window_s / 60 for wait in refused)
    assert not any(math.isinf(wait) for wait in refused)
