"""Per-key requests per minute and concurrent calls: the gate every call passes first.

Both edges call it before they decode anything or call an upstream: the
gRPC rate-limit interceptor (interceptors/rate_limit.py) and the HTTP front
door (server/http_edge/). `enter` takes a concurrency slot and one request
from the key's minute, or says why not and takes nothing; `leave` gives the
slot back, however the call ended. A key without these limits costs nothing
(`limits_for` returns None). Tokens per minute and budgets need the decoded
request: they are reserved later, by admission.py. Retries happen inside the
router, below the gate: a call counts once however many upstream attempts
it takes.
"""

from __future__ import annotations

import math

from server.accounting.backend import Background, QuotaBackend
from server.accounting.quotas import EffectiveLimits, QuotaPolicy
from server.errors import GatewayError, QuotaViolation, RateLimitExceededError
from server.identity import Identity

# A slot outlives a replica that died holding it by at most this long.
SLOT_TTL_S = 3600.0
# When a concurrency slot frees up is unknown: suggest retrying this soon.
CONCURRENCY_RETRY_S = 1.0


def rpm_key(key_id: str) -> str:
    return f"rpm:{{{key_id}}}"


def slots_key(key_id: str) -> str:
    return f"inflight:{{{key_id}}}"


class CallGate:
    """Enforces requests per minute and concurrent calls per key."""

    def __init__(self, policy: QuotaPolicy, backend: QuotaBackend, background: Background) -> None:
        self._policy = policy
        self._backend = backend
        self._background = background

    def limits_for(self, identity: Identity | None) -> EffectiveLimits | None:
        """The limits the gate enforces for this caller; None when it has none."""
        limits = self._policy.limits_for(identity)
        if limits is None or not limits.gates_calls:
            return None
        return limits

    async def enter(self, key_id: str, limits: EffectiveLimits, holder: str) -> GatewayError | None:
        """Takes a slot and a request, or says why not (taking nothing).

        A backend that is down and fails closed raises its GatewayError.
        """
        cap = limits.max_concurrent
        if cap is not None and not await self._backend.enter(
            slots_key(key_id), cap, holder, SLOT_TTL_S
        ):
            return RateLimitExceededError(
                [
                    QuotaViolation(
                        f"key:{key_id}:max_concurrent",
                        f"this key already has {cap} calls in flight, its limit",
                    )
                ],
                retry_after=CONCURRENCY_RETRY_S,
                metadata={"limit": "max_concurrent", "key_id": key_id},
            )
        rpm = limits.requests_per_minute
        if rpm is not None:
            try:
                wait, _ = await self._backend.take(rpm_key(key_id), rpm, 1, holder)
            except BaseException:
                if cap is not None:
                    self.leave(key_id, holder)
                raise
            if wait:
                if cap is not None:
                    self.leave(key_id, holder)
                return RateLimitExceededError(
                    [
                        QuotaViolation(
                            f"key:{key_id}:requests_per_minute",
                            f"this key's limit of {rpm} requests per minute is used up",
                        )
                    ],
                    retry_after=60.0 if math.isinf(wait) else wait,
                    metadata={"limit": "requests_per_minute", "key_id": key_id},
                )
        return None

    async def admit(self, key_id: str, limits: EffectiveLimits, holder: str) -> GatewayError | None:
        """`enter`, with a backend failing closed reported like any refusal."""
        try:
            return await self.enter(key_id, limits, holder)
        except GatewayError as err:
            return err

    def leave(self, key_id: str, holder: str) -> None:
        """Gives the concurrency slot back (in the background: never blocks the caller)."""
        self._background.run("leave", self._backend.leave(slots_key(key_id), holder))
