"""Work that grows with a request's size, in steps that take turns on the event loop.

Both edges and the core serve every call on one event loop (server/app.py),
so CPU work that grows with a request (counting a long text's tokens,
parsing a large JSON body) stops every other call while it runs: one 25 MiB
request froze the gateway for 1.5 s (issue 17). Such work runs in steps of
about a millisecond inside `taking_turns`: one step at a time in the
process, however many calls have such work, with a few turns of the loop
for the other calls after each step (each await of a call that suspends is
a turn, and even a small call takes several). A step cannot be cut short:
the work bounds its own steps (server/token_estimate.py counts a slice of
text per step; server/json_members.py parses a JSON body a top-level value,
or an element of a top-level array, per step, so only one value larger than
that, bounded by `http.max_body_bytes`, is one step).

Turns alone are not enough: a turn runs only what is ready at that moment,
and much of what other calls wait for is not ready yet, because it must first
reach the loop from another thread. grpc's completion thread hands the loop
each finished receive and send, and it needs the GIL to do so, which the
loop's thread releases only while it waits on its sockets. So the heavy work
of all calls together holds the loop for at most WORK_S at a stretch (to the
end of the step that passes it); then it pauses, the loop waiting on its
sockets and timers for at least PAUSE_S and a quarter as long as the stretch
worked, and the other calls' data and completions come in and are served.
A block of heavy work that follows heavy work of its own, unchecked (grpc's
copies of a large request, the join of a large HTTP body), begins with such
a pause (`pause_first`). Heavy work then takes at most about four fifths of
the loop's time, and a probe call waits behind less of it (five 8 MiB gRPC
requests at once: the probe's slowest call of a burst, median of 11 warm
bursts, 14-17 ms against 19-22 ms with turns alone; bench/stall_probe.py).

The pauses are for the other calls: when the gateway counts its calls in
flight (`count_calls_with`: both edges' generation calls,
server/accounting/overload_gate.py) and none is in flight but those doing
heavy work, the work goes on without pausing, so a long prompt's estimate on
an idle gateway takes no longer; a call that arrives meanwhile is counted,
and the stretch then ends in a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar

# The turns the loop has to itself after each step.
TURNS_BETWEEN_STEPS = 4
# The heavy work of all calls holds the loop at most this long at a stretch
# (to the end of the step that passes it; see the module's doc) ...
WORK_S = 0.004
# ... then leaves it to the other calls for at least this long, and for at
# least PAUSE_SHARE of the time the stretch worked.
PAUSE_S = 0.001
PAUSE_SHARE = 0.25

# Whether the current call is among those `count_calls_with` counts (set when
# it is admitted: server/accounting/overload_gate.py).
COUNTED_CALL: ContextVar[bool] = ContextVar("counted_call", default=False)

# Whether the current call's request is large, over a MiB (set by the gRPC edge
# when it parses one in a step, interceptors/malformed_request.py, and by the
# HTTP edge's read_json): the gRPC servicer then decodes it in a step of its
# own, and a provider writes its upstream body in steps
# (server/providers/_upstream.py request_content).
LARGE_REQUEST: ContextVar[bool] = ContextVar("large_request", default=False)


class _Turns:
    """The loop's heavy work: one step at a time, the time worked since the last
    pause, and the counted calls doing heavy work (holding the turn or waiting)."""

    __slots__ = ("calls_in_flight", "counted", "lock", "worked")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.worked = 0.0
        self.counted = 0
        self.calls_in_flight: Callable[[], int] | None = None

    def others(self) -> bool:
        """Whether calls other than those doing heavy work may be waiting
        (unknown, when the calls in flight are not counted: then yes)."""
        count = self.calls_in_flight
        return count is None or count() > self.counted


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = weakref.WeakKeyDictionary()


def _turns() -> _Turns:
    loop = asyncio.get_running_loop()
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = _Turns()
    return turns


def count_calls_with(
    calls_in_flight: Callable[[], int] | None,
    *,
    counted_by: Callable[[], int] | None = None,
) -> None:
    """How to count the calls in flight on this event loop (None: not counted,
    and heavy work always pauses after a stretch); with `counted_by`, only if
    that is how they are counted now (a gateway that stops leaves another's
    count alone)."""
    turns = _turns()
    if counted_by is None or turns.calls_in_flight == counted_by:
        turns.calls_in_flight = calls_in_flight


async def _others_turns() -> None:
    for _ in range(TURNS_BETWEEN_STEPS):
        await asyncio.sleep(0)


async def _pause(seconds: float) -> None:
    """Leaves the loop to the other calls for `seconds`, waiting on its sockets."""
    await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def taking_turns(
    *, pause_first: bool = False
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Holds the process's turn for heavy work; the work awaits the function
    it is given between two steps, and the block's end closes the last step.
    `pause_first`: the call has just done heavy work of its own, unchecked
    (grpc's copies of a large request, the join of a large HTTP body), and
    pauses before its first step."""
    turns = _turns()
    lock = turns.lock
    counted = COUNTED_CALL.get()
    turns.counted += counted
    held = False
    try:
        if pause_first and turns.others():
            await _pause(PAUSE_S)
        held = await lock.acquire()
        step_started = time.perf_counter()

        async def end_step() -> None:
            """The turns, or the pause, that follow a step (the lock held)."""
            turns.worked += time.perf_counter() - step_started
            if turns.worked < WORK_S:
                await _others_turns()
                return
            worked, turns.worked = turns.worked, 0.0
            if turns.others():
                await _pause(max(PAUSE_S, worked * PAUSE_SHARE))
            else:
                await _others_turns()

        async def next_step() -> None:
            nonlocal held, step_started
            await end_step()
            held = False
            lock.release()
            await asyncio.sleep(0)  # a waiting call's work takes the next step
            held = await lock.acquire()
            step_started = time.perf_counter()

        yield next_step
        await end_step()
    finally:
        turns.counted -= counted
        if held:
            lock.release()
