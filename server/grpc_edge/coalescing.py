"""Merges stream deltas that are already waiting, so a busy stream sends fewer messages.

grpc.aio spends about 0.1 ms of CPU per streamed message however small it
is (bench/ceiling_server.py measures it), which dominates a gateway that
forwards one token per message. Once the first content has gone out, a
pump task reads the upstream event stream into a small bounded queue while
the previous message is being sent; the sender then merges the consecutive
deltas of one content block that are already queued (text, tool-input JSON,
thinking) into one event. Before it, the events are read and sent one by
one, without the pump (nothing is read ahead of the first content).

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


_Mergeable = TextDelta | ToolInputDelta | ThinkingDelta


def _part(event: _Mergeable) -> str:
    """What a mergeable delta adds to its block."""
    return event.partial_json if isinstance(event, ToolInputDelta) else event.text


def _merged(first: _Mergeable, parts: list[str]) -> _Mergeable:
    """`first` with the parts of the deltas that follow it (one join, not one per delta)."""
    joined = "".join(parts)
    if isinstance(first, TextDelta):
        return TextDelta(first.index, joined)
    if isinstance(first, ToolInputDelta):
        return ToolInputDelta(first.index, joined)
    return ThinkingDelta(first.index, joined)


async def coalesce(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Yields `events` in order, merging mergeable deltas that are already waiting.

    Until the first content has gone out (time to first token) the events are
    read here, one at a time, each sent before the next is read: parsing the
    next upstream events would only hold up the messages before it, and the
    preamble (a MessageStart, a block's start, the first delta) arrives at
    once, so a pump would only add hops. After it, a pump task reads ahead
    freely so a backlog merges. Errors from `events` are raised here after
    the events before them. Closing this iterator (the caller went away)
    closes `events`, and so the upstream call (after the first content, by
    cancelling the pump, which closes them).
    """
    task: asyncio.Task[None] | None = None
    try:
        async for event in events:
            yield event
            if isinstance(event, _MERGEABLE):
                break
        else:
            return
        queue: asyncio.Queue[StreamEvent | _Failed | _End] = asyncio.Queue(QUEUE_SIZE)
        task = asyncio.get_running_loop().create_task(_pump(events, queue))
        pending: StreamEvent | _Failed | _End | None = None
        while True:
            item = pending if pending is not None else await queue.get()
            pending = None
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            if isinstance(item, _MERGEABLE):
                kind, parts = type(item), [_part(item)]
                while not queue.empty():
                    following = queue.get_nowait()
                    # A delta of the same kind and block merges; anything else waits.
                    if type(following) is not kind or following.index != item.index:
                        pending = following
                        break
                    parts.append(_part(following))
                if len(parts) > 1:
                    item = _merged(item, parts)
            yield item
    finally:
        if task is None:
            await _close(events)
        else:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _pump(
    events: AsyncIterator[StreamEvent], queue: asyncio.Queue[StreamEvent | _Failed | _End]
) -> None:
    """Reads the rest of `events` into `queue` while the sender sends; closes them."""
    try:
        async for event in events:
            await queue.put(event)
        await queue.put(_END)
    except asyncio.CancelledError:
        raise
    except BaseException as err:  # forwarded to the sender, which raises it
        await queue.put(_Failed(err))
    finally:
        await _close(events)


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
