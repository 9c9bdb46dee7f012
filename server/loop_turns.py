"""Work that grows with a request's size, in steps that take turns on the event loop.

Both edges and the core serve every call on one event loop (server/app.py),
so CPU work that grows with a request (counting a long text's tokens,
parsing a large JSON body) stops every other call while it runs: one 25 MiB
request froze the gateway for 1.5 s (issue 17). Such work runs in steps of
about a millisecond inside `taking_turns`: one step at a time in the
process, however many calls have such work, and after each step the loop
has a few turns to itself, in which the other calls go on (each await of a
call that suspends is a turn, and even a small call takes several). A step
cannot be cut short: the work bounds its own steps (server/token_estimate.py
counts a slice of text per step; server/json_members.py parses a JSON body a
top-level value, or an element of a top-level array, per step, so only one
value larger than that, bounded by `http.max_body_bytes`, is one step).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar

# The turns the loop has to itself after each step.
TURNS_BETWEEN_STEPS = 4

# Whether the current call's request is large (set by the gRPC edge when it
# parses one in a step, interceptors/malformed_request.py): its decoding then
# takes a step of its own as well.
LARGE_REQUEST: ContextVar[bool] = ContextVar("large_request", default=False)

_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _LOCKS.get(loop)
    if lock is None:
        lock = _LOCKS[loop] = asyncio.Lock()
    return lock


async def _others_turns() -> None:
    for _ in range(TURNS_BETWEEN_STEPS):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def taking_turns() -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Holds the process's turn for heavy work; the work awaits the function
    it is given between two steps, and the block's end closes the last step."""
    lock = _lock()
    held: bool = await lock.acquire()

    async def next_step() -> None:
        nonlocal held
        await _others_turns()
        held = False
        lock.release()
        await asyncio.sleep(0)  # a waiting call's work takes the next step
        held = await lock.acquire()

    try:
        yield next_step
        await _others_turns()
    finally:
        if held:
            lock.release()
