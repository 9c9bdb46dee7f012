"""Generation calls in flight in this process: a bound, a short wait, then a refusal.

Every generation call takes a slot before anything else is done for it,
on either edge: the gRPC overload interceptor (interceptors/overload.py) and
the HTTP front door (server/http_edge/calls.py) share one OverloadGate. With
all `server.max_concurrent_calls` slots taken, a new call waits for one, in
order of arrival, for at most `server.max_queue_s`, and is then refused with
GatewayOverloadedError (UNAVAILABLE, RetryInfo): a caller hears at once that
this replica is full, its call recorded like any refusal, instead of waiting
on a saturated event loop until its deadline. Per-key limits (call_gate.py)
come after this gate: a call refused here spends none of its key's quota.
"""

from __future__ import annotations

import asyncio
from collections import deque

from server.errors import GatewayOverloadedError
from server.loop_turns import COUNTED_CALL

# When a slot frees up is unknown: suggest retrying this soon (or elsewhere).
OVERLOAD_RETRY_S = 1.0


class OverloadGate:
    """At most `max_calls` calls in flight; beyond them, a wait of `max_wait_s`."""

    def __init__(self, max_calls: int, max_wait_s: float) -> None:
        self.max_calls = max_calls  # 0: no limit
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        # Calls waiting for a slot, first come first served; a slot is handed
        # over (in_flight unchanged) by setting the waiter's result.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.refused = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self) -> GatewayOverloadedError | None:
        """Takes a slot, waiting up to `max_wait_s` for one, or says why not.
        A call with a slot is counted among the calls heavy work pauses for
        (server/loop_turns.py)."""
        if not self.max_calls or (self.in_flight < self.max_calls and not self._waiting):
            self.in_flight += 1
            COUNTED_CALL.set(True)
            return None
        refused = await self._wait()
        if refused is None:
            COUNTED_CALL.set(True)
        return refused

    async def _wait(self) -> GatewayOverloadedError | None:
        """Waits for a slot handed over, or says why not."""
        # Waiters are bounded as calls are: past that, the wait would be long anyway.
        if self.max_wait_s > 0 and len(self._waiting) < self.max_calls:
            slot = asyncio.get_running_loop().create_future()
            self._waiting.append(slot)
            try:
                async with asyncio.timeout(self.max_wait_s):
                    await slot
            except TimeoutError:
                if slot.done() and not slot.cancelled():
                    return None  # handed a slot as the time ran out
            except asyncio.CancelledError:
                if slot.done() and not slot.cancelled():
                    self.leave()  # handed a slot as the caller left: pass it on
                raise
            else:
                return None
            finally:
                if not slot.done():  # not handed a slot: leave the line
                    slot.cancel()
                    self._waiting.remove(slot)
        self.refused += 1
        return GatewayOverloadedError(
            f"the gateway is serving its limit of {self.max_calls} calls"
            f" (server.max_concurrent_calls); retry in {OVERLOAD_RETRY_S:g} s or on another"
            " replica",
            retry_after=OVERLOAD_RETRY_S,
            metadata={"max_concurrent_calls": str(self.max_calls)},
        )

    def leave(self) -> None:
        """Gives a slot back: to the longest waiting call, if any, else to the pool."""
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.in_flight -= 1
