"""How long the router waits on one attempt (routing.retry in server/config.py).

Before its content starts, an attempt may be abandoned for the next
deployment, so it is bounded: a stream until its first content
(`first_token_timeout_s`), a unary call for its whole answer
(`unary_timeout_s`), and, when the caller has a deadline and another
deployment may follow, by the share of the time left that the fallback keeps
(`fallback_reserve`). After content, only the silence between two events is
bounded (`stream_idle_timeout_s`): a stream cut then ends with its error.

UpstreamWatch enforces these without a timer per event (an asyncio.timeout
around each read costs more than the router's other work on an event): one
timer that, when it fires, cancels the task only if it is still waiting on
the upstream past its bound, and otherwise moves itself to the new bound.
"""

from __future__ import annotations

import asyncio

from server.config import RetryConfig
from server.errors import UpstreamUnavailableError


class AttemptTimeoutError(UpstreamUnavailableError):
    """An attempt whose upstream said nothing within its bound: the deployment's
    failure (the breaker counts it), fallen back from before content."""

    reason = "UPSTREAM_TIMEOUT"


def content_bound(
    config: RetryConfig, incremental: bool, started: float, budget_end: float | None
) -> float | None:
    """When an attempt started at `started` must have produced its first content."""
    bound = config.first_token_timeout_s if incremental else config.unary_timeout_s
    ends = None if bound is None else started + bound
    if budget_end is not None:
        ends = budget_end if ends is None else min(ends, budget_end)
    return ends


def deployment_budget_end(
    config: RetryConfig, now: float, deadline: float | None, further: bool
) -> float | None:
    """Until when a deployment reached at `now` may try (its retries included) before
    its content starts: all of the caller's time left but the fallback's reserve."""
    if deadline is None or not further or config.fallback_reserve <= 0:
        return None
    return now + (deadline - now) * (1 - config.fallback_reserve)


class UpstreamWatch:
    """Cancels the task that waits on an upstream past a bound; one per attempt.

    `expect(by)` before each wait, `got()` after it; when a wait ends in
    CancelledError, `timed_out()` says whether this watch caused it (and
    then takes the cancellation back, as asyncio.timeout does).
    """

    __slots__ = ("_due", "_fired", "_handle", "_loop", "_task", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._waiting = False
        self._fired = False

    def expect(self, by: float) -> None:
        """The next wait on the upstream must end by `by` (loop time)."""
        self._due = by
        self._waiting = True
        self._task = asyncio.current_task()
        handle = self._handle
        # A timer due later than `by` is moved; one due earlier moves itself.
        if handle is None or handle.when() > by:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(by, self._check)

    def got(self) -> None:
        """The wait ended in time."""
        self._waiting = False

    def _check(self) -> None:
        self._handle = None
        if not self._waiting or self._task is None:
            return  # the next expect() sets a timer again
        if self._loop.time() < self._due:
            self._handle = self._loop.call_at(self._due, self._check)
            return
        self._fired = True
        self._task.cancel()

    def timed_out(self) -> bool:
        """Whether the CancelledError being handled is this watch's, not the caller's."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        self._waiting = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
