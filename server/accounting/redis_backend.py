"""Quota counters in Redis, shared by every gateway replica.

Each operation is one Lua script, so it is atomic across replicas: N
gateways sharing a Redis enforce one limit, and a budget reservation checks
and reserves in one step. Time comes from Redis (`TIME`), so replicas with
skewed clocks agree. The scripts mirror LocalBackend (server/accounting/backend.py).

Every command is bounded by `redis.timeout_s`. When Redis cannot be reached
the configured failure mode decides: `open` lets the call through, `closed`
refuses it with UNAVAILABLE (QUOTA_BACKEND_UNAVAILABLE). Either way a
warning is logged (at most once per interval) and `failures` counts it, the
hook a metric reads. A post-call update that is lost (settle,
leave) is not retried: a reservation expires after
budgets.reservation_ttl_s, a concurrency slot after its ttl.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.accounting.backend import NEVER, BudgetCounter, Reservation
from server.config import RedisConfig
from server.errors import QuotaBackendUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
_LOG_EVERY_S = 10.0

# KEYS[1] bucket; ARGV capacity, rate per second, amount. Returns "0" or the
# seconds to wait (strings: Redis truncates Lua numbers to integers).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or tostring(now))
level = math.max(0, level - (now - last) * rate)
local wait = '0'
if amount > cap then
  wait = '-1'
elseif level + amount > cap then
  wait = tostring((level + amount - cap) / rate)
else
  level = level + amount
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'last', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
return wait
"""

# KEYS[1] bucket; ARGV capacity, rate per second, amount to give back (<0: take).
_GIVE_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or tostring(now))
level = math.max(0, level - (now - last) * rate - amount)
redis.call('HSET', KEYS[1], 'level', tostring(level), 'last', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(level, cap) / rate * 1000) + 1000)
return 1
"""

# KEYS[1] zset of holders scored by expiry; ARGV cap, holder, ttl seconds.
_ENTER = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 1)
return 1
"""

# A budget K is a hash (spent, reserved), K..':amounts' holder -> amount and
# K..':holds' holder scored by expiry. Expired holds are dropped first.
_PURGE = """
local function purge(k, now)
  local expired = redis.call('ZRANGEBYSCORE', k .. ':holds', '-inf', now)
  for _, h in ipairs(expired) do
    local a = redis.call('HGET', k .. ':amounts', h)
    if a then redis.call('HINCRBY', k, 'reserved', '-' .. a) end
    redis.call('HDEL', k .. ':amounts', h)
    redis.call('ZREM', k .. ':holds', h)
  end
end
"""

# KEYS budgets; ARGV amount, holder, ttl, key expiry, then one limit per key.
_RESERVE = (
    _PURGE
    + """
local now = tonumber(redis.call('TIME')[1])
local amount = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  purge(k, now)
  local spent = tonumber(redis.call('HGET', k, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', k, 'reserved') or '0')
  if spent + reserved + amount > tonumber(ARGV[4 + i]) then
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
return {1, 0, '0', '0'}
"""
)

# KEYS budgets; ARGV holder, actual cost, key expiry. Returns the new spends.
_SETTLE = """
local spends = {}
for _, k in ipairs(KEYS) do
  local a = redis.call('HGET', k .. ':amounts', ARGV[1])
  if a then
    redis.call('HINCRBY', k, 'reserved', '-' .. a)
    redis.call('HDEL', k .. ':amounts', ARGV[1])
    redis.call('ZREM', k .. ':holds', ARGV[1])
  end
  spends[#spends + 1] = tostring(redis.call('HINCRBY', k, 'spent', ARGV[2]))
  redis.call('EXPIRE', k, tonumber(ARGV[3]))
end
return spends
"""

_STATE = (
    _PURGE
    + """
purge(KEYS[1], tonumber(redis.call('TIME')[1]))
return {redis.call('HGET', KEYS[1], 'spent') or '0', redis.call('HGET', KEYS[1], 'reserved') or '0'}
"""
)

# Budget counters outlive their period (a month) by a margin.
_BUDGET_EXPIRY_S = 40 * 86400


class RedisBackend:
    """QuotaBackend on Redis; see the module docstring for failure handling."""

    def __init__(self, config: RedisConfig) -> None:
        self._config = config
        self._prefix = config.key_prefix
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            retry_on_timeout=False,
        )
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._enter = self._redis.register_script(_ENTER)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._state = self._redis.register_script(_STATE)
        self._last_warning = 0.0
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

    async def take(self, key: str, capacity: float, amount: float) -> float:
        rate = capacity / 60.0

        async def call() -> float:
            wait = float(await self._take(keys=[self._k(key)], args=[capacity, rate, amount]))
            return NEVER if wait < 0 else wait

        return await self._run("take", call, 0.0)

    async def give_back(self, key: str, capacity: float, amount: float) -> None:
        async def call() -> None:
            await self._give_back(keys=[self._k(key)], args=[capacity, capacity / 60.0, amount])

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
        async def call() -> Reservation:
            ok, index, spent, reserved = await self._reserve(
                keys=[self._k(b.key) for b in budgets],
                args=[
                    amount,
                    holder,
                    max(1, int(ttl_s)),
                    _BUDGET_EXPIRY_S,
                    *(b.limit_nanos for b in budgets),
                ],
            )
            if ok:
                return Reservation(True)
            return Reservation(False, budgets[int(index) - 1], int(spent), int(reserved))

        return await self._run("reserve", call, Reservation(True))

    async def settle(self, keys: Sequence[str], holder: str, actual: int) -> list[int]:
        async def call() -> list[int]:
            spends = await self._settle(
                keys=[self._k(k) for k in keys], args=[holder, actual, _BUDGET_EXPIRY_S]
            )
            return [int(s) for s in spends]

        return await self._run("settle", call, [])

    async def budget_state(self, key: str) -> tuple[int, int]:
        async def call() -> tuple[int, int]:
            spent, reserved = await self._state(keys=[self._k(key)])
            return int(spent), int(reserved)

        return await self._run("budget state", call, (0, 0))

    async def first_time(self, key: str, ttl_s: float) -> bool:
        async def call() -> bool:
            return bool(await self._redis.set(self._k(key), 1, nx=True, ex=max(1, int(ttl_s))))

        return await self._run("alert", call, False)

    def seed(self, key: str, spent: int) -> None:
        # Redis holds the shared spend itself; a replica's own ledger is partial.
        return None

    async def aclose(self) -> None:
        await self._redis.aclose()
