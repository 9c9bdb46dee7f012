"""Internal events and responses as Anthropic's Messages API answers them.

The HTTP front door's encoder for a translated call (a model served by
OpenAI, an OpenAI-compatible server or the offline models): StreamEncoder
turns the internal stream into Anthropic's server-sent events, and
encode_message a whole response into its Message JSON. A pass-through call
never comes here: its upstream's bytes are relayed as they came.

Anthropic's stream is stricter than ours: one content block open at a time,
indexes contiguous from 0, one message_delta once the last block is stopped.
The encoder keeps to it whatever the upstream does (the OpenAI decoder keeps
thinking, text and tool blocks open together and stops them all at the end):
a block that starts closes the one open; text or thinking resumed after
another block opens a new block of its kind; a delta for a block never
started, or already stopped, is dropped; the open block is closed before
message_delta; of several MessageDelta only the last is sent, at the end.
A turn holding a tool use ends "tool_use" (OpenAI-compatible servers may say
"stop"), unless it was cut short (max_tokens, the context window): a
truncated tool input must not pass for a complete one.

It runs once per streamed chunk: each block's delta prefix is built once,
and a delta costs one string escape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from server.errors import UpstreamProtocolError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.schema import (
    ContentBlock,
    GenerationResponse,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)

STOP_REASONS: dict[StopReason, str] = {
    StopReason.END_TURN: "end_turn",
    StopReason.MAX_TOKENS: "max_tokens",
    StopReason.STOP_SEQUENCE: "stop_sequence",
    StopReason.TOOL_USE: "tool_use",
    StopReason.REFUSAL: "refusal",
    StopReason.CONTENT_FILTER: "refusal",
    StopReason.PAUSE_TURN: "pause_turn",
    StopReason.CONTEXT_WINDOW_EXCEEDED: "model_context_window_exceeded",
}
# Reasons that say the answer was cut short: kept even when a tool use began.
_TRUNCATED = frozenset({StopReason.MAX_TOKENS, StopReason.CONTEXT_WINDOW_EXCEEDED})

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_TEXT, _TOOL_USE, _THINKING, _REDACTED = "text", "tool_use", "thinking", "redacted_thinking"
_EMPTY_STARTS = {
    _TEXT: '{"type":"text","text":""}',
    _THINKING: '{"type":"thinking","thinking":"","signature":""}',
}
_TEXT_DELTA = b'{"type":"text_delta","text":'
_JSON_DELTA = b'{"type":"input_json_delta","partial_json":'
_THINKING_DELTA = b'{"type":"thinking_delta","thinking":'
_SIGNATURE_DELTA = b'{"type":"signature_delta","signature":'
_DELTA_END = b"}}\n\n"
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def ping_event() -> bytes:
    """The keep-alive event a stream sends while the upstream is silent."""
    return _PING


def error_event(error_type: str, message: str, *, request_id: str = "") -> bytes:
    """An `event: error` (e.g. `overloaded_error`): the last event of a failed stream."""
    data: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        data["request_id"] = request_id
    return _event("error", data)


def anthropic_stop_reason(reason: StopReason | None, *, tool_use: bool) -> str:
    """Anthropic's stop_reason for ours; `tool_use`: the answer holds a tool use."""
    if tool_use and reason not in _TRUNCATED:
        return "tool_use"
    if reason is None:
        return "end_turn"
    return STOP_REASONS[reason]


def message_id(upstream_id: str) -> str:
    """An id shaped like Anthropic's (`msg_...`)."""
    if upstream_id.startswith("msg_"):
        return upstream_id
    return f"msg_{upstream_id or os.urandom(12).hex()}"


def usage_json(usage: Usage) -> dict[str, int]:
    """Anthropic's usage: the input counts are disjoint, as ours are."""
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "output_tokens": usage.output_tokens,
    }


