"""The response cache: an exact-match cache in front of the router, for both edges.

An edge opens a CachedCall once the request is decoded, routed and the
caller's access to the model checked, before admission (a hit is not charged
to token limits or budgets; request limits have been counted already), and
takes its events from `CachedCall.events(router.stream)`:

    hit      the stored answer, replayed event by event; no upstream call
    miss     the upstream's answer, stored once its final event has passed
    refresh  the caller said no-cache: the upstream's answer, stored
    bypass   the caller said no-store, or the backend failed: the upstream's
             answer, untouched

Only complete answers are stored: a stream that ends with MessageStop and no
error, and not one cut at max_tokens, calling tools, paused or over the
context window (the first two when the configuration allows them). A replay
carries the original usage and stop reason; its cost is 0 (the ledger keeps
what it saved), and its MessageStart names the new call's request id.

Identical calls that miss together make one upstream call: the first takes
the key's lock, the others wait for its answer (at most `lock_timeout_s` or
their deadline) and then look again; if it stored nothing they call the
upstream themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from server.cache.backends import (
    CacheBackend,
    CacheUnavailableError,
    Clock,
    MemoryBackend,
    RedisCacheBackend,
)
from server.cache.directives import CacheDirectives
from server.cache.entry import CacheEntry
from server.cache.key import cache_key_async
from server.calls import CallRecord
from server.config import CacheConfig, RedisConfig
from server.events import (
    ContentBlockStart,
    MessageDelta,
    MessageStart,
    MessageStop,
    RawChunk,
    StreamEvent,
)
from server.routing import Route
from server.schema import Cost, GenerationRequest, StopReason, ToolUseBlock

log = logging.getLogger(__name__)

HIT = "hit"
MISS = "miss"
BYPASS = "bypass"
REFRESH = "refresh"

Upstream = Callable[[GenerationRequest, Route], AsyncIterator[StreamEvent]]

# Answers that are not finished: never stored.
_UNFINISHED = frozenset({StopReason.PAUSE_TURN, StopReason.CONTEXT_WINDOW_EXCEEDED})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The cache settings of one model, its overrides applied."""

    ttl_s: float
    max_entry_bytes: int
    backend: str
    namespace: str
    store_max_tokens: bool
    store_tool_calls: bool


