"""Quota counters in Redis, shared by every gateway replica.

Each operation is one Lua script, so it is atomic across replicas: N
gateways sharing a Redis enforce one limit, and a budget reservation checks
and reserves in one step. Time comes from Redis (`TIME`), so replicas with
skewed clocks agree. The scripts mirror LocalBackend (server/accounting/backend.py):
a per-minute limit is a window of 60 slots in a hash (slot -> amount) that
never admits more than the limit in any 60 s, so a fresh key may use its
whole minute at once and then waits until its oldest usage is a minute old.
A take answers the slot it was charged to (by Redis's clock), and a give
back returns usage to that slot only.

Budgets survive a Redis that comes back empty. A budget's hash carries a
`seeded` mark once its spend is known; the first reservation (or settle,
or budget query) that finds it missing asks the usage ledger for the
period's spend (`spend_source`, from Accounting), and one script sets
spent = max(spent, ledger) and the mark, and counts the alerts that spend
has crossed as fired. Taking the larger of the two, never their sum, is
what keeps a call from counting twice: one whose settle reached Redis after
the loss and whose row the ledger also holds counts once, and a rebuild
run twice (two replicas, a retry) changes nothing. Accounting also raises
seeded budgets to the ledger's spend every `budgets.reconcile_interval_s`.

Every command is bounded by `redis.timeout_s`. When Redis cannot be reached
the configured failure mode decides: `open` lets the call through, `closed`
refuses it with UNAVAILABLE (QUOTA_BACKEND_UNAVAILABLE). Either way a
warning is logged (at most once per interval) and `failures` counts it, the
hook a metric reads. A post-call update that is lost (settle,
leave) is not retried: a reservation expires after
budgets.reservation_ttl_s, a concurrency slot after its ttl; a lost settle
is caught up by the next reconcile, once the ledger has the call's row.

The shared client retries a command once when its connection fails
(server/redis_connection.py), and a connection can fail after Redis ran the
command and before its reply came back: the budget scripts are written to
be run twice. A reservation whose holder holds already holds once; a settle
leaves the mark `settled` for its holder (for `settled_mark_s`, dropped by
the purge like an expired hold), and a settle that finds it charges nothing
(tests/test_redis_lost_replies.py). A per-minute take or give-back leaves a
mark for its holder (the call's quota hold, a random id: never the caller's
request id, which a caller could repeat) for a few seconds (`window_mark_s`),
and run again answers as the first run did and counts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.accounting.backend import (
    NEVER,
    WINDOW_S,
    BudgetCounter,
    Reservation,
    SpendSource,
    Taken,
)
from server.config import RedisConfig
from server.errors import QuotaBackendUnavailableError
from server.redis_connection import shared_redis

log = logging.getLogger(__name__)

T = TypeVar("T")
_LOG_EVERY_S = 10.0

# A window K is a hash: slot index -> amount (see _Window in backend.py).
# `window` drops the slots a whole window old and returns the others' indexes
# (oldest first), their amounts and their sum; `charge` adds to the current
# slot and returns its index.
_WINDOW = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function window(k, now, width)
  local slot = width / 60
  local flat = redis.call('HGETALL', k)
  local slots, amounts, used = {}, {}, 0
  for i = 1, #flat, 2 do
    local index = tonumber(flat[i])
    if index * slot + width <= now then
      redis.call('HDEL', k, flat[i])
    else
      slots[#slots + 1] = index
      amounts[index] = tonumber(flat[i + 1])
      used = used + amounts[index]
    end
  end
  table.sort(slots)
  return slots, amounts, used
end
local function charge(k, now, width, amount, slots)
  local index = math.floor(now * 60 / width) + 1
  if #slots > 0 and slots[#slots] > index then index = slots[#slots] end
  redis.call('HINCRBYFLOAT', k, string.format('%d', index), amount)
  redis.call('PEXPIRE', k, math.ceil(width * 62 / 60 * 1000))
  return index
end
"""

