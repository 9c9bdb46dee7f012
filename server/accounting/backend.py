"""Where quota counters live: this process, or a Redis shared by replicas.

Three kinds of counter, all keyed by strings the policy builds:
- a leaky bucket (`take`/`give_back`): requests or tokens per minute;
- a set of holders with expiry (`enter`/`leave`): concurrent calls;
- a budget (`reserve`/`settle`): spent plus reserved nano-dollars, where a
  reservation checks every named budget and reserves on all of them in one
  atomic step, so N concurrent calls cannot each pass the same check.

`LocalBackend` keeps them in memory: the event loop runs one coroutine at
a time and no method awaits between its check and its update, so each is
atomic. The rate buckets are aiolimiter's leaky bucket, refusing rather
than queueing. server/accounting/redis_backend.py does the same in Lua.
What runs after a call (`leave`, `settle`, `give_back`) is started from a
`finally` of a possibly cancelled task or from a CallRecord observer, where
awaiting is not possible: callers hand it to `Background`, which keeps the
tasks and lets shutdown wait for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

log = logging.getLogger(__name__)

NEVER = math.inf


class Background:
    """Post-call quota updates, run as tasks that shutdown waits for."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def run(self, what: str, work: Coroutine[Any, Any, Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("quota update failed: %s", what)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


@dataclass(frozen=True, slots=True)
class BudgetCounter:
    """One budget to check: its counter key and its limit in nano-dollars."""

    key: str
    limit_nanos: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """The outcome of `reserve`: refused names the first budget that did not fit."""

    ok: bool
    refused: BudgetCounter | None = None
    spent_nanos: int = 0  # of the refused budget
    reserved_nanos: int = 0


class QuotaBackend(Protocol):
    """The counters behind rate limits and budgets."""

    async def take(self, key: str, capacity: float, amount: float) -> float:
        """Takes `amount` from a bucket refilling `capacity` per minute.

        Returns 0.0 when taken, else the seconds until it would fit (nothing taken).
        """
        ...

    async def give_back(self, key: str, capacity: float, amount: float) -> None:
        """Returns (amount > 0) or forcibly takes (amount < 0) bucket capacity."""
        ...

    async def enter(self, key: str, cap: int, holder: str, ttl_s: float) -> bool:
        """Adds `holder` to a set of at most `cap` (members expire after ttl_s)."""
        ...

    async def leave(self, key: str, holder: str) -> None: ...

    async def reserve(
        self, budgets: Sequence[BudgetCounter], amount: int, holder: str, ttl_s: float
    ) -> Reservation:
        """Reserves `amount` on every budget, or on none if one would be exceeded."""
        ...

    async def settle(self, keys: Sequence[str], holder: str, actual: int) -> list[int]:
        """Drops `holder`'s reservation on each budget, adds `actual`; returns the spends."""
        ...

    async def budget_state(self, key: str) -> tuple[int, int]:
        """(spent, reserved) nano-dollars of a budget."""
        ...

    async def first_time(self, key: str, ttl_s: float) -> bool:
        """True for the first caller with `key` within ttl_s (alerts fire once)."""
        ...

    def seed(self, key: str, spent: int) -> None:
        """Sets a budget's spend if the backend has none (from the ledger at start)."""
        ...

    async def aclose(self) -> None: ...


class _Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket, asked without waiting, and able to give back."""

    __slots__ = ()

    def try_take(self, amount: float) -> float:
        if self.has_capacity(amount):  # leaks first
            self._level += amount
            return 0.0
        if amount > self.max_rate:
            return NEVER
        return (self._level + amount - self.max_rate) / self._rate_per_sec

    def give_back(self, amount: float) -> None:
        self._leak()
        self._level = max(0.0, self._level - amount)


@dataclass(slots=True)
class _Budget:
    spent: int = 0
    # holder -> (amount, expires at, monotonic)
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)

    def reserved(self, now: float) -> int:
        expired = [h for h, (_, until) in self.holds.items() if until <= now]
        for holder in expired:
            del self.holds[holder]
        return sum(amount for amount, _ in self.holds.values())


class LocalBackend:
    """Counters in this process's memory (one gateway process, or per-process limits)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._seen: dict[str, float] = {}

    def _bucket(self, key: str, capacity: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.max_rate != capacity:
            bucket = self._buckets[key] = _Bucket(capacity, 60.0)
        return bucket

    async def take(self, key: str, capacity: float, amount: float) -> float:
        return self._bucket(key, capacity).try_take(amount)

    async def give_back(self, key: str, capacity: float, amount: float) -> None:
        bucket = self._bucket(key, capacity)
        if amount >= 0:
            bucket.give_back(amount)
        else:
            bucket._leak()
            bucket._level += -amount  # used more than reserved: owed, even past the cap

    async def enter(self, key: str, cap: int, holder: str, ttl_s: float) -> bool:
        holders = self._slots.setdefault(key, {})
        if len(holders) >= cap:
            now = time.monotonic()
            for stale in [h for h, until in holders.items() if until <= now]:
                del holders[stale]
            if len(holders) >= cap:
                return False
        holders[holder] = time.monotonic() + ttl_s
        return True

    async def leave(self, key: str, holder: str) -> None:
        holders = self._slots.get(key)
        if holders is not None:
            holders.pop(holder, None)

    async def reserve(
        self, budgets: Sequence[BudgetCounter], amount: int, holder: str, ttl_s: float
    ) -> Reservation:
        now = time.monotonic()
        for budget in budgets:
            state = self._budgets.setdefault(budget.key, _Budget())
            reserved = state.reserved(now)
            if state.spent + reserved + amount > budget.limit_nanos:
                return Reservation(False, budget, state.spent, reserved)
        for budget in budgets:
            self._budgets[budget.key].holds[holder] = (amount, now + ttl_s)
        return Reservation(True)

    async def settle(self, keys: Sequence[str], holder: str, actual: int) -> list[int]:
        spends = []
        for key in keys:
            state = self._budgets.setdefault(key, _Budget())
            state.holds.pop(holder, None)
            state.spent += actual
            spends.append(state.spent)
        return spends

    async def budget_state(self, key: str) -> tuple[int, int]:
        state = self._budgets.get(key)
        return (0, 0) if state is None else (state.spent, state.reserved(time.monotonic()))

    async def first_time(self, key: str, ttl_s: float) -> bool:
        now = time.monotonic()
        if self._seen.get(key, 0.0) > now:
            return False
        self._seen[key] = now + ttl_s
        return True

    def seed(self, key: str, spent: int) -> None:
        state = self._budgets.setdefault(key, _Budget())
        state.spent = max(state.spent, spent)

    async def aclose(self) -> None:
        return None
