"""Rate limits per upstream deployment: queue briefly or skip, before the provider answers 429.

A provider gives us so many requests and tokens per minute for a model
(set on the provider's model entry, or on a route's deployment, which
overrides it). Before each attempt the router takes one request and the
call's tokens (estimated input plus max_tokens, as a key's limit counts
them) from the deployment's buckets, waiting at most
`routing.deployment_queue_s` and never past the caller's deadline. When
they cannot be had in time, the deployment is skipped like an open circuit
(without counting against its breaker); when no deployment could take the
call, the caller gets RESOURCE_EXHAUSTED (DeploymentRateLimitedError)
and no upstream request is made.

The buckets are aiolimiter's leaky bucket, in this process: with several
replicas, give each its share of the provider's limits. Waiters are not
served in arrival order; each wakes when its own wait is over and tries again.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from server.config import ConfigError, GatewayConfig
from server.errors import QuotaViolation


@dataclass(frozen=True, slots=True)
class RateLimits:
    """What a provider allows one deployment per minute; None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __bool__(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def over(self, base: RateLimits) -> RateLimits:
        """These limits, with `base`'s where these have none."""
        return RateLimits(
            self.requests_per_minute or base.requests_per_minute,
            self.tokens_per_minute or base.tokens_per_minute,
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """A deployment that could not take the call in time, and when it could."""

    violation: QuotaViolation
    retry_after: float | None  # None: the call never fits the limit


class _Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket, asked how long until an amount fits."""

    __slots__ = ()

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits: 0.0 now, inf never."""
        self._leak()
        excess = self._level + amount - self.max_rate
        if excess <= 0:
            return 0.0
        if amount > self.max_rate:
            return math.inf
        return excess / self._rate_per_sec

    def take(self, amount: float) -> None:
        self._level += amount


class DeploymentLimiter:
    """The request and token buckets of one deployment ("provider/model")."""

    def __init__(self, name: str, limits: RateLimits) -> None:
        self.name = name
        self.limits = limits
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        self._requests = _Bucket(rpm) if rpm else None
        self._tokens = _Bucket(tpm) if tpm else None
        # Whether the call's tokens must be estimated (only then: it costs a pass
        # over the request).
        self.counts_tokens = self._tokens is not None

    async def acquire(self, tokens: int, until: float) -> Refusal | None:
        """Takes one request and `tokens`, waiting until loop time `until` at most.

        Returns None once taken, else why not (nothing taken). Gives up at
        once when the wait would end after `until`, rather than waiting in vain.
        """
        loop = asyncio.get_running_loop()
        while True:
            requests_wait = self._requests.wait_for(1) if self._requests else 0.0
            tokens_wait = self._tokens.wait_for(tokens) if self._tokens else 0.0
            wait = max(requests_wait, tokens_wait)
            if wait == 0.0:
                if self._requests:
                    self._requests.take(1)
                if self._tokens:
                    self._tokens.take(tokens)
                return None
            if loop.time() + wait > until:
                return self._refusal(tokens, requests_wait >= tokens_wait, wait)
            await asyncio.sleep(wait)

    def _refusal(self, tokens: int, by_requests: bool, wait: float) -> Refusal:
        name, limits = self.name, self.limits
        if by_requests:
            violation = QuotaViolation(
                f"deployment:{name}:rpm",
                f"deployment {name} is at its limit of {limits.requests_per_minute}"
                " requests per minute",
            )
        else:
            violation = QuotaViolation(
                f"deployment:{name}:tpm",
                f"{tokens} tokens (estimated input plus max_tokens) do not fit the limit of"
                f" deployment {name} of {limits.tokens_per_minute} tokens per minute",
            )
        return Refusal(violation, None if math.isinf(wait) else wait)


def model_limits(config: GatewayConfig) -> dict[str, RateLimits]:
    """ "provider/model" -> the rate limits set on a provider's model entry.

    Read from the configuration rather than the provider objects (whose
    settings are their own): `build_providers` has validated these entries
    already (server/providers/_upstream.py, UpstreamModel).
    """
    found: dict[str, RateLimits] = {}
    for name, section in config.providers.items():
        entries: Any = section.settings().get("models")
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
                continue
            limits = RateLimits(
                *(
                    None if entry.get(key) is None else int(entry[key])
                    for key in ("requests_per_minute", "tokens_per_minute")
                )
            )
            if limits:
                found[f"{name}/{entry['id']}"] = limits
    return found


def limiters(
    model: Mapping[str, RateLimits], routed: Iterable[tuple[str, str, RateLimits]]
) -> dict[str, DeploymentLimiter]:
    """One limiter per limited deployment.

    `model` holds the limits of provider model entries; `routed` those of
    route deployments as (configuration key, deployment name, limits), which
    override them field by field. Two route entries for one deployment share
    its limiter, so they may not give it different limits.
    """
    limits = {name: value for name, value in model.items() if value}
    set_by: dict[str, str] = {}
    for where, name, value in routed:
        merged = value.over(model.get(name, RateLimits()))
        first = set_by.setdefault(name, where)
        if first != where and limits[name] != merged:
            raise ConfigError(
                f"invalid configuration:\n  {where}: the rate limits of deployment {name!r}"
                f" differ from those {first} gives it"
            )
        limits[name] = merged
    return {name: DeploymentLimiter(name, value) for name, value in limits.items()}
