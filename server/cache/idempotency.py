"""A repeated request id gets the first call's answer, not a second upstream call.

GenerateRequest.request_id makes a call idempotent, as the contract says: a
call that names a request id (in the field; the `x-request-id` metadata,
which proxies set on every call, only correlates) is remembered for
`idempotency.window_s` under the caller's key and that id. A repeat from the
same key within the window:

- while the first call runs, waits for it (at most `idempotency.wait_s`, or
  its own deadline), then
- gets the first call's answer, replayed event by event as a cache hit is
  (either RPC: a Generate repeated as StreamGenerate gets the same answer),
  with no upstream call, no token reservation and a ledger row of cost 0
  (`cache` = `replay`, `cache_saved_nanos` what the first call cost);
- if the first call failed, was cancelled or its answer could not be kept
  (over `max_entry_bytes`), runs as a new call: a retry after an error is a
  new attempt.

A call whose request differs from the first one's (anything the response
cache's key covers: server/cache/key.py) is not a repeat: it runs as a new
call (a correlation id reused for every call of a workflow must not break
them), and its answer is the one kept for the id. Every complete answer is
kept, those cut at max_tokens or calling tools included: unlike the response
cache's, it is this call's own answer. The machinery is the response
cache's (backends, single flight, entries, replay), under a key made of the
scope and the request id.
"""

from __future__ import annotations

import hashlib
import logging
import time

from server.cache.backends import CacheUnavailableError, Clock
from server.cache.cache import HIT, MISS, CachedCall, ResponseCache
from server.cache.key import cache_key_async
from server.calls import CallRecord
from server.config import CacheConfig, IdempotencyConfig, RedisConfig
from server.routing import Route
from server.schema import GenerationRequest

log = logging.getLogger(__name__)

# The ledger's `cache` column for an answer replayed to a repeated request id.
REPLAY = "replay"


class Idempotency:
    """The first answers of the calls that named a request id, for their repeats."""

    def __init__(
        self,
        config: IdempotencyConfig,
        redis: RedisConfig,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self._window_s = config.window_s
        self._answers = ResponseCache(
            CacheConfig(
                enabled=True,
                ttl_s=config.window_s,
                max_entry_bytes=config.max_entry_bytes,
                backend=config.backend,
                max_bytes=config.max_bytes,
                store_max_tokens=True,
                store_tool_calls=True,
                lock_timeout_s=config.wait_s,
                max_pending_bytes=config.max_pending_bytes,
            ),
            redis,
            clock=clock,
            wall=wall,
        )

    async def open(
        self, record: CallRecord, request: GenerationRequest, route: Route, *, protocol: str
    ) -> CachedCall | None:
        """The call's first answer, if its request id has one (`hit`), or the
        call that will make it; None when the store cannot be reached (the call
        then runs as if it named no id). Sets `record.cache` on a replay."""
        answers = self._answers
        policy = answers.policy(request.model, route)
        assert policy is not None  # enabled for every model
        call = CachedCall(answers, answers.backends[policy.backend], policy, record, MISS)
        scope = f"key:{record.key_id}"
        call.key = "idem:" + hashlib.sha256(f"{scope}\0{request.request_id}".encode()).hexdigest()
        try:
            call.fingerprint = await cache_key_async(request, route, protocol=protocol, scope=scope)
            await answers.look_up(call, request)
        except CacheUnavailableError:
            log.warning("idempotency: the store cannot be reached; the call runs as a new one")
            await call.close()
            return None
        except TypeError:
            log.exception("idempotency: a request that cannot be keyed runs as a new one")
            await call.close()
            return None
        entry = call.entry
        if call.outcome != HIT or entry is None:
            call.outcome = MISS
            return call
        if entry.fingerprint != call.fingerprint:
            # The id names another request (a correlation id reused for every
            # call of a workflow): not a repeat, so a new call, whose answer is
            # then the one its repeats get.
            log.info(
                "request_id %s was used for a different request: a new call, not a repeat",
                request.request_id,
            )
            call.entry, call.outcome = None, MISS
            return call
        record.cache = REPLAY
        record.cache_saved_nanos = entry.cost_nanos
        return call

    def stats(self) -> dict[str, float]:
        return self._answers.stats()

    async def aclose(self) -> None:
        await self._answers.aclose()
