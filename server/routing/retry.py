"""Retry policy: which failures a retry or a fallback may cure, and how long to wait.

The router (server/routing/router.py) runs the loop; this module only
decides. Every wait is bounded by the caller's deadline: a retry that
could not start before the deadline is not waited for.
"""

from __future__ import annotations

import enum
import random

from server.config import RetryConfig
from server.errors import (
    CredentialUnavailableError,
    DeadlineExceededError,
    DeploymentRateLimitedError,
    GatewayError,
    QuotaExhaustedError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamUnavailableError,
)
from server.routing.attempt_timeouts import AttemptTimeoutError


class Remedy(enum.Enum):
    """What may cure a failure."""

    RETRY = "retry"  # the same deployment again, after a backoff (then the next one)
    FALLBACK = "fallback"  # another deployment; this one will not do better soon
    NONE = "none"  # nothing: the request itself is at fault (400, 404, ...)


def remedy_for(error: BaseException, *, deadline_passed: bool) -> Remedy:
    """How the router answers a failure of one attempt."""
    if isinstance(error, DeadlineExceededError):
        # The caller's budget is spent: nothing may follow. Otherwise only
        # this attempt's own timeout ran out.
        return Remedy.NONE if deadline_passed else Remedy.RETRY
    if isinstance(error, AttemptTimeoutError):
        # Silent past its bound: asking the same deployment again would spend
        # the fallback's time on it.
        return Remedy.FALLBACK
    if isinstance(error, RateLimitedError | UpstreamUnavailableError):
        return Remedy.RETRY
    # The deployment's credentials or quota: another deployment may have its own.
    if isinstance(error, UpstreamAuthError | QuotaExhaustedError | CredentialUnavailableError):
        return Remedy.FALLBACK
    return Remedy.NONE


def counts_against_deployment(error: BaseException) -> bool:
    """Whether a failure is the deployment's (circuit breaker), not the caller's."""
    return isinstance(error, GatewayError) and (
        remedy_for(error, deadline_passed=False) is not Remedy.NONE
    )


class Backoff:
    """Exponential backoff with full jitter, at least the upstream's retry-after."""

    __slots__ = ("_config", "_rng")

    def __init__(self, config: RetryConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """The wait before the `retry`-th retry (1-based); None: do not wait, fall back.

        Full jitter (AWS architecture blog, "Exponential Backoff And Jitter")
        spreads the retries of many callers instead of synchronising them.
        """
        config = self._config
        if retry_after is not None and retry_after > config.max_retry_after_s:
            return None
        ceiling = min(
            config.max_backoff_s, config.initial_backoff_s * config.multiplier ** (retry - 1)
        )
        jittered = self._rng.uniform(0, ceiling)
        return max(jittered, retry_after or 0.0)


# Which final error says most when every attempt failed: the higher, the more
# the caller can act on it. Ties go to the later attempt.
def meaningfulness(error: GatewayError) -> int:
    if isinstance(error, RateLimitedError | QuotaExhaustedError | DeploymentRateLimitedError):
        return 5  # RESOURCE_EXHAUSTED, with RetryInfo: the caller knows when to retry
    if isinstance(error, UpstreamAuthError | CredentialUnavailableError):
        return 4  # the gateway is misconfigured: the operator must act
    if isinstance(error, DeadlineExceededError):
        return 3
    if isinstance(error, UpstreamUnavailableError):
        # Overloaded (529) and HTTP failures say more than a broken connection.
        return 2 if error.metadata.get("upstream_status") else 1
    return 0  # CircuitOpenError and the like: our own conclusion, not the upstream's
