"""OpenAI's Responses API events -> the gateway's events, for a relayed call's accounting.

The gateway calls OpenAI through Chat Completions (_openai_codec.py); it
meets the Responses API only when the HTTP front door relays a client's
`POST /v1/responses` verbatim (Codex CLI). The client gets the upstream's
bytes; the gateway reads the same events into its own, to know when content
starts (the router retries only before it), who served, what was produced
and the usage to bill: `response.created` opens the message, output items
open and close blocks (a message's text, a function call's arguments, a
reasoning summary), and `response.completed` (or `incomplete`) carries the
usage. Input token counts include the cached ones, as in Chat Completions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from server.errors import UpstreamStreamInterruptedError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.providers._sse import JSON_STRING, string_text
from server.schema import StopReason, TextBlock, ThinkingBlock, ToolUseBlock, Usage

_FINISHED = frozenset({"response.completed", "response.incomplete"})

# A response.output_text.delta event's data as OpenAI writes it (spaces
# optional): its type, one output index and one delta.
_TEXT_TYPE = re.compile(rb'"type": ?"response\.output_text\.delta"')
_OUTPUT_INDEX = re.compile(rb'"output_index": ?(\d+)[,}]')
_DELTA = re.compile(rb'"delta": ?' + JSON_STRING)


def text_delta(data: bytes) -> tuple[int, str] | None:
    """The output index and text of a text delta event, read by a pattern instead
    of parsed (most events of a streamed answer), or None: the event must be
    parsed. Each key must appear once (a quote inside a JSON string is escaped,
    so `"delta"` there is a key, or a whole string of that text, which only
    sends the event to be parsed)."""
    if data.count(b'"type"') != 1 or data.count(b'"output_index"') != 1:
        return None
    if data.count(b'"delta"') != 1 or _TEXT_TYPE.search(data) is None:
        return None
    index = _OUTPUT_INDEX.search(data)
    delta = _DELTA.search(data)
    if index is None or delta is None:
        return None
    text = string_text(delta[1])
    return None if text is None else (int(index[1]), text)


def usage_of(raw: Mapping[str, Any] | None) -> Usage | None:
    if not raw:
        return None
    details = raw.get("input_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    # input_tokens counts the cached and written ones too: ours are disjoint.
    return Usage(
        input_tokens=max(0, (raw.get("input_tokens") or 0) - cached - written),
        output_tokens=raw.get("output_tokens") or 0,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=written,
    )


class ResponsesStreamDecoder:
    """Turns Responses API stream events (their JSON data) into gateway events."""

    __slots__ = ("_blocks", "_done", "_model", "_next", "_provider", "_request_id", "_upstream")

    def __init__(
        self, *, provider: str, model: str, request_id: str, upstream_request_id: str
    ) -> None:
        self._provider = provider
        self._model = model
        self._request_id = request_id
        self._upstream = upstream_request_id
        self._blocks: dict[int, int] = {}  # output_index -> block index
        self._next = 0
        self._done = False

    def text(self, output_index: Any, text: str) -> list[StreamEvent]:
        """The events of a response.output_text.delta event (parsed, or read by
        `text_delta`)."""
        block_index = self._blocks.get(output_index)
        return [] if block_index is None else [TextDelta(block_index, text)]

    def feed(self, data: Mapping[str, Any]) -> list[StreamEvent]:
        kind = data.get("type")
        if kind == "response.created":
            response = data.get("response") or {}
            return [
                MessageStart(
                    id=response.get("id") or "",
                    model=self._model,
                    provider=self._provider,
                    request_id=self._request_id,
                    upstream_request_id=self._upstream,
                )
            ]
        if kind == "response.output_item.added":
            item = data.get("item") or {}
            block: TextBlock | ThinkingBlock | ToolUseBlock
            item_type = item.get("type")
            if item_type == "function_call":
                block = ToolUseBlock(id=item.get("call_id") or "", name=item.get("name") or "")
            elif item_type == "reasoning":
                block = ThinkingBlock()
            elif item_type == "message":
                block = TextBlock("")
            else:
                return []
            index = self._blocks[data.get("output_index", len(self._blocks))] = self._next
            self._next += 1
            return [ContentBlockStart(index, block)]
        if kind == "response.output_text.delta":
            return self.text(data.get("output_index", -1), data.get("delta") or "")
        if kind == "response.function_call_arguments.delta":
            block_index = self._blocks.get(data.get("output_index", -1))
            delta = data.get("delta") or ""
            return [] if block_index is None else [ToolInputDelta(block_index, delta)]
        if kind == "response.reasoning_summary_text.delta":
            block_index = self._blocks.get(data.get("output_index", -1))
            delta = data.get("delta") or ""
            return [] if block_index is None else [ThinkingDelta(block_index, delta)]
        if kind == "response.output_item.done":
            closed = self._blocks.pop(data.get("output_index", -1), None)
            return [] if closed is None else [ContentBlockStop(closed)]
        if kind in _FINISHED:
            self._done = True
            response = data.get("response") or {}
            stop = StopReason.END_TURN
            if response.get("status") == "incomplete":
                stop = StopReason.MAX_TOKENS
            elif any(
                (item or {}).get("type") == "function_call" for item in response.get("output") or ()
            ):
                stop = StopReason.TOOL_USE
            closing: list[StreamEvent] = [ContentBlockStop(i) for i in self._blocks.values()]
            self._blocks.clear()
            usage = usage_of(response.get("usage"))
            return [*closing, MessageDelta(stop_reason=stop, usage=usage), MessageStop()]
        return []

    def finish(self) -> None:
        """Raises when the upstream ended the stream before the response finished."""
        if not self._done:
            raise UpstreamStreamInterruptedError(
                f"provider {self._provider} ended the stream before the response completed",
                metadata={"provider": self._provider, "upstream_request_id": self._upstream},
            )


def response_as_events(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole (non-streamed) Response as the stream events that would carry it."""
    events: list[dict[str, Any]] = [{"type": "response.created", "response": response}]
    for position, item in enumerate(response.get("output") or ()):
        events.append(
            {"type": "response.output_item.added", "output_index": position, "item": item}
        )
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "output_text":
                    events.append(
                        {
                            "type": "response.output_text.delta",
                            "output_index": position,
                            "delta": part.get("text") or "",
                        }
                    )
        elif item.get("type") == "function_call":
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "output_index": position,
                    "delta": item.get("arguments") or "",
                }
            )
        events.append({"type": "response.output_item.done", "output_index": position})
    events.append({"type": "response.completed", "response": response})
    return events
