"""The record of one routed call: which deployments were tried, how each ended.

The router fills one RoutedCall per generation and hands it to its
observers when the call ends (tracing and metrics hook in there); the
attempts also go into the final error's details when every one failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Outcomes besides a GatewayError's reason.
OK = "OK"
CANCELLED = "CANCELLED"  # the caller went away (or the stream was closed) mid-attempt
SKIPPED_CIRCUIT_OPEN = "SKIPPED_CIRCUIT_OPEN"
# At the rate limit the provider gives the deployment (deployment_limits.py).
SKIPPED_RATE_LIMITED = "SKIPPED_RATE_LIMITED"
# Cannot take the request's parameters (a sampling parameter the model does not
# accept, an option its provider refuses): checked before the first attempt, so
# that a fallback that could never serve the call does not hide the primary's error.
SKIPPED_INVALID_PARAMETERS = "SKIPPED_INVALID_PARAMETERS"


@dataclass(slots=True)
class Attempt:
    """One try of one deployment (or one skipped: circuit open, rate limit, parameters)."""

    deployment: str  # "provider/model"
    outcome: str  # OK, CANCELLED, SKIPPED_*, or the error's reason
    duration_s: float = 0.0
    # When it started, on the event loop's clock (tracing turns it into span times).
    started_at: float = 0.0
    # Whether content had reached the caller when it ended (no retry after that).
    committed: bool = False

    def describe(self) -> str:
        return f"{self.deployment}: {self.outcome} after {self.duration_s:.3f}s"


@dataclass(slots=True)
class RoutedCall:
    """What the router did for one call."""

    request_id: str
    model: str  # as the caller asked for it
    attempts: list[Attempt] = field(default_factory=list)
    # Smart routing's pick and why (empty when the model was not the smart alias).
    tier: str = ""
    tier_reason: str = ""

    def describe_attempts(self) -> list[str]:
        return [a.describe() for a in self.attempts]