# KEYS[1] window; ARGV capacity, amount, window seconds, holder ('' for none),
# the holder's mark's life in seconds. Returns the index of the slot charged
# (an integer: the cheapest reply to read) or, as a string, the seconds to
# wait, "-1" when it never fits (Redis truncates Lua numbers). A holder's take
# leaves a mark, K:taken:holder -> the slot: run again (a retry after a lost
# reply) it answers that slot and charges nothing.
_TAKE = (
    _WINDOW
    + """
local cap, amount, width = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local mark = nil
if ARGV[4] ~= '' then
  mark = KEYS[1] .. ':taken:' .. ARGV[4]
  local done = redis.call('GET', mark)
  if done then return tonumber(done) end
end
if amount > cap then return '-1' end
local now = now_s()
local slots, amounts, used = window(KEYS[1], now, width)
local excess = used + amount - cap
if excess <= 0 then
  local index = charge(KEYS[1], now, width, amount, slots)
  if mark then redis.call('SET', mark, string.format('%d', index), 'EX', ARGV[5]) end
  return index
end
for _, index in ipairs(slots) do
  excess = excess - amounts[index]
  if excess <= 0 then return tostring(index * width / 60 + width - now) end
end
return tostring(width)
"""
)

# KEYS[1] window; ARGV amount to give back (< 0: take now), window seconds,
# the slot index its take was charged to ('' for none), holder ('' for none),
# the holder's mark's life in seconds. Only that slot is lowered, and only
# while it is in the window. A holder's give-back leaves a mark,
# K:given:holder: run again it does nothing.
_GIVE_BACK = (
    _WINDOW
    + """
local amount, width = tonumber(ARGV[1]), tonumber(ARGV[2])
if ARGV[4] ~= '' then
  if not redis.call('SET', KEYS[1] .. ':given:' .. ARGV[4], '1', 'NX', 'EX', ARGV[5]) then
    return 0
  end
end
local now = now_s()
if amount < 0 then
  local slots = window(KEYS[1], now, width)
  charge(KEYS[1], now, width, -amount, slots)
  return 1
end
local index = tonumber(ARGV[3])
if not index or index * width / 60 + width <= now then return 0 end
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or '0')
if held <= amount then
  redis.call('HDEL', KEYS[1], ARGV[3])
else
  redis.call('HSET', KEYS[1], ARGV[3], tostring(held - amount))
end
return 1
"""
)

# KEYS[1] zset of holders scored by expiry; ARGV cap, holder, ttl seconds.
_ENTER = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 1)
return 1
"""

# A budget K is a hash (spent, reserved, and `seeded` once its spend is
# known: rebuilt from the ledger, or counted here since the period began),
# K..':amounts' holder -> amount and K..':holds' holder scored by expiry.
# A settled holder's amount is the mark 'settled' for a while (see _SETTLE).
# Expired holds and marks are dropped first.
_PURGE = """
local function purge(k, now)
  local expired = redis.call('ZRANGEBYSCORE', k .. ':holds', '-inf', now)
  for _, h in ipairs(expired) do
    local a = redis.call('HGET', k .. ':amounts', h)
    if a and a ~= 'settled' then redis.call('HINCRBY', k, 'reserved', '-' .. a) end
    redis.call('HDEL', k .. ':amounts', h)
    redis.call('ZREM', k .. ':holds', h)
  end
end
"""

# KEYS budgets; ARGV amount, holder, ttl, key expiry, whether budgets must be
# seeded first, then one limit per key. Returns {1}, {0, index of the refused
# budget, its spent, its reserved}, or {2, indexes of budgets to seed first}.
# A holder that holds already (this reservation run again: its first reply
# was lost) is answered {1} and holds once.
_RESERVE = (
    _PURGE
    + """
