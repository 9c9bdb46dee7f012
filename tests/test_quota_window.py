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
        wait, _ = await backend.take("rpm:{k}", 300, 1)
        if wait == 0.0:
            admitted.append(clock.now)
    # The first minute: its 300 at once, then nothing (a leaky bucket let 600 through).
    assert len([t for t in admitted if t < 1060.0]) == 300
    assert most_in_any_window(admitted, [1] * len(admitted), 60.0) == 300
    # The limit is used, not only refused: each minute's usage frees up a minute later.
    assert len(admitted) == 900


# A call's shape: (tokens reserved, tokens used, seconds it lasts).
CallShape = Callable[[random.Random], tuple[int, int, float]]


async def replay_reservations(shape: CallShape, capacity: int) -> list[tuple[float, int]]:
    """Ten calls a second for five minutes against `capacity` tokens per minute
    (LocalBackend, a fake clock): each reserves, and gives back what it did not
    use when it ends. Returns (start, tokens used) of the calls admitted."""
    rng = random.Random(14)
    clock = FakeClock()
    backend = LocalBackend(clock=clock)
    ends: list[tuple[float, int, int, int | None]] = []  # (time, call, reserved - used, slot)
    used: list[tuple[float, int]] = []
    t = 1000.0
    for call in range(3000):
        t += rng.expovariate(10)
        while ends and ends[0][0] <= t:
            clock.now, _, give_back, slot = heapq.heappop(ends)
            await backend.give_back("tpm:{k}", capacity, give_back, slot)
        clock.now = t
        reserved, tokens, lasts = shape(rng)
        wait, slot = await backend.take("tpm:{k}", capacity, reserved)
        if wait == 0.0:
            used.append((t, tokens))
            heapq.heappush(ends, (t + lasts, call, reserved - tokens, slot))
    return used


def most_used_in_a_minute(used: Sequence[tuple[float, int]]) -> float:
    return most_in_any_window([t for t, _ in used], [tokens for _, tokens in used], 60.0)


