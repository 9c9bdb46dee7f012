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
a pause (`pause_first`). Heavy work then takes at most about four fifths of the
loop's time, and a probe call waits behind less of it (five 8 MiB gRPC
requests at once: the probe's slowest call of a burst, median of 11 warm
bursts, 14-17 ms against 19-22 ms with turns alone; bench/stall_probe.py).
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

# Whether the current call's request is large (set by the gRPC edge when it
# parses one in a step, interceptors/malformed_request.py): its decoding then
# takes a step of its own as well.
LARGE_REQUEST: ContextVar[bool] = ContextVar("large_request", default=False)


class _Turns:
    """The loop's heavy work: one step at a time, and the time worked since the last pause."""

    __slots__ = ("lock", "worked")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.worked = 0.0


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = weakref.WeakKeyDictionary()


def _turns() -> _Turns:
    loop = asyncio.get_running_loop()
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = _Turns()
    return turns


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
    if pause_first:
        await _pause(PAUSE_S)
    held: bool = await lock.acquire()
    step_started = time.perf_counter()

    async def end_step() -> None:
        """The turns, or the pause, that follow a step (the lock held)."""
        turns.worked += time.perf_counter() - step_started
        if turns.worked < WORK_S:
            await _others_turns()
            return
        pause = max(PAUSE_S, turns.worked * PAUSE_SHARE)
        turns.worked = 0.0
        await _pause(pause)

    async def next_step() -> None:
        nonlocal held, step_started
        await end_step()
        held = False
        lock.release()
        await asyncio.sleep(0)  # a waiting call's work takes the next step
        held = await lock.acquire()
        step_started = time.perf_counter()

    try:
        yield next_step
        await end_step()
    finally:
        if held:
            lock.release()