if redis.call('HEXISTS', KEYS[1] .. ':amounts', ARGV[2]) == 1 then return {1} end
if ARGV[5] == '1' then
  local lost = {2}
  for i, k in ipairs(KEYS) do
    if redis.call('HEXISTS', k, 'seeded') == 0 then lost[#lost + 1] = i end
  end
  if #lost > 1 then return lost end
end
local now = tonumber(redis.call('TIME')[1])
local amount = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  purge(k, now)
  local spent = tonumber(redis.call('HGET', k, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', k, 'reserved') or '0')
  if spent + reserved + amount > tonumber(ARGV[5 + i]) then
    return {0, i, tostring(spent), tostring(reserved)}
  end
end
for _, k in ipairs(KEYS) do
  redis.call('HINCRBY', k, 'reserved', ARGV[1])
  redis.call('HSET', k .. ':amounts', ARGV[2], ARGV[1])
  redis.call('ZADD', k .. ':holds', now + tonumber(ARGV[3]), ARGV[2])
  for _, suffix in ipairs({'', ':amounts', ':holds'}) do
    redis.call('EXPIRE', k .. suffix, tonumber(ARGV[4]))
  end
end
return {1}
"""
)

# KEYS budgets; ARGV holder, actual cost, key expiry, seconds the mark stays.
# Returns each budget's new spend and whether it is seeded. The holder's
# amount becomes the mark 'settled' (dropped by the purge after ARGV[4]
# seconds), so that this settle run again (its first reply was lost and the
# client retried) charges nothing more.
_SETTLE = """
local out = {}
local now = tonumber(redis.call('TIME')[1])
for _, k in ipairs(KEYS) do
  local a = redis.call('HGET', k .. ':amounts', ARGV[1])
  if a == 'settled' then
    out[#out + 1] = redis.call('HGET', k, 'spent') or '0'
  else
    if a then redis.call('HINCRBY', k, 'reserved', '-' .. a) end
    redis.call('HSET', k .. ':amounts', ARGV[1], 'settled')
    redis.call('ZADD', k .. ':holds', now + tonumber(ARGV[4]), ARGV[1])
    out[#out + 1] = tostring(redis.call('HINCRBY', k, 'spent', ARGV[2]))
  end
  out[#out + 1] = redis.call('HEXISTS', k, 'seeded')
  for _, suffix in ipairs({'', ':amounts', ':holds'}) do
    redis.call('EXPIRE', k .. suffix, tonumber(ARGV[3]))
  end
end
return out
"""

_STATE = (
    _PURGE
    + """
purge(KEYS[1], tonumber(redis.call('TIME')[1]))
return {
  redis.call('HGET', KEYS[1], 'spent') or '0',
  redis.call('HGET', KEYS[1], 'reserved') or '0',
  redis.call('HEXISTS', KEYS[1], 'seeded'),
}
"""
)

# KEYS[1] a budget, then its alert keys; ARGV the ledger's spend, key expiry,
# alert expiry, the spend whose alerts count as fired, then each alert's mark.
# Once per budget (the first replica to get here wins): spent = max(spent,
# ledger), and the alerts crossed before count as fired. Returns the spend.
_SEED = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
if redis.call('HEXISTS', KEYS[1], 'seeded') == 1 then return tostring(spent) end
if tonumber(ARGV[1]) > spent then
  spent = tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'spent', ARGV[1])
end
redis.call('HSET', KEYS[1], 'seeded', '1')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
for i = 2, #KEYS do
  if tonumber(ARGV[3 + i]) <= tonumber(ARGV[4]) then
    redis.call('SET', KEYS[i], '1', 'NX', 'EX', tonumber(ARGV[3]))
  end
end
return tostring(spent)
"""

# KEYS[1] a budget; ARGV the ledger's spend. Raises a seeded budget's spend to it.
_RAISE = """
if redis.call('HEXISTS', KEYS[1], 'seeded') == 0 then return 0 end
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'spent') or '0') then
  redis.call('HSET', KEYS[1], 'spent', ARGV[1])
  return 1
end
return 0
"""

_SETTLED_MARK_S = 60
_WINDOW_MARK_MIN_S = 5
# Budget counters outlive their period (a month) by a margin.
_BUDGET_EXPIRY_S = 40 * 86400
# A budget whose spend the ledger could not give is asked again after this.
_REBUILD_RETRY_S = 10.0
_MAX_REMEMBERED = 10_000
_RECONCILE_BATCH = 500


class RedisBackend:
    """QuotaBackend on Redis; see the module docstring for failure handling.

    `spend_source` rebuilds a budget Redis has lost from the ledger (None:
    no ledger, budgets count from what Redis holds). `window_s` is the span
    of the per-minute limits, changed only by tests.
    """

    def __init__(
        self,
        config: RedisConfig,
        *,
        spend_source: SpendSource | None = None,
        window_s: float = WINDOW_S,
    ) -> None:
        self._config = config
        self._prefix = config.key_prefix
        self._window_s = window_s
        self._source = spend_source
        self._redis: aioredis.Redis = shared_redis(config)
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._enter = self._redis.register_script(_ENTER)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._state = self._redis.register_script(_STATE)
        self._seed = self._redis.register_script(_SEED)
        self._raise = self._redis.register_script(_RAISE)
        # Budget key -> its limit, as last reserved here (the alert marks of a rebuild).
        self._limits: dict[str, int] = {}
        # One rebuild per budget at a time; a failed one is not retried before the time.
        self._rebuilding: dict[str, asyncio.Task[int | None]] = {}
        self._rebuild_after: dict[str, float] = {}
        self._last_warning = 0.0
        # How long a settled holder's mark stays (_SETTLE): longer than any retry
        # of the settle comes (at once, within redis.timeout_s).
        self.settled_mark_s = _SETTLED_MARK_S
        # How long a per-minute take's or give-back's mark stays (_TAKE,
        # _GIVE_BACK): past the retry, which comes at once, within timeout_s.
        self.window_mark_s = max(_WINDOW_MARK_MIN_S, math.ceil(3 * config.timeout_s))
        # Operations that failed for want of Redis (a metric reads this).
        self.failures = 0

    @property
    def fail_open(self) -> bool:
        return self._config.failure_mode == "open"

    async def _run(self, what: str, call: Callable[[], Awaitable[T]], when_open: T) -> T:
        try:
            async with asyncio.timeout(self._config.timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as err:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning >= _LOG_EVERY_S:
                self._last_warning = now
                log.warning(
                    "quota backend: Redis unreachable during %s (%s); failing %s",
                    what,
                    type(err).__name__,
                    self._config.failure_mode,
                )
            if self.fail_open:
                return when_open
            raise QuotaBackendUnavailableError(
                "rate limits and budgets cannot be checked right now"
            ) from err

    def _k(self, key: str) -> str:
        return self._prefix + key

    async def take(self, key: str, capacity: float, amount: float, holder: str = "") -> Taken:
        async def call() -> Taken:
            result = await self._take(
                keys=[self._k(key)],
                args=[capacity, amount, self._window_s, holder, self.window_mark_s],
            )
            if isinstance(result, int):
                return 0.0, result
            wait = float(result)
            return (NEVER if wait < 0 else wait), None

        # Failing open, nothing is charged: nothing to give back.
        return await self._run("take", call, (0.0, None))

    async def give_back(
        self, key: str, capacity: float, amount: float, slot: int | None, holder: str = ""
    ) -> None:
        async def call() -> None:
            await self._give_back(
                keys=[self._k(key)],
                args=[
                    amount,
                    self._window_s,
                    "" if slot is None else slot,
                    holder,
                    self.window_mark_s,
                ],
            )

        await self._run("give back", call, None)

    async def enter(self, key: str, cap: int, holder: str, ttl_s: float) -> bool:
        async def call() -> bool:
            return bool(
                await self._enter(keys=[self._k(key)], args=[cap, holder, max(1, int(ttl_s))])
            )

        return await self._run("enter", call, True)

    async def leave(self, key: str, holder: str) -> None:
        async def call() -> None:
            await self._redis.zrem(self._k(key), holder)

        await self._run("leave", call, None)

    async def reserve(
        self, budgets: Sequence[BudgetCounter], amount: int, holder: str, ttl_s: float
    ) -> Reservation:
        if len(self._limits) >= _MAX_REMEMBERED:
            self._limits.clear()
        for budget in budgets:
            self._limits[budget.key] = budget.limit_nanos

        def attempt(seeded_first: bool) -> Callable[[], Awaitable[list[Any] | None]]:
            async def call() -> list[Any] | None:
                return list(
                    await self._reserve(
                        keys=[self._k(b.key) for b in budgets],
                        args=[
                            amount,
                            holder,
                            max(1, int(ttl_s)),
                            _BUDGET_EXPIRY_S,
                            int(seeded_first),
                            *(b.limit_nanos for b in budgets),
                        ],
                    )
                )

            return call

        result = await self._run("reserve", attempt(self._source is not None), None)
        if result is not None and int(result[0]) == 2:
            # Redis has lost these budgets (restarted empty, or a new period):
            # rebuilt from the ledger first, outside the Redis timeout.
            await self._rebuild([budgets[int(i) - 1].key for i in result[1:]])
            result = await self._run("reserve", attempt(False), None)
        if result is None or int(result[0]) == 1:
            return Reservation(True)
        _, index, spent, reserved = result
        return Reservation(False, budgets[int(index) - 1], int(spent), int(reserved))

    async def settle(self, keys: Sequence[str], holder: str, actual: int) -> list[int]:
        async def call() -> list[Any]:
            return list(
                await self._settle(
                    keys=[self._k(k) for k in keys],
                    args=[holder, actual, _BUDGET_EXPIRY_S, self.settled_mark_s],
                )
            )

        nothing: list[Any] = []
        result = await self._run("settle", call, nothing)
        spends = [int(s) for s in result[0::2]]
        lost = [k for k, seeded in zip(keys, result[1::2], strict=True) if not int(seeded)]
        if lost and self._source is not None:
            # A call reserved before Redis lost the budget: its spend joins the ledger's.
            # The ledger holds this call too (its row is written before the
            # rebuild reads): its own alerts may still fire.
            rebuilt = await self._rebuild(lost, fired_below=actual)
            spends = [
                max(spent, rebuilt.get(k) or 0) for k, spent in zip(keys, spends, strict=True)
            ]
        return spends

    async def budget_state(self, key: str) -> tuple[int, int]:
        async def call() -> tuple[int, int, int]:
            spent, reserved, seeded = await self._state(keys=[self._k(key)])
            return int(spent), int(reserved), int(seeded)

        spent, reserved, seeded = await self._run("budget state", call, (0, 0, 1))
        if not seeded and self._source is not None:
            rebuilt = (await self._rebuild([key])).get(key)
            if rebuilt is not None:
                spent = max(spent, rebuilt)
        return spent, reserved

    async def _rebuild(self, keys: Sequence[str], *, fired_below: int = 0) -> dict[str, int | None]:
        """Seeds budgets Redis has lost from the ledger; the spends after it (None: not seeded).

        The alerts up to the ledger's spend less `fired_below` count as fired.
        """
        tasks = []
        for key in keys:
            task = self._rebuilding.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._rebuild_one(key, fired_below))
                self._rebuilding[key] = task

                def forget(_: asyncio.Task[int | None], key: str = key) -> None:
                    self._rebuilding.pop(key, None)

                task.add_done_callback(forget)
            tasks.append(task)
        # Shielded: a caller that gives up does not stop the rebuild others wait for.
        spends = await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        return dict(zip(keys, spends, strict=True))

    async def _rebuild_one(self, key: str, fired_below: int) -> int | None:
        assert self._source is not None
        now = time.monotonic()
        if self._rebuild_after.get(key, 0.0) > now:
            return None
        try:
            spend = await self._source(key, self._limits.get(key))
        except Exception:
            log.exception("budget %s: reading its spend from the usage ledger failed", key)
            spend = None
        if spend is None:
            # The ledger cannot say: the budget counts from what Redis holds
            # until a later call tries again.
            if len(self._rebuild_after) >= _MAX_REMEMBERED:
                self._rebuild_after.clear()
            self._rebuild_after[key] = now + _REBUILD_RETRY_S
            return None
        log.info(
            "budget %s: rebuilt from the usage ledger (%d nano-dollars spent)",
            key,
            spend.spent_nanos,
        )

        async def call() -> int | None:
            spent = await self._seed(
                keys=[self._k(key), *(self._k(alert) for alert, _ in spend.alerts)],
                args=[
                    spend.spent_nanos,
                    _BUDGET_EXPIRY_S,
                    max(1, int(spend.alerts_ttl_s)),
                    spend.spent_nanos - fired_below,
                    *(mark for _, mark in spend.alerts),
                ],
            )
            return int(spent)

        return await self._run("rebuild budget", call, None)

    async def reconcile(self, spends: Mapping[str, int]) -> None:
        items = list(spends.items())
        for start in range(0, len(items), _RECONCILE_BATCH):
            batch = items[start : start + _RECONCILE_BATCH]

            async def call(batch: list[tuple[str, int]] = batch) -> None:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, spent in batch:
                        await self._raise(keys=[self._k(key)], args=[spent], client=pipe)
                    raised = await pipe.execute()
                if any(raised):
                    log.info(
                        "budgets: %d of %d raised to the usage ledger's spend",
                        sum(map(int, raised)),
                        len(batch),
                    )

            await self._run("reconcile budgets", call, None)

    async def first_time(self, key: str, ttl_s: float) -> bool:
        async def call() -> bool:
            return bool(await self._redis.set(self._k(key), 1, nx=True, ex=max(1, int(ttl_s))))

        return await self._run("alert", call, False)

    async def aclose(self) -> None:
        for task in list(self._rebuilding.values()):
            task.cancel()
        await self._redis.aclose()
