"""A checker of Anthropic's Messages stream grammar, for every streaming test of the front door.

`check_anthropic_stream` parses the SSE bytes a client received and fails
(AssertionError) unless they follow the grammar the official SDKs and Claude
Code rely on:

    ping* message_start
    ( content_block_start  content_block_delta*  content_block_stop )*   # index 0, 1, 2...
    message_delta?  message_stop

with pings allowed at any event boundary, an `error` event allowed at any
boundary as the last event, each event's name equal to its data's `type`,
deltas only for the open block and of its kind, and a tool use's input
fragments adding up to a JSON object. `partial=True` accepts a stream cut
anywhere (a client that disconnected): a prefix of the grammar, its last
incomplete event ignored.
"""

from __future__ import annotations

import json
from typing import Any

# Block type -> the delta types it may receive.
BLOCK_DELTAS = {
    "text": {"text_delta", "citations_delta"},
    "tool_use": {"input_json_delta"},
    "server_tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "redacted_thinking": set(),
}
# Delta type -> the string field it carries.
DELTA_FIELDS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
    "signature_delta": "signature",
}
STOP_REASONS = {
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
}
USAGE_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)

Event = tuple[str, dict[str, Any]]


def parse_sse(raw: bytes, *, partial: bool = False) -> list[Event]:
    """The (event name, data) pairs of an SSE body; `partial`: drop a last incomplete event."""
    raw = raw.replace(b"\r\n", b"\n")
    end = raw.rfind(b"\n\n") + 2 if b"\n\n" in raw else 0
    tail = raw[end:]  # what follows the last blank line: an event cut short
    if tail.strip(b"\n"):
        assert partial, f"the stream ends inside an event: {tail[:200]!r}"
    # Decoded only up to the cut, which may fall inside a UTF-8 character.
    chunks = raw[:end].decode("utf-8").split("\n\n")
    events: list[Event] = []
    for chunk in chunks:
        name, data_lines = None, []
        for line in chunk.split("\n"):
            if not line or line.startswith(":"):
                continue  # a comment
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data_lines.append(value)
            else:
                assert field in ("id", "retry"), f"unknown SSE field in {line!r}"
        if name is None and not data_lines:
            continue
        assert name is not None, f"an event without a name: {chunk!r}"
        assert data_lines, f"event {name!r} has no data"
        data = json.loads("\n".join(data_lines))
        assert isinstance(data, dict), f"event {name!r}: data is not a JSON object"
        assert data.get("type") == name, f"event {name!r} carries data of type {data.get('type')!r}"
        events.append((name, data))
    return events


def check_anthropic_stream(raw: bytes, *, partial: bool = False) -> list[Event]:
    """Parses `raw` and asserts Anthropic's stream grammar; returns every event, pings included."""
    events = parse_sse(raw, partial=partial)
    grammar = _Grammar()
    for position, (name, data) in enumerate(events):
        assert not grammar.ended, f"event {position} ({name}) follows the end of the stream"
        grammar.step(position, name, data)
    if not partial:
        assert grammar.ended, "the stream ends without message_stop or an error event"
    return events