class ResponseCache:
    """The cache of one gateway: its policies per model and its backends.

    `clock` (monotonic seconds) decides the memory backend's expiry and
    `wall` (Unix seconds) stamps entries; tests inject both.
    """

    def __init__(
        self,
        config: CacheConfig,
        redis: RedisConfig,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self._config = config
        self._wall = wall
        self._policies: dict[tuple[str, str], CachePolicy | None] = {}
        # The answers of calls in flight, kept until they can be stored.
        self.pending = PendingBytes(config.max_pending_bytes)
        self.backends: dict[str, CacheBackend] = {}
        for name in sorted(config.backends()):
            if name == "redis":
                self.backends[name] = RedisCacheBackend(redis)
            else:
                self.backends[name] = MemoryBackend(config.max_bytes, clock=clock)

    def policy(self, model: str, route: Route) -> CachePolicy | None:
        """The settings for a call to `model` (as asked) on `route`; None: not cached."""
        found = self._policies.get((model, route.model.id), ...)
        if found is not ...:
            return found
        config = self._config
        override = config.models.get(model) or config.models.get(route.model.id)
        enabled = config.enabled
        policy: CachePolicy | None = None
        if override is not None and override.enabled is not None:
            enabled = override.enabled
        if enabled:
            given = override.model_dump(exclude_none=True) if override is not None else {}
            given.pop("enabled", None)
            defaults = {
                "ttl_s": config.ttl_s,
                "max_entry_bytes": config.max_entry_bytes,
                "backend": config.backend,
                "namespace": config.namespace,
                "store_max_tokens": config.store_max_tokens,
                "store_tool_calls": config.store_tool_calls,
            }
            policy = CachePolicy(**{**defaults, **given})
        if len(self._policies) < 10_000:  # model names are the caller's: bounded
            self._policies[(model, route.model.id)] = policy
        return policy

    async def open(
        self,
        record: CallRecord,
        request: GenerationRequest,
        route: Route,
        *,
        protocol: str,
        directives: CacheDirectives,
    ) -> CachedCall | None:
        """Looks the call up; None when its model is not cached. Sets `record.cache`."""
        policy = self.policy(request.model, route)
        if policy is None:
            return None
        backend = self.backends[policy.backend]
        call = CachedCall(self, backend, policy, record, BYPASS)
        if directives.no_store:
            record.cache = BYPASS
            return call
        if directives.ttl_s is not None:
            call.ttl_s = min(call.ttl_s, directives.ttl_s)
        try:
            call.key = await cache_key_async(
                request, route, protocol=protocol, scope=policy.namespace or f"key:{record.key_id}"
            )
        except TypeError:
            log.exception("response cache: a request that cannot be keyed is not cached")
            record.cache = BYPASS
            return call
        try:
            if directives.no_cache:
                call.outcome = REFRESH
            else:
                await self.look_up(call, request)
        except CacheUnavailableError:
            call.outcome = BYPASS
            await call.close()
        record.cache = call.outcome
        if call.outcome == HIT and call.entry is not None:
            record.cache_saved_nanos = call.entry.cost_nanos
        return call

    async def look_up(self, call: CachedCall, request: GenerationRequest) -> None:
        backend = call.backend
        started = time.perf_counter()
        entry = await backend.get(call.key)
        call.record.cache_lookup_s = time.perf_counter() - started
        if entry is None:
            # Single flight: the first call to miss makes the answer, the others wait.
            timeout = self._config.lock_timeout_s
            call.token = await backend.acquire(call.key, timeout)
            if call.token is None:
                if request.deadline is not None:
                    left = request.deadline - asyncio.get_running_loop().time()
                    timeout = max(0.0, min(timeout, left))
                await backend.wait(call.key, timeout)
                entry = await backend.get(call.key)
        if entry is None:
            call.outcome = MISS
        else:
            call.outcome = HIT
            call.entry = entry

    async def store(self, call: CachedCall, events: list[StreamEvent], size: int) -> None:
        """Stores a finished answer of about `size` bytes, if it may be (see the
        module's docstring). Only Redis encodes it: the memory backend keeps
        the events themselves."""
        cost = _storable_cost(events, call.policy)
        if cost is None or size > call.policy.max_entry_bytes:
            return
        entry = CacheEntry(events, cost, self._wall(), call.fingerprint)
        try:
            await call.backend.put(call.key, entry, size + _ENTRY_OVERHEAD, call.ttl_s)
        except CacheUnavailableError:
            return

    def stats(self) -> dict[str, float]:
        """What the metrics read at scrape time."""
        memory = self.backends.get("memory")
        redis = self.backends.get("redis")
        return {
            "bytes": float(getattr(memory, "bytes", 0)),
            "entries": float(getattr(memory, "entries", 0)),
            "evictions": float(getattr(memory, "evictions", 0)),
            "backend_failures": float(getattr(redis, "failures", 0)),
        }

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()


class CachedCall:
    """One call's use of the cache: its outcome, and the events it serves."""

    __slots__ = (
        "_cache",
        "backend",
        "entry",
        "fingerprint",
        "key",
        "outcome",
        "policy",
        "record",
        "token",
        "ttl_s",
    )

    def __init__(
        self,
        cache: ResponseCache,
        backend: CacheBackend,
        policy: CachePolicy,
        record: CallRecord,
        outcome: str,
    ) -> None:
        self._cache = cache
        self.backend = backend
        self.policy = policy
        self.record = record
        self.outcome = outcome
        self.ttl_s = policy.ttl_s
        self.key = ""
        # The request's own key, stored with its answer when `key` is another's.
        self.fingerprint = ""
        self.entry: CacheEntry | None = None
        self.token: str | None = None  # the single-flight lock, while held

    @property
    def hit(self) -> bool:
        return self.outcome == HIT

    def events(
        self, request: GenerationRequest, route: Route, upstream: Upstream
    ) -> AsyncIterator[StreamEvent]:
        """The call's events: the stored answer on a hit, else the upstream's."""
        if self.entry is not None and self.outcome == HIT:
            return _replay(self.entry, request.request_id)
        if self.outcome == BYPASS:
            return upstream(request, route)
        return self._storing(upstream(request, route))

    async def _storing(self, events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        """The events, kept to be stored once the answer is complete. What is
        kept is bounded: an answer past the entry's size is dropped (it would
        not be stored), and so is every answer while all the answers being
        kept exceed the cache's budget (`ResponseCache.pending`), so a caller
        who reads nothing (its stream stalled, with the answer so far held)
        cannot make the gateway keep more than that, however many streams."""
        collected: list[StreamEvent] | None = []
        pending = self._cache.pending
        limit = self.policy.max_entry_bytes
        size = 0
        stopped = False
        try:
            async for event in events:
                if collected is not None:
                    grown = _size(event)
                    size += grown
                    if size > limit or not pending.take(grown):
                        pending.give(size - grown)
                        collected = None
                    else:
                        collected.append(event)
                stopped = stopped or isinstance(event, MessageStop)
                yield event
            # The stream ended as it should: its final event passed (a relayed
            # whole answer's bytes come after it), and no error.
            if stopped and collected is not None:
                await self._cache.store(self, collected, size)
        finally:
            if collected is not None:
                pending.give(size)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.close()

    async def close(self) -> None:
        """Releases the single-flight lock, if this call holds it (idempotent)."""
        token, self.token = self.token, None
        if token is not None:
            # When the backend fails, the lock expires by itself.
            with contextlib.suppress(CacheUnavailableError):
                await self.backend.release(self.key, token)


class PendingBytes:
    """What the answers being kept for storing hold, within a budget (bytes)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.budget:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


# What an event costs to keep besides its text or bytes: the object and its
# place in the entry's list (measured: a TextDelta, 48 + 8 bytes, and the
# allocator's rounding).
_EVENT_OVERHEAD = 64
# What a kept answer costs besides its events' texts and objects: the larger
# first and last events (MessageStart's ids, model, routing and pricing;
# MessageDelta's usage and cost), the entry, its place in the LRU, its key
# and fingerprint. Measured (tests/test_cache.py holds the counts to what
# tracemalloc sees): about 1,340 bytes for a short answer in the response
# cache, 1,470 in the idempotency store (a longer key, and the fingerprint).
_ENTRY_OVERHEAD = 1536


def _size(event: StreamEvent) -> int:
    """About what keeping `event` costs, in bytes (a text's size is its
    object's: a character outside Latin-1 takes two or four bytes)."""
    if isinstance(event, RawChunk):
        return sys.getsizeof(event.data) + _EVENT_OVERHEAD
    text = getattr(event, "text", None) or getattr(event, "partial_json", None)
    return (sys.getsizeof(text) if isinstance(text, str) else 0) + _EVENT_OVERHEAD


async def _replay(entry: CacheEntry, request_id: str) -> AsyncIterator[StreamEvent]:
    """The stored events, for a new call: its request id, and no cost."""
    for event in entry.events:
        if isinstance(event, MessageStart):
            yield dataclasses.replace(event, request_id=request_id, pricing=None)
        elif isinstance(event, MessageDelta) and event.cost is not None:
            yield dataclasses.replace(event, cost=Cost(currency_code=event.cost.currency_code))
        else:
            yield event


def _storable_cost(events: list[StreamEvent], policy: CachePolicy) -> int | None:
    """What the answer cost, if it may be stored; None if it may not."""
    stop_reason: StopReason | None = None
    cost = 0
    tool_calls = False
    for event in events:
        if isinstance(event, MessageDelta):
            if event.stop_reason is not None:
                stop_reason = event.stop_reason
            if event.cost is not None:
                cost = event.cost.total_nanos
        elif isinstance(event, ContentBlockStart) and isinstance(event.block, ToolUseBlock):
            tool_calls = True
    if stop_reason is None or stop_reason in _UNFINISHED:
        return None
    if stop_reason is StopReason.MAX_TOKENS and not policy.store_max_tokens:
        return None
    if (tool_calls or stop_reason is StopReason.TOOL_USE) and not policy.store_tool_calls:
        return None
    return cost
