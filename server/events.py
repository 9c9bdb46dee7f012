"""Stream events, and the one function that folds them into a response.

Providers yield these typed events; StreamGenerate forwards them and
Generate folds them with ResponseAccumulator, so the two RPCs share one code
path and cannot drift. Usage and cost in MessageDelta are cumulative: each
one replaces the previous, never adds to it (Anthropic's `message_delta`
usage works this way).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TypeAlias

from server.errors import UpstreamProtocolError
from server.schema import (
    ContentBlock,
    Cost,
    GenerationResponse,
    Pricing,
    RoutingDecision,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)


@dataclass(slots=True)
class MessageStart:
    id: str
    model: str
    provider: str
    request_id: str = ""
    upstream_request_id: str = ""
    usage: Usage | None = None
    # Set by the router when it chose the model for an alias (smart routing).
    routing: RoutingDecision | None = None
    # Set by the router: the serving deployment's prices, for the accounting of
    # a call that ends before its final usage (not sent to the caller).
    pricing: Pricing | None = None


@dataclass(slots=True)
class ContentBlockStart:
    """Opens block `index`: empty text or thinking, or a tool use with id and name."""

    index: int
    block: ContentBlock


@dataclass(slots=True)
class TextDelta:
    index: int
    text: str


@dataclass(slots=True)
class ToolInputDelta:
    """A fragment of a tool use's input JSON."""

    index: int
    partial_json: str


@dataclass(slots=True)
class ThinkingDelta:
    index: int
    text: str


@dataclass(slots=True)
class SignatureDelta:
    index: int
    signature: str


@dataclass(slots=True)
class ContentBlockStop:
    index: int


@dataclass(slots=True)
class MessageDelta:
    stop_reason: StopReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None
    cost: Cost | None = None


@dataclass(slots=True)
class MessageStop:
    pass


@dataclass(slots=True)
class RawChunk:
    """Bytes of the upstream's answer, as they came, for a pass-through call.

    A provider serving a Passthrough request yields them besides the typed
    events (which the gateway reads for its accounting): one per SSE event,
    or the whole body of a non-streamed answer. Only the edge that asked
    writes them; folding a stream ignores them.
    """

    data: bytes


StreamEvent: TypeAlias = (
    MessageStart
    | ContentBlockStart
    | TextDelta
    | ToolInputDelta
    | ThinkingDelta
    | SignatureDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | RawChunk
)


class ResponseAccumulator:
    """Folds stream events, in order, into the GenerationResponse they describe."""

    __slots__ = ("_blocks", "_json_parts", "_response")

    def __init__(self) -> None:
        self._response: GenerationResponse | None = None
        self._blocks: dict[int, ContentBlock] = {}
        self._json_parts: dict[int, list[str]] = {}

    def add(self, event: StreamEvent) -> None:
        """Applies one event; raises UpstreamProtocolError on an impossible sequence."""
        if isinstance(event, TextDelta):
            block = self._block(event.index)
            if not isinstance(block, TextBlock):
                raise UpstreamProtocolError(f"text delta for non-text block {event.index}")
            block.text += event.text
        elif isinstance(event, ToolInputDelta):
            if not isinstance(self._block(event.index), ToolUseBlock):
                raise UpstreamProtocolError(f"tool input delta for non-tool block {event.index}")
            self._json_parts.setdefault(event.index, []).append(event.partial_json)
        elif isinstance(event, ThinkingDelta | SignatureDelta):
            block = self._block(event.index)
            if not isinstance(block, ThinkingBlock):
                raise UpstreamProtocolError(f"thinking delta for non-thinking block {event.index}")
            if isinstance(event, ThinkingDelta):
                block.text += event.text
            else:
                block.signature += event.signature
        elif isinstance(event, ContentBlockStart):
            if event.index in self._blocks:
                raise UpstreamProtocolError(f"content block {event.index} started twice")
            # A copy: the fold must not change the event it was given.
            block = dataclasses.replace(event.block)
            self._started().content.append(block)
            self._blocks[event.index] = block
        elif isinstance(event, ContentBlockStop):
            block = self._block(event.index)
            parts = self._json_parts.pop(event.index, None)
            if parts is not None and isinstance(block, ToolUseBlock):
                block.input = _parse_tool_input("".join(parts), event.index)
        elif isinstance(event, MessageStart):
            if self._response is not None:
                raise UpstreamProtocolError("message started twice")
            self._response = GenerationResponse(
                id=event.id,
                model=event.model,
                provider=event.provider,
                request_id=event.request_id,
                upstream_request_id=event.upstream_request_id,
                usage=event.usage or Usage(),
                routing=event.routing,
            )
        elif isinstance(event, MessageDelta):
            response = self._started()
            if event.stop_reason is not None:
                response.stop_reason = event.stop_reason
                response.stop_sequence = event.stop_sequence
            if event.usage is not None:
                response.usage = event.usage
            if event.cost is not None:
                response.cost = event.cost

    def result(self) -> GenerationResponse:
        """The response folded so far."""
        return self._started()

    def _started(self) -> GenerationResponse:
        if self._response is None:
            raise UpstreamProtocolError("event before message start")
        return self._response

    def _block(self, index: int) -> ContentBlock:
        try:
            return self._blocks[index]
        except KeyError:
            raise UpstreamProtocolError(f"event for unopened content block {index}") from None


def _parse_tool_input(raw: str, index: int) -> dict[str, object]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise UpstreamProtocolError(f"tool input of block {index} is not valid JSON") from err
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"tool input of block {index} is not a JSON object")
    return value


async def fold(events: AsyncIterable[StreamEvent]) -> GenerationResponse:
    """Consumes a whole stream and returns the response it describes."""
    accumulator = ResponseAccumulator()
    async for event in events:
        accumulator.add(event)
    return accumulator.result()
