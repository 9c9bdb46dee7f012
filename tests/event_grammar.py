"""A checker of the gateway's own stream grammar, for streaming tests of the gRPC edge.

`check_event_stream` takes StreamGenerate's events (the protobuf
StreamGenerateResponse messages, or the internal server.events objects a
provider yields) and fails (AssertionError) unless they follow the contract
of the proto's StreamEvent comments, on which the HTTP front door's
translation relies:

    message_start
    ( content_block_start(i)  content_block_delta(i)*  content_block_stop(i) )*   # i = 0, 1, 2...
    message_delta?  message_stop

Every block is started, filled and stopped before the next starts; deltas
go only to the open block and are of its kind; a tool use's input
fragments add up to a JSON object. `partial=True` accepts a prefix (a
stream that ended with an error status).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llmgateway.v1 import generation_pb2 as pb
from server import events as internal
from server.schema import TextBlock, ThinkingBlock, ToolUseBlock

# Block kind -> the delta kinds it may receive.
BLOCK_DELTAS = {
    "text": {"text"},
    "tool_use": {"tool_input_json"},
    # Redacted thinking too: a thinking block with its data and no deltas.
    "thinking": {"thinking", "thinking_signature"},
}

# (kind, index, block or delta kind, payload)
Step = tuple[str, int, str, str]


def _step(event: Any) -> Step:
    """An event, of either form, as (kind, index, block or delta kind, payload)."""
    if isinstance(event, pb.StreamGenerateResponse):
        kind = str(event.WhichOneof("event"))
        if kind == "content_block_start":
            start = event.content_block_start
            return kind, start.index, str(start.content_block.WhichOneof("block")), ""
        if kind == "content_block_delta":
            delta = event.content_block_delta
            which = str(delta.WhichOneof("delta"))
            return kind, delta.index, which, str(getattr(delta, which))
        if kind == "content_block_stop":
            return kind, event.content_block_stop.index, "", ""
        return kind, -1, "", ""
    if isinstance(event, internal.MessageStart):
        return "message_start", -1, "", ""
    if isinstance(event, internal.ContentBlockStart):
        block = event.block
        name = {TextBlock: "text", ThinkingBlock: "thinking", ToolUseBlock: "tool_use"}.get(
            type(block), "other"
        )
        return "content_block_start", event.index, name, ""
    if isinstance(event, internal.TextDelta):
        return "content_block_delta", event.index, "text", event.text
    if isinstance(event, internal.ToolInputDelta):
        return "content_block_delta", event.index, "tool_input_json", event.partial_json
    if isinstance(event, internal.ThinkingDelta):
        return "content_block_delta", event.index, "thinking", event.text
    if isinstance(event, internal.SignatureDelta):
        return "content_block_delta", event.index, "thinking_signature", event.signature
    if isinstance(event, internal.ContentBlockStop):
        return "content_block_stop", event.index, "", ""
    if isinstance(event, internal.MessageDelta):
        return "message_delta", -1, "", ""
    if isinstance(event, internal.MessageStop):
        return "message_stop", -1, "", ""
    raise AssertionError(f"not a stream event: {event!r}")


def check_event_stream(events: Sequence[Any], *, partial: bool = False) -> None:
    """Fails unless `events` follow the stream grammar (a prefix of it when `partial`)."""
    steps = [_step(e) for e in events if not isinstance(e, internal.RawChunk)]
    shown = [f"{kind}({index})" if index >= 0 else kind for kind, index, _, _ in steps]
    where = " ".join(shown)
    assert steps, "an empty stream"
    assert steps[0][0] == "message_start", f"does not begin with message_start: {where}"
    open_block: tuple[int, str] | None = None
    tool_input: list[str] = []
    next_index = 0
    state = "blocks"  # then "delta" (after message_delta), then "stopped"
    for position, (kind, index, which, payload) in enumerate(steps[1:], start=1):
        at = f"event {position} ({shown[position]}) of: {where}"
        assert state != "stopped", f"an event after message_stop: {at}"
        if kind == "content_block_start":
            assert state == "blocks", f"a block after message_delta: {at}"
            assert open_block is None, f"block {index} starts before {open_block} stops: {at}"
            assert index == next_index, f"block {index} starts, {next_index} expected: {at}"
            assert which in BLOCK_DELTAS, f"unknown block kind {which!r}: {at}"
            open_block, next_index, tool_input = (index, which), next_index + 1, []
        elif kind == "content_block_delta":
            assert open_block is not None and open_block[0] == index, (
                f"a delta to block {index}, which is not open: {at}"
            )
            assert which in BLOCK_DELTAS[open_block[1]], (
                f"a {which} delta to a {open_block[1]} block: {at}"
            )
            if which == "tool_input_json":
                tool_input.append(payload)
        elif kind == "content_block_stop":
            assert open_block is not None and open_block[0] == index, (
                f"block {index} stops but is not open: {at}"
            )
            if open_block[1] == "tool_use" and tool_input:
                document = json.loads("".join(tool_input))
                assert isinstance(document, dict), f"tool input is not an object: {at}"
            open_block = None
        elif kind == "message_delta":
            assert open_block is None, f"message_delta with block {open_block} open: {at}"
            state = "delta"
        elif kind == "message_stop":
            assert open_block is None, f"message_stop with block {open_block} open: {at}"
            state = "stopped"
        else:
            raise AssertionError(f"unexpected {kind}: {at}")
    if not partial:
        assert state == "stopped", f"does not end with message_stop: {where}"