async def test_corrected_reservations_never_let_a_minute_hold_more_than_the_limit() -> None:
    """TPM: calls reserve, then give back what they did not use; what they
    used, counted when they started, stays within the limit over every
    minute. (Giving back the newest usage instead of the oldest fails this.)"""

    def shape(rng: random.Random) -> tuple[int, int, float]:
        # Most calls are short and use what they reserved; some run long
        # and use little of it.
        reserved = rng.randint(20, 200)
        if rng.random() < 0.7:
            return reserved, reserved, rng.uniform(0, 2)
        return reserved, rng.randint(0, reserved // 4), rng.uniform(20, 55)

    used = await replay_reservations(shape, 1000)
    assert most_used_in_a_minute(used) <= 1000
    # And the limit is used: five minutes hold at most 5,000.
    assert sum(tokens for _, tokens in used) > 3500


async def test_streams_longer_than_the_window_give_back_nothing_of_later_calls() -> None:
    """A stream that outlasts the window gives back its unused reservation
    when its take has left the window: there is nothing of it left to
    return, and the calls after it keep their count. (Giving back the oldest
    usage in the window, as before, lets a minute hold half as much again.)"""

    def shape(rng: random.Random) -> tuple[int, int, float]:
        # Short calls use what they reserved; a few streams reserve much,
        # use little and run for one to five minutes.
        if rng.random() < 0.95:
            reserved = rng.randint(20, 200)
            return reserved, reserved, rng.uniform(0, 2)
        reserved = rng.randint(300, 600)
        return reserved, rng.randint(0, reserved // 10), rng.uniform(61, 300)

    used = await replay_reservations(shape, 1000)
    assert most_used_in_a_minute(used) <= 1000
    # A stream's whole reservation counts for its minute: less of the limit is used.
    assert sum(tokens for _, tokens in used) > 3000


@dataclass
class Window:
    """A backend under test, its window, and how to let time pass for it."""

    backend: QuotaBackend
    window_s: float
    wait: Callable[[float], Awaitable[None]]

    async def take(self, amount: float) -> float:
        """Takes `amount` of 100 a window; the wait answered (0.0: taken)."""
        wait, _ = await self.backend.take("tpm:{k}", 100, amount)
        return wait


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
        wait, charged = await w.backend.take("tpm:{k}", 100, 98)
        assert wait == 0.0 and charged is not None
        wait = await w.take(10)
        assert w.window_s - slot < wait <= w.window_s + slot
        # The call used 13 of its 98: 87 fit again, and not one more.
        await w.backend.give_back("tpm:{k}", 100, 85, charged)
        assert await w.take(87) == 0.0
        assert await w.take(1) > w.window_s - 3 * slot
        # More than the limit can never fit: no point in retrying.
        assert await w.backend.take("tpm:{k}", 100, 101) == (NEVER, None)


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_give_back_below_zero_takes_past_the_limit(tmp_path: Path, kind: str) -> None:
    async with window_backend(kind, tmp_path) as w:
        slot = w.window_s / 60
        wait, charged = await w.backend.take("tpm:{k}", 100, 10)
        assert wait == 0.0
        await w.wait(w.window_s / 2)
        # The call used 200 more than it reserved: owed, even past the limit,
        # and counted for a whole window from now.
        await w.backend.give_back("tpm:{k}", 100, -200, charged)
        wait = await w.take(1)
        assert w.window_s - slot < wait <= w.window_s + slot
        await w.wait(w.window_s / 2 + 2 * slot)  # the first 10 have left: 200 remain
        assert await w.take(1) > 0
        await w.wait(w.window_s / 2)
        assert await w.take(100) == 0.0


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_a_call_longer_than_the_window_gives_back_nothing_of_later_calls(
    tmp_path: Path, kind: str
) -> None:
    async with window_backend(kind, tmp_path) as w:
        slot = w.window_s / 60
        # A stream reserves 90 of 100 and runs for longer than the window.
        wait, stream = await w.backend.take("tpm:{k}", 100, 90)
        assert wait == 0.0
        await w.wait(w.window_s + 2 * slot)
        # Its take has left the window: later calls use the whole limit.
        assert await w.take(60) == 0.0
        assert await w.take(40) == 0.0
        # The stream ends having used none of its 90: there is nothing left
        # of its take to return, and the later calls' 100 still count.
        await w.backend.give_back("tpm:{k}", 100, 90, stream)
        assert w.window_s / 2 < await w.take(1) <= w.window_s + slot


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_a_give_back_returns_only_its_own_take(tmp_path: Path, kind: str) -> None:
    async with window_backend(kind, tmp_path) as w:
        slot = w.window_s / 60
        first_wait, first = await w.backend.take("tpm:{k}", 100, 30)
        await w.wait(10 * slot)
        second_wait, second = await w.backend.take("tpm:{k}", 100, 70)
        assert first_wait == second_wait == 0.0 and first != second
        # The second call used 50 of its 70: 20 fit again, and not one more.
        await w.backend.give_back("tpm:{k}", 100, 20, second)
        assert await w.take(20) == 0.0
        assert await w.take(1) > 0
        # The first call's 30 leave the window before the others: 30 fit
        # then (not 10, as when the give back lowered the first call's 30).
        await w.wait(w.window_s - 9 * slot)
        assert await w.take(30) == 0.0
        assert await w.take(1) > 0


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

        lateness: list[float] = []  # how late each call went out, on a busy machine

        async def one(i: int) -> tuple[float, float, float]:
            due = start + i * 2 * window_s / calls
            await asyncio.sleep(max(0.0, due - loop.time()))
            lateness.append(loop.time() - due)
            sent = time.monotonic()
            wait, _ = await backends[i % 3].take("rpm:{shared}", capacity, 1)
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
    # And the limit is used: a window's worth at the start, another once it has
    # left. Calls that went out late (the machine busy) bunch up where the window
    # is full: each second of delay can cost the second window a second of calls.
    rate = calls / (2 * window_s)
    lost_to_delay = math.ceil(rate * max(lateness))
    assert max(capacity, 2 * capacity - 30 - lost_to_delay) <= len(admitted) <= 2 * capacity, (
        f"{len(admitted)} admitted, calls up to {max(lateness):.2f} s late"
    )
    refused = [wait for _, _, wait in results if wait]
    assert refused and all(0 < wait <= window_s + window_s / 60 for wait in refused)
    assert not any(math.isinf(wait) for wait in refused)
