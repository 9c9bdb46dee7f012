"""Folds StreamGenerate events into the response Generate would have returned.

The gateway builds its Generate response by folding the same events on the
server (server/events.py, over its internal types); this is the client's
fold over the protobuf events, so a caller that streams for latency still
ends up with one complete GenerateResponse. It depends on the contract only.
`result()` is that response as the client returns it (clients/response.py),
with each tool call's input read from its JSON, integers intact.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import struct_pb2

from llmgateway.v1 import generation_pb2 as pb

from .response import Response

__all__ = ["StreamAccumulator"]


class StreamAccumulator:
    """Add events in order; `text` is the text so far, `response()` the final message.

    accumulator = StreamAccumulator()
    for event in events:
        delta = accumulator.add(event)     # the text this event added ("" if none)
    response = accumulator.response()
    """

    def __init__(self) -> None:
        self._response = pb.GenerateResponse()
        self._blocks: dict[int, pb.ContentBlock] = {}
        self._tool_json: dict[int, list[str]] = {}
        self._tool_inputs: dict[int, dict[str, Any]] = {}
        self._text: list[str] = []
        self.finished = False  # True once MessageStop arrived

    @property
    def text(self) -> str:
        """The text of every text block so far, joined."""
        return "".join(self._text)

    def add(self, event: pb.StreamGenerateResponse) -> str:
        """Folds in one event and returns the text it added."""
        kind = event.WhichOneof("event")
        if kind == "message_start":
            start = event.message_start
            self._response.id = start.id
            self._response.model = start.model
            self._response.provider = start.provider
            self._response.request_id = start.request_id
            self._response.upstream_request_id = start.upstream_request_id
            self._response.usage.CopyFrom(start.usage)
            if start.HasField("routing"):
                self._response.routing.CopyFrom(start.routing)
        elif kind == "content_block_start":
            block = pb.ContentBlock()
            block.CopyFrom(event.content_block_start.content_block)
            self._blocks[event.content_block_start.index] = block
            if block.HasField("text") and block.text:
                self._text.append(block.text)
                return block.text
        elif kind == "content_block_delta":
            return self._add_delta(event.content_block_delta)
        elif kind == "content_block_stop":
            self._finish_block(event.content_block_stop.index)
        elif kind == "message_delta":
            delta = event.message_delta
            self._response.stop_reason = delta.stop_reason
            self._response.stop_sequence = delta.stop_sequence
            # Cumulative, as the contract says: each MessageDelta replaces the last.
            if delta.HasField("usage"):
                self._response.usage.CopyFrom(delta.usage)
            if delta.HasField("cost"):
                self._response.cost.CopyFrom(delta.cost)
        elif kind == "message_stop":
            self.finished = True
        return ""

    def _add_delta(self, delta: pb.ContentBlockDelta) -> str:
        block = self._blocks.setdefault(delta.index, pb.ContentBlock())
        kind = delta.WhichOneof("delta")
        if kind == "text":
            block.text += delta.text
            self._text.append(delta.text)
            return delta.text
        if kind == "tool_input_json":
            self._tool_json.setdefault(delta.index, []).append(delta.tool_input_json)
        elif kind == "thinking":
            block.thinking.text += delta.thinking
        elif kind == "thinking_signature":
            block.thinking.signature = delta.thinking_signature
        return ""

    def _finish_block(self, index: int) -> None:
        fragments = self._tool_json.pop(index, None)
        block = self._blocks.get(index)
        if fragments and block is not None and block.HasField("tool_use"):
            # The fragments of a block form one JSON object (the contract's promise).
            value = json.loads("".join(fragments))
            self._tool_inputs[index] = value
            struct = struct_pb2.Struct()
            struct.update(value)
            block.tool_use.input.CopyFrom(struct)

    def response(self) -> pb.GenerateResponse:
        """The response folded so far: complete once `finished` is True."""
        response = pb.GenerateResponse()
        response.CopyFrom(self._response)
        for index in sorted(self._blocks):
            response.content.append(self._blocks[index])
        return response

    def result(self) -> Response:
        """`response()` as the client returns it: stop reason by name, tool inputs as sent."""
        inputs = {
            position: self._tool_inputs[index]
            for position, index in enumerate(sorted(self._blocks))
            if index in self._tool_inputs
        }
        return Response(self.response(), inputs)