class _Grammar:
    """The state of a stream being checked: where it is, and the open block."""

    def __init__(self) -> None:
        self.started = False
        self.ended = False
        self.delta_seen = False
        self.next_index = 0
        self.open_index: int | None = None
        self.open_kind = ""
        self.tool_input: list[str] = []

    def step(self, position: int, name: str, data: dict[str, Any]) -> None:
        where = f"event {position} ({name})"
        if name == "ping":
            return
        if name == "error":
            error = data.get("error")
            assert isinstance(error, dict), f"{where}: no error object"
            assert isinstance(error.get("type"), str), f"{where}: the error has no type"
            assert isinstance(error.get("message"), str), f"{where}: the error has no message"
            self.ended = True
            return
        if name == "message_start":
            assert not self.started, f"{where}: a second message_start"
            _check_message(where, data.get("message"))
            self.started = True
            return
        assert self.started, f"{where} before message_start"
        if name == "content_block_start":
            assert not self.delta_seen, f"{where}: a block starts after message_delta"
            assert self.open_index is None, f"{where}: block {self.open_index} is still open"
            assert data.get("index") == self.next_index, (
                f"{where}: index {data.get('index')!r}, expected {self.next_index}"
            )
            block = data.get("content_block")
            assert isinstance(block, dict), f"{where}: no content_block"
            _check_block_start(where, block)
            self.open_index, self.open_kind = self.next_index, block["type"]
            self.next_index += 1
            self.tool_input = []
        elif name == "content_block_delta":
            assert self.open_index is not None, f"{where}: no block is open"
            assert data.get("index") == self.open_index, (
                f"{where}: delta for block {data.get('index')!r}, open is {self.open_index}"
            )
            delta = data.get("delta")
            assert isinstance(delta, dict), f"{where}: no delta"
            kind = delta.get("type")
            assert kind in BLOCK_DELTAS.get(self.open_kind, set()), (
                f"{where}: a {kind!r} delta in a {self.open_kind!r} block"
            )
            field = DELTA_FIELDS.get(kind)
            if field is not None:
                assert isinstance(delta.get(field), str), f"{where}: {kind}.{field} is no string"
            if kind == "input_json_delta":
                self.tool_input.append(delta["partial_json"])
        elif name == "content_block_stop":
            assert self.open_index is not None, f"{where}: no block is open"
            assert data.get("index") == self.open_index, (
                f"{where}: stops block {data.get('index')!r}, open is {self.open_index}"
            )
            if self.open_kind in ("tool_use", "server_tool_use"):
                joined = "".join(self.tool_input)
                if joined:
                    tool_input = json.loads(joined)
                    assert isinstance(tool_input, dict), f"{where}: tool input is not an object"
            self.open_index = None
        elif name == "message_delta":
            assert self.open_index is None, f"{where}: block {self.open_index} is still open"
            assert not self.delta_seen, f"{where}: a second message_delta"
            delta = data.get("delta")
            assert isinstance(delta, dict), f"{where}: no delta"
            assert delta.get("stop_reason") in STOP_REASONS, (
                f"{where}: stop_reason {delta.get('stop_reason')!r}"
            )
            sequence = delta.get("stop_sequence")
            assert sequence is None or isinstance(sequence, str), f"{where}: stop_sequence"
            usage = data.get("usage")
            assert isinstance(usage, dict), f"{where}: no usage"
            assert _is_count(usage.get("output_tokens")), f"{where}: usage.output_tokens"
            self.delta_seen = True
        elif name == "message_stop":
            assert self.open_index is None, f"{where}: block {self.open_index} is still open"
            self.ended = True
        else:
            raise AssertionError(f"{where}: not an event of the Messages stream")


def _check_message(where: str, message: Any) -> None:
    assert isinstance(message, dict), f"{where}: no message"
    assert isinstance(message.get("id"), str), f"{where}: message.id"
    assert message["id"].startswith("msg_"), f"{where}: message.id {message['id']!r}"
    assert message.get("type") == "message", f"{where}: message.type"
    assert message.get("role") == "assistant", f"{where}: message.role"
    assert isinstance(message.get("model"), str), f"{where}: message.model"
    assert message.get("content") == [], f"{where}: message.content is not empty"
    assert message.get("stop_reason") is None, f"{where}: message.stop_reason is set"
    assert message.get("stop_sequence") is None, f"{where}: message.stop_sequence is set"
    usage = message.get("usage")
    assert isinstance(usage, dict), f"{where}: message.usage"
    for count in ("input_tokens", "output_tokens"):
        assert _is_count(usage.get(count)), f"{where}: message.usage.{count}"
    for count in USAGE_COUNTS[2:]:
        assert usage.get(count) is None or _is_count(usage[count]), f"{where}: usage.{count}"


def _check_block_start(where: str, block: dict[str, Any]) -> None:
    kind = block.get("type")
    assert isinstance(kind, str), f"{where}: the block has no type"
    if kind == "text":
        assert block.get("text") == "", f"{where}: a text block starts with text"
    elif kind == "tool_use":
        assert isinstance(block.get("id"), str), f"{where}: tool_use.id"
        assert block["id"], f"{where}: tool_use.id is empty"
        assert isinstance(block.get("name"), str), f"{where}: tool_use.name"
        assert block.get("input") == {}, f"{where}: a tool_use block starts with input"
    elif kind == "thinking":
        assert block.get("thinking") == "", f"{where}: a thinking block starts with thinking"
        assert block.get("signature", "") == "", f"{where}: a thinking block starts signed"
    elif kind == "redacted_thinking":
        assert isinstance(block.get("data"), str), f"{where}: redacted_thinking.data"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
