"""Where quota counters live: this process, or a Redis shared by replicas.

Three kinds of counter, all keyed by strings the policy builds:
- a sliding window (`take`/`give_back`): requests or tokens per minute;
- a set of holders with expiry (`enter`/`leave`): concurrent calls;
- a budget (`reserve`/`settle`): spent plus reserved nano-dollars, where a
  reservation checks every named budget and reserves on all of them in one
  atomic step, so N concurrent calls cannot each pass the same check.

A per-minute limit holds over every span of 60 s, not on average: a key
may use its whole minute at once (a fresh key on 300 RPM may send 300
calls in its first second), then waits until its oldest usage is a minute
old. The window is counted in 60 slots of one second each: a take is
charged to the end of its second and forgotten a minute after that, so it
counts up to a second longer than it happened, never shorter, and a key's
window holds at most 61 slots whatever its limit (see `_Window`). A take
names the slot it was charged to, and a give back returns usage to that
slot only: a call can free what it took, never what others took.

`LocalBackend` keeps them in memory: the event loop runs one coroutine at
a time and no method awaits between its check and its update, so each is
atomic. server/accounting/redis_backend.py does the same in Lua.
What runs after a call (`leave`, `settle`, `give_back`) is started from a
`finally` of a possibly cancelled task or from a CallRecord observer, where
awaiting is not possible: callers hand it to `Background`, which keeps the
tasks and lets shutdown wait for them.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

log = logging.getLogger(__name__)

NEVER = math.inf
# The span a per-minute limit holds over, and the slots it is counted in.
WINDOW_S = 60.0
SLOTS_PER_WINDOW = 60


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


@dataclass(frozen=True, slots=True)
class LedgerSpend:
    """A budget's spend in its period as the usage ledger knows it, and the
    alerts that spend has crossed: (alert key, mark in nano-dollars), which
    count as fired for `alerts_ttl_s` (the period)."""

    spent_nanos: int
    alerts: tuple[tuple[str, float], ...] = ()
    alerts_ttl_s: float = 0.0


# Asked by a backend that has lost a budget, with the budget key and its limit
# (None: not known here); None when the ledger cannot answer now.
SpendSource = Callable[[str, int | None], Awaitable[LedgerSpend | None]]


# The outcome of `take`, (wait, slot): wait is 0.0 when taken, else the
# seconds until it would fit (nothing taken), NEVER when it never will; slot
# names the window slot the amount was charged to, for `give_back` (None when
# nothing was charged: refused, or a backend down and failing open). A plain
# pair: building a NamedTuple would add a fifth to a local take.
Taken: TypeAlias = tuple[float, int | None]


def alert_key(budget_key: str, threshold: float) -> str:
    """The `first_time` key of a budget's alert at `threshold` (fires once per period)."""
    return f"alert:{budget_key}:{threshold}"


class QuotaBackend(Protocol):
    """The counters behind rate limits and budgets."""

    async def take(self, key: str, capacity: float, amount: float, holder: str = "") -> Taken:
        """Takes `amount` if the key's usage in the last minute leaves room in
        `capacity`; answers (wait, slot), see `Taken`. A `holder` (the call's
        own random id) makes a take run again (a retry) count once."""
        ...

    async def give_back(
        self, key: str, capacity: float, amount: float, slot: int | None, holder: str = ""
    ) -> None:
        """Returns (amount > 0) part of a take to the `slot` it answered, or
        takes more now (amount < 0), even past the capacity: a call used more
        than it reserved. A `holder`'s give-back run again does nothing.

        At most what the slot still counts is returned, nothing once it has
        left the window: the caller returns no more than it took there.
        """
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

    async def reconcile(self, spends: Mapping[str, int]) -> None:
        """Raises budgets' spends to the ledger's (budget key -> nano-dollars) where
        lower; never lowers one. Redis skips budgets it does not hold: those are
        rebuilt from the ledger when next used (redis_backend.py)."""
        ...

    async def aclose(self) -> None: ...


class _Window:
    """One key's usage over the last `window_s`, in slots of window_s / 60.

    A take at time t is charged to the end of its slot and forgotten once
    that moment is `window_s` old. When the last take of any span of
    window_s was admitted, every earlier take of that span was still counted
    (it is charged no earlier than it happened), so no span holds more than
    the capacity. A give back lowers only the slot its take was charged to,
    by no more than that take (the caller's part): every other take keeps
    its count, and a take that has left the window has nothing to return
    (a call longer than the window frees nothing of later calls' usage).
    """

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: deque[list[float]] = deque()  # [slot index, amount], oldest first

    def _used(self, now: float, window_s: float) -> float:
        slot_s = window_s / SLOTS_PER_WINDOW
        slots = self._slots
        while slots and slots[0][0] * slot_s + window_s <= now:
            slots.popleft()
        return sum(amount for _, amount in slots)

    def _charge(self, now: float, window_s: float, amount: float) -> int:
        """Adds `amount` to the current slot; returns its index."""
        index = math.floor(now * SLOTS_PER_WINDOW / window_s) + 1
        slots = self._slots
        if slots and slots[-1][0] >= index:
            slots[-1][1] += amount
            return int(slots[-1][0])
        slots.append([index, amount])
        return index

    def take(self, now: float, window_s: float, capacity: float, amount: float) -> Taken:
        if amount > capacity:
            return NEVER, None
        excess = self._used(now, window_s) + amount - capacity
        if excess <= 0:
            return 0.0, self._charge(now, window_s, amount)
        for index, held in self._slots:
            excess -= held
            if excess <= 0:
                return index * window_s / SLOTS_PER_WINDOW + window_s - now, None
        return window_s, None  # not reached: once the whole window has left, amount fits

    def give_back(self, now: float, window_s: float, amount: float, slot: int | None) -> None:
        self._used(now, window_s)
        if amount < 0:
            self._charge(now, window_s, -amount)
            return
        if slot is None:
            return
        slots = self._slots  # sorted by slot index
        i = bisect.bisect_left(slots, [slot])
        if i < len(slots) and slots[i][0] == slot:
            if slots[i][1] <= amount:
                del slots[i]
            else:
                slots[i][1] -= amount


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
    """Counters in this process's memory (one gateway process, or per-process limits).

    `clock` (monotonic seconds) and `window_s` of the per-minute windows exist
    for tests: a minute of traffic can be replayed without waiting for it.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self._windows: dict[str, _Window] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._seen: dict[str, float] = {}

    def _window(self, key: str) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    async def take(self, key: str, capacity: float, amount: float, holder: str = "") -> Taken:
        return self._window(key).take(self._clock(), self._window_s, capacity, amount)

    async def give_back(
        self, key: str, capacity: float, amount: float, slot: int | None, holder: str = ""
    ) -> None:
        self._window(key).give_back(self._clock(), self._window_s, amount, slot)

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

    async def reconcile(self, spends: Mapping[str, int]) -> None:
        for key, spent in spends.items():
            state = self._budgets.setdefault(key, _Budget())
            state.spent = max(state.spent, spent)

    async def aclose(self) -> None:
        return None