def encode_message(response: GenerationResponse, *, model: str | None = None) -> dict[str, Any]:
    """A whole response as the Message JSON of a non-streamed answer.

    `model` replaces the response's own in the answer (the name the caller
    used, say). Blocks an answer cannot hold (images, tool results) are left out.
    """
    content = []
    tool_use = False
    for block in response.content:
        encoded = _answer_block(block)
        if encoded is not None:
            content.append(encoded)
            tool_use = tool_use or isinstance(block, ToolUseBlock)
    return {
        "id": message_id(response.id),
        "type": "message",
        "role": "assistant",
        "model": model or response.model,
        "content": content,
        "stop_reason": anthropic_stop_reason(response.stop_reason, tool_use=tool_use),
        "stop_sequence": response.stop_sequence or None,
        "usage": usage_json(response.usage),
    }


def _answer_block(block: ContentBlock) -> dict[str, Any] | None:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if isinstance(block, ToolUseBlock):
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    if isinstance(block, ThinkingBlock):
        if block.redacted_data:
            return {"type": "redacted_thinking", "data": block.redacted_data}
        return {"type": "thinking", "thinking": block.text, "signature": block.signature}
    return None


@dataclass(slots=True)
class _Block:
    """One internal block, and the wire block that carries it now."""

    kind: str  # one of _TEXT ... _REDACTED; "" for a block no answer can hold
    wire: int = -1  # its index on the wire; -1 before it is sent
    stopped: bool = False
    prefix: bytes = b""  # `event: content_block_delta` up to `"delta":`


