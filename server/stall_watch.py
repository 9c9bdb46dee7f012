"""How long a caller may leave its stream unread, watched the same way on both edges.

Each edge writes a stream's messages with a write that waits while the
caller's side is full: grpc.aio's `context.write` until HTTP/2 flow control
lets the message go, uvicorn's ASGI `send` until the socket's buffer drains.
While it waits, the edge asks the upstream for nothing more, so an unread
stream holds what is already buffered, not the rest of the answer.

A StallWatch times those waits. When one write has waited
`server.stalled_stream_timeout_s`, the watch cancels the call's task, and
`watching` turns that cancellation into StalledReaderError (DEADLINE_EXCEEDED,
reason STALLED_READER): the call is recorded with that reason, the upstream
closed, and the status follows the bytes already sent, for a caller that
reads again later. A caller reading slowly is never cut: only a write
that waits the whole limit counts. The watch costs one timer per limit
period while a stream flows, not one per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from contextvars import ContextVar

from server.errors import StalledReaderError


class StallWatch:
    """Cancels the task it was made in when one write waits longer than `limit_s`."""

    __slots__ = ("_limit", "_loop", "_since", "_task", "_timer", "stalled")

    def __init__(self, limit_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._limit = limit_s
        self._since: float | None = None  # when the write waiting now began
        self._timer: asyncio.TimerHandle | None = None
        self.stalled = False

    async def write(self, sending: Awaitable[None]) -> None:
        """Awaits `sending`, a write the caller's side paces."""
        self._since = since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(since + self._limit, self._check)
        try:
            await sending
        finally:
            self._since = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # between writes: the next write sets the timer again
        due = since + self._limit
        if self._loop.time() >= due:
            self.stalled = True
            self._task.cancel("stalled reader")
        else:
            self._timer = self._loop.call_at(due, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# The watch of the stream the current task writes (set by `watching` for the
# HTTP edge's StreamWriter, which writes for the call that HttpCalls runs).
CURRENT_WATCH: ContextVar[StallWatch | None] = ContextVar("llmgateway_stall_watch", default=None)


@asynccontextmanager
async def watching(limit_s: float) -> AsyncIterator[StallWatch | None]:
    """A StallWatch for the writes inside (None when `limit_s` is 0: never).

    Raises StalledReaderError, instead of the CancelledError its watch caused,
    when a write inside waited `limit_s`.
    """
    if not limit_s:
        yield None
        return
    watch = StallWatch(limit_s)
    token = CURRENT_WATCH.set(watch)
    try:
        yield watch
    except asyncio.CancelledError:
        if not watch.stalled:
            raise
        watch._task.uncancel()
        raise StalledReaderError(
            f"the stream was not read for {limit_s:g} s (server.stalled_stream_timeout_s)",
            metadata={"stalled_stream_timeout_s": f"{limit_s:g}"},
        ) from None
    finally:
        watch.close()
        CURRENT_WATCH.reset(token)
