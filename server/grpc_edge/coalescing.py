"""Merges stream deltas that are already waiting, so a busy stream sends fewer messages.

grpc.aio spends about 0.1 ms of CPU per streamed message however small it
is (bench/ceiling_server.py measures it), which dominates a gateway that
forwards one token per message. Here a pump task reads the upstream event
stream into a small bounded queue while the previous message is being
sent; the sender then merges the consecutive deltas of one content block
that are already queued (text, tool-input JSON, thinking) into one event.

Nothing is delayed to wait for a merge: a delta goes out as soon as the
sender is free, alone if nothing else is queued, so an upstream that is
slower than the gateway (every real model) sees one message per delta as
before. The concatenation of deltas, and so the folded response, is
unchanged. The bounded queue keeps backpressure: a slow caller slows the
upstream read, as without the pump.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.events import StreamEvent, TextDelta, ThinkingDelta, ToolInputDelta

# Enough to absorb a burst (a whole response arriving in one TCP read)
# without letting an unread upstream run far ahead of the caller.
QUEUE_SIZE = 64


@dataclass(slots=True)
class _Failed:
    error: BaseException


class _End:
    pass


_END = _End()


_MERGEABLE = (TextDelta, ToolInputDelta, ThinkingDelta)


def _merged(first: StreamEvent, second: StreamEvent) -> StreamEvent | None:
    """`first` and `second` as one event, or None when they do not merge."""
    if isinstance(first, TextDelta) and isinstance(second, TextDelta):
        if first.index == second.index:
            return TextDelta(first.index, first.text + second.text)
    elif isinstance(first, ToolInputDelta) and isinstance(second, ToolInputDelta):
        if first.index == second.index:
            return ToolInputDelta(first.index, first.partial_json + second.partial_json)
    elif (
        isinstance(first, ThinkingDelta)
        and isinstance(second, ThinkingDelta)
        and first.index == second.index
    ):
        return ThinkingDelta(first.index, first.text + second.text)
    return None


async def coalesce(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Yields `events` in order, merging mergeable deltas that are already waiting.

    Errors from `events` are raised here after the events before them.
    Closing this iterator (the caller went away) cancels the pump, which
    closes `events` and so the upstream call.
    """
    queue: asyncio.Queue[StreamEvent | _Failed | _End] = asyncio.Queue(QUEUE_SIZE)
    first_content_sent = asyncio.Event()

    async def pump() -> None:
        try:
            async for event in events:
                await queue.put(event)
                if not first_content_sent.is_set():
                    # Time to first token: until the first content has gone out,
                    # let the sender run after every event, and once that content
                    # is queued read nothing more (parsing the next upstream
                    # events would only hold up the messages before it). After
                    # it, read ahead freely so a backlog merges.
                    if isinstance(event, _MERGEABLE):
                        await first_content_sent.wait()
                    else:
                        await asyncio.sleep(0)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # forwarded to the sender, which raises it
            await queue.put(_Failed(err))
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    task = asyncio.get_running_loop().create_task(pump())
    pending: StreamEvent | _Failed | _End | None = None
    try:
        while True:
            item = pending if pending is not None else await queue.get()
            pending = None
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            while not queue.empty():
                following = queue.get_nowait()
                if isinstance(following, _End | _Failed):
                    pending = following
                    break
                merged = _merged(item, following)
                if merged is None:
                    pending = following
                    break
                item = merged
            if isinstance(item, _MERGEABLE):
                first_content_sent.set()
            yield item
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