class StreamEncoder:
    """Internal stream events, in order, as the bytes of Anthropic's SSE stream.

    `feed` returns the bytes to write for one event (b"" when there are none
    yet); `finish` those still owed when the internal stream ended without
    MessageStop (nothing when message_start was never sent: the caller
    then owes an error). `model` replaces MessageStart's in message_start.
    """

    __slots__ = (
        "_blocks",
        "_done",
        "_final",
        "_model",
        "_next_wire",
        "_open",
        "_started",
        "_tool_use",
        "_usage",
    )

    def __init__(self, *, model: str | None = None) -> None:
        self._model = model
        self._started = False
        self._done = False
        self._blocks: dict[int, _Block] = {}  # internal index -> its block
        self._open: _Block | None = None  # the one block open on the wire
        self._next_wire = 0
        self._tool_use = False
        self._usage = Usage()
        self._final: MessageDelta | None = None

    @property
    def started(self) -> bool:
        """Whether message_start was written (an error must then be an event)."""
        return self._started

    @property
    def done(self) -> bool:
        """Whether message_stop was written."""
        return self._done

    def feed(self, event: StreamEvent) -> bytes:
        """The bytes to write for `event`; UpstreamProtocolError if it cannot be expressed."""
        # Most frequent first: this runs for every chunk.
        if isinstance(event, TextDelta):
            return self._delta(event.index, _TEXT, _TEXT_DELTA, event.text)
        if isinstance(event, ToolInputDelta):
            return self._delta(event.index, _TOOL_USE, _JSON_DELTA, event.partial_json)
        if isinstance(event, ThinkingDelta):
            return self._delta(event.index, _THINKING, _THINKING_DELTA, event.text)
        if isinstance(event, SignatureDelta):
            return self._delta(event.index, _THINKING, _SIGNATURE_DELTA, event.signature)
        if isinstance(event, ContentBlockStart):
            return self._start(event.index, event.block)
        if isinstance(event, ContentBlockStop):
            return self._stop(event.index)
        if isinstance(event, MessageDelta):
            # Cumulative: the last one says it all; it goes out at the end.
            self._final = event
            return b""
        if isinstance(event, MessageStart):
            return self._message_start(event)
        if isinstance(event, MessageStop):
            return self.finish()
        return b""  # a pass-through's raw bytes: not for a translated answer

    def finish(self) -> bytes:
        """The bytes still owed to end the stream: closing block, message_delta, message_stop."""
        if not self._started or self._done:
            return b""
        self._done = True
        final = self._final
        reason = anthropic_stop_reason(
            final.stop_reason if final else None, tool_use=self._tool_use
        )
        usage = final.usage if final is not None and final.usage is not None else self._usage
        data = {
            "type": "message_delta",
            "delta": {
                "stop_reason": reason,
                "stop_sequence": (final.stop_sequence if final else "") or None,
            },
            "usage": usage_json(usage),
        }
        return self._close_open() + _event("message_delta", data) + _MESSAGE_STOP

    def _message_start(self, event: MessageStart) -> bytes:
        if self._started:
            return b""
        self._started = True
        self._usage = event.usage or Usage()
        message: dict[str, Any] = {
            "id": message_id(event.id),
            "type": "message",
            "role": "assistant",
            "model": self._model or event.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(self._usage),
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _start(self, index: int, block: ContentBlock) -> bytes:
        if not self._started or self._done or index in self._blocks:
            return b""
        if isinstance(block, TextBlock):
            entry = _Block(_TEXT)
            out = self._open_wire(entry, _EMPTY_STARTS[_TEXT])
            if block.text:  # Anthropic starts a text block empty: the text follows
                out += self._delta(index, _TEXT, _TEXT_DELTA, block.text, entry)
        elif isinstance(block, ToolUseBlock):
            self._tool_use = True
            entry = _Block(_TOOL_USE)
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            out = self._open_wire(entry, _JSON.encode(start))
            if block.input:
                out += self._delta(index, _TOOL_USE, _JSON_DELTA, _JSON.encode(block.input), entry)
        elif isinstance(block, ThinkingBlock) and block.redacted_data:
            entry = _Block(_REDACTED)
            start = {"type": "redacted_thinking", "data": block.redacted_data}
            out = self._open_wire(entry, _JSON.encode(start))
        elif isinstance(block, ThinkingBlock):
            entry = _Block(_THINKING)
            out = self._open_wire(entry, _EMPTY_STARTS[_THINKING])
            if block.text:
                out += self._delta(index, _THINKING, _THINKING_DELTA, block.text, entry)
            if block.signature:
                out += self._delta(index, _THINKING, _SIGNATURE_DELTA, block.signature, entry)
        else:  # an image or a tool result: no answer holds one; its events are dropped
            self._blocks[index] = _Block("", stopped=True)
            return b""
        self._blocks[index] = entry
        return out

    def _delta(
        self, index: int, kind: str, head: bytes, value: str, block: _Block | None = None
    ) -> bytes:
        if block is None:
            block = self._blocks.get(index)
            if block is None or block.kind != kind or block.stopped or self._done or not value:
                return b""
        out = b""
        if block is not self._open:
            # Closed when another block started: resume it in a new block of its
            # kind. A tool input cannot be split across blocks.
            if kind == _TOOL_USE:
                raise UpstreamProtocolError(
                    f"tool input for block {index} came after another block started"
                )
            out = self._open_wire(block, _EMPTY_STARTS[kind])
        return b"".join((out, block.prefix, head, _escape(value), _DELTA_END))

    def _stop(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None or block.stopped:
            return b""
        block.stopped = True
        return self._close_open() if block is self._open else b""

    def _open_wire(self, block: _Block, content_block: str) -> bytes:
        """Closes the open block and starts `block` on the wire with `content_block`."""
        out = self._close_open()
        wire = self._next_wire
        self._next_wire += 1
        block.wire = wire
        block.prefix = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":'
            % wire
        )
        self._open = block
        start = (
            'event: content_block_start\ndata: {"type":"content_block_start",'
            f'"index":{wire},"content_block":{content_block}}}\n\n'
        )
        return out + start.encode("utf-8", "backslashreplace")

    def _close_open(self) -> bytes:
        block = self._open
        if block is None:
            return b""
        self._open = None
        return (
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
            % block.wire
        )


def _escape(value: str) -> bytes:
    # backslashreplace turns a lone surrogate (which UTF-8 cannot hold) into
    # its JSON escape: it can only occur inside a JSON string.
    return _JSON.encode(value).encode("utf-8", "backslashreplace")


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {_JSON.encode(data)}\n\n".encode("utf-8", "backslashreplace")
