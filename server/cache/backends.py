"""Where answers are kept: this process's memory (an LRU bounded in bytes) or a shared Redis.

Both keep entries under their key with a time to live, and offer the
single-flight lock: the first of several identical calls that miss takes
it and calls the upstream, the others wait for it to end (bounded) and
then read its answer. In memory the lock is an asyncio.Event; in Redis a
key set NX with its own expiry, so a replica that dies holding it delays
the others by at most the lock's time.

A backend that fails (Redis unreachable, slow, or holding something
unreadable) raises CacheUnavailableError: the cache steps aside for the
call, which goes to the upstream as if the cache were off. Every Redis
command is bounded by `redis.timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.cache.entry import CacheEntry, EntryDecodeError, compress, decompress
from server.config import RedisConfig
from server.redis_connection import shared_redis

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
# How often a call waiting on another replica's lock looks again.
POLL_S = 0.01
_LOG_EVERY_S = 10.0


class CacheUnavailableError(Exception):
    """The backend cannot answer now: the call goes on without the cache."""


class CacheBackend(Protocol):
    name: str

    async def get(self, key: str) -> CacheEntry | None: ...

    async def put(self, key: str, entry: CacheEntry, size: int, ttl_s: float) -> None:
        """Keeps `entry` for `ttl_s`: about `size` bytes in this process (its texts
        and bytes, each event's object, and the entry's own: server/cache/cache.py)."""
        ...

    async def acquire(self, key: str, ttl_s: float) -> str | None:
        """Takes the single-flight lock of `key`: a token to release it with, or None
        when another call holds it."""
        ...

    async def wait(self, key: str, timeout_s: float) -> None:
        """Returns once the lock of `key` is released (or `timeout_s` has passed)."""
        ...

    async def release(self, key: str, token: str) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Stored:
    entry: CacheEntry
    size: int
    expires_at: float


class MemoryBackend:
    """An LRU of entries in this process, bounded by the sum of their sizes (each
    answer's texts and bytes and its events' objects, as the cache counts them).

    `clock` (seconds, monotonic) decides expiry; tests inject one.
    """

    name = "memory"

    def __init__(self, max_bytes: int, *, clock: Clock = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._locks: dict[str, tuple[str, asyncio.Event]] = {}
        self.bytes = 0
        self.evictions = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CacheEntry | None:
        stored = self._entries.get(key)
        if stored is None:
            return None
        if stored.expires_at <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return stored.entry

    async def put(self, key: str, entry: CacheEntry, size: int, ttl_s: float) -> None:
        if size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        now = self._clock()
        self._drop_expired(now)
        self._entries[key] = _Stored(entry, size, now + ttl_s)
        self.bytes += size
        while self.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop_expired(self, now: float) -> None:
        """Drops the expired entries at the front (the least recently used): an
        entry no call asks for again would otherwise stay until the bound
        pushed it out, and a store whose entries all live as long (the
        idempotency window's) would hold every one of them until it is full."""
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            if entries[oldest].expires_at > now:
                return
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        stored = self._entries.pop(key)
        self.bytes -= stored.size

    async def acquire(self, key: str, ttl_s: float) -> str | None:
        if key in self._locks:
            return None
        token = os.urandom(8).hex()
        self._locks[key] = (token, asyncio.Event())
        return token

    async def wait(self, key: str, timeout_s: float) -> None:
        held = self._locks.get(key)
        if held is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await held[1].wait()

    async def release(self, key: str, token: str) -> None:
        held = self._locks.get(key)
        if held is not None and held[0] == token:
            del self._locks[key]
            held[1].set()

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


# KEYS[1] lock; ARGV[1] token, ARGV[2] milliseconds: takes the lock when free;
# answers 1 also when this token holds it already: the same SET run again after
# its reply was lost (the shared client retries a command once on a new
# connection) must not leave the call waiting on itself.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

# KEYS[1] lock; ARGV[1] token: deletes the lock only if this call still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisCacheBackend:
    """Entries in the Redis of the `redis` section, compressed, shared by replicas.

    An entry is one string, set with its expiry in the same command; the
    Redis keys are `<key_prefix>cache:<key>` and `<key_prefix>cache-lock:<key>`.
    """

    name = "redis"

    def __init__(self, config: RedisConfig) -> None:
        self._config = config
        self._prefix = f"{config.key_prefix}cache:"
        self._lock_prefix = f"{config.key_prefix}cache-lock:"
        self._redis: aioredis.Redis = shared_redis(config)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._last_warning = 0.0
        # Operations that failed for want of Redis (a metric reads this).
        self.failures = 0

    async def _run(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._config.timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as err:
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning >= _LOG_EVERY_S:
                self._last_warning = now
                log.warning(
                    "response cache: Redis %s failed (%s); calls go on without the cache",
                    what,
                    type(err).__name__,
                )
            raise CacheUnavailableError(what) from err

    async def get(self, key: str) -> CacheEntry | None:
        data = await self._run("get", lambda: self._redis.get(self._prefix + key))
        if not isinstance(data, bytes):
            return None
        try:
            return CacheEntry.decode(decompress(data))
        except EntryDecodeError as err:
            self.failures += 1
            log.warning("response cache: an unreadable entry in Redis is ignored (%s)", err)
            return None

    async def put(self, key: str, entry: CacheEntry, size: int, ttl_s: float) -> None:
        data = compress(entry.encode())
        milliseconds = max(1, round(ttl_s * 1000))
        await self._run("set", lambda: self._redis.set(self._prefix + key, data, px=milliseconds))

    async def acquire(self, key: str, ttl_s: float) -> str | None:
        token = os.urandom(8).hex()
        milliseconds = max(1, round(ttl_s * 1000))
        taken = await self._run(
            "lock",
            lambda: self._acquire(keys=[self._lock_prefix + key], args=[token, milliseconds]),
        )
        return token if taken == 1 else None

    async def wait(self, key: str, timeout_s: float) -> None:
        # Another replica may hold the lock: poll for its release (or expiry).
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        lock = self._lock_prefix + key
        while loop.time() < until:
            held = await self._run("lock check", lambda: self._redis.exists(lock))
            if not held:
                return
            await asyncio.sleep(min(POLL_S, max(0.0, until - loop.time())))

    async def release(self, key: str, token: str) -> None:
        await self._run(
            "unlock", lambda: self._release(keys=[self._lock_prefix + key], args=[token])
        )

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()
