"""Circuit breakers: one per deployment, so a failing one is skipped, not hammered.

closed --N consecutive failures--> open --recovery time--> half-open
half-open --a probe succeeds--> closed; --a probe fails--> open again.

Only failures that say something about the deployment count (429, 5xx,
timeouts, resets, refused credentials); a caller's bad request says nothing
about it and neither opens nor closes the circuit. The clock is injectable
so tests need not wait for the recovery time.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# What a caller refused while a half-open circuit's probes are under way is told
# to wait: the probes' outcome decides, and it is usually known within a second.
HALF_OPEN_RETRY_S = 1.0


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """The breaker of one deployment; not thread-safe (one event loop)."""

    __slots__ = (
        "_clock",
        "_failures",
        "_opened_at",
        "_probes",
        "failure_threshold",
        "half_open_probes",
        "name",
        "recovery_s",
        "state",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_s: float = 60.0,
        half_open_probes: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_s = recovery_s
        self.half_open_probes = half_open_probes
        self.state = BreakerState.CLOSED
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0  # probe calls in flight while half-open

    def allow(self) -> bool:
        """Whether a call may go to the deployment now; a True must be followed
        by exactly one of record_success, record_failure or release."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.recovery_s:
                return False
            self._change(BreakerState.HALF_OPEN)
        if self._probes >= self.half_open_probes:
            return False
        self._probes += 1
        return True

    def next_probe_in(self) -> float | None:
        """Seconds until a call may go to the deployment again: until the open circuit's
        first probe, or, half-open with every probe under way, a short wait for their
        outcome (HALF_OPEN_RETRY_S); None when a call may go now."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.recovery_s - self._clock())
        if self.state is BreakerState.HALF_OPEN and self._probes >= self.half_open_probes:
            return min(HALF_OPEN_RETRY_S, self.recovery_s)
        return None

    def record_success(self) -> None:
        self._failures = 0
        if self.state is not BreakerState.CLOSED:
            self._probes = max(0, self._probes - 1)
            self._change(BreakerState.CLOSED)

    def record_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            self._open()
            return
        self._failures += 1
        if self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def release(self) -> None:
        """Ends a call that said nothing about the deployment (client error, cancel)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._failures = 0
        self._change(BreakerState.OPEN)

    def _change(self, state: BreakerState) -> None:
        if state is BreakerState.CLOSED:
            self._probes = 0
        log.warning("circuit breaker %s: %s -> %s", self.name, self.state.value, state.value)
        self.state = state
