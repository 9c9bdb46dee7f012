"""Anthropic Messages API <-> the gateway's types: the request out, the events back.

`request_arguments` turns a GenerationRequest into keyword arguments for
`AsyncAnthropic.messages.create` (sent through `client.post`, see
`post_arguments` in _upstream.py); `MessagesStreamDecoder` turns the raw
stream events (the wire format's JSON objects) into the gateway's
StreamEvents, one for one, as they arrive. Rules where the two do not meet
one to one:

- thinking: a model with `thinking: budget` gets `{type: enabled,
  budget_tokens}` (at least 1024, as Anthropic requires); one with
  `thinking: adaptive` (Claude 5 models, where a budget is a 400) gets
  `{type: adaptive}` and the budget is not sent: max_tokens bounds thinking
  and answer together there. `provider_options.output_config.effort`
  steers adaptive thinking.
- temperature/top_p/top_k go in the body when the model accepts them and
  are refused with INVALID_ARGUMENT when it does not (Claude 5 models); the
  SDK no longer types them, so they travel in `extra_body`.
- cache_control: `{type: ephemeral}`, with a TTL rounded up to one Anthropic
  supports (5m, else 1h).
- Server-tool blocks (web search results and the like) are not in the
  contract and are skipped; the gateway's block indexes stay contiguous.
- Usage is cumulative in `message_delta`: each one replaces the last, and a
  count it leaves out keeps its `message_start` value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.errors import FieldViolation, UpstreamStreamInterruptedError
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
from server.providers._upstream import image_base64
from server.schema import (
    CacheControl,
    ContentBlock,
    GenerationRequest,
    ImageBlock,
    Message,
    StopReason,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolChoiceMode,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

MIN_THINKING_BUDGET = 1024

STOP_REASONS: Mapping[str, StopReason] = {
    "end_turn": StopReason.END_TURN,
    "max_tokens": StopReason.MAX_TOKENS,
    "stop_sequence": StopReason.STOP_SEQUENCE,
    "tool_use": StopReason.TOOL_USE,
    "pause_turn": StopReason.PAUSE_TURN,
    "refusal": StopReason.REFUSAL,
    "model_context_window_exceeded": StopReason.CONTEXT_WINDOW_EXCEEDED,
}


# -- Request -------------------------------------------------------------------


def cache_control(cache: CacheControl) -> dict[str, str]:
    if cache.ttl_seconds is None:
        return {"type": "ephemeral"}
    return {"type": "ephemeral", "ttl": "5m" if cache.ttl_seconds <= 300 else "1h"}


def content_block(block: ContentBlock) -> dict[str, Any]:
    out: dict[str, Any]
    if isinstance(block, TextBlock):
        out = {"type": "text", "text": block.text}
    elif isinstance(block, ImageBlock):
        if block.url is not None:
            out = {"type": "image", "source": {"type": "url", "url": block.url}}
        else:
            data = image_base64(block.data or b"")  # a large image's written in steps
            source = {"type": "base64", "media_type": block.media_type, "data": data}
            out = {"type": "image", "source": source}
    elif isinstance(block, ToolUseBlock):
        out = {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    elif isinstance(block, ToolResultBlock):
        out = {
            "type": "tool_result",
            "tool_use_id": block.tool_use_id,
            "content": [content_block(b) for b in block.content],
        }
        if block.is_error:
            out["is_error"] = True
    elif block.redacted_data:
        out = {"type": "redacted_thinking", "data": block.redacted_data}
    else:
        out = {"type": "thinking", "thinking": block.text, "signature": block.signature}
    if block.cache_control is not None:
        out["cache_control"] = cache_control(block.cache_control)
    return out


def messages(conversation: list[Message]) -> list[dict[str, Any]]:
    return [
        {"role": m.role.value, "content": [content_block(b) for b in m.content]}
        for m in conversation
    ]


def tools(declared: list[Tool]) -> list[dict[str, Any]]:
    out = []
    for tool in declared:
        entry: dict[str, Any] = {
            "name": tool.name,
            "input_schema": tool.input_schema or {"type": "object", "properties": {}},
        }
        if tool.description:
            entry["description"] = tool.description
        out.append(entry)
    return out


def tool_choice(choice: ToolChoice) -> dict[str, Any]:
    out: dict[str, Any] = {"type": choice.mode.value}
    if choice.mode is ToolChoiceMode.TOOL:
        out["name"] = choice.tool_name
    if choice.disable_parallel_tool_use and choice.mode is not ToolChoiceMode.NONE:
        out["disable_parallel_tool_use"] = True
    return out


def request_arguments(
    request: GenerationRequest, upstream_model: str, thinking_mode: str | None
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """`messages.create` keyword arguments (sampling and options excepted)."""
    violations: list[FieldViolation] = []
    kwargs: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": request.max_tokens,
        "messages": messages(request.messages),
    }
    if request.system:
        kwargs["system"] = [content_block(b) for b in request.system]
    if request.tools:
        kwargs["tools"] = tools(request.tools)
        if request.tool_choice is not None:
            kwargs["tool_choice"] = tool_choice(request.tool_choice)
    if request.stop_sequences:
        kwargs["stop_sequences"] = request.stop_sequences
    if request.metadata.end_user_id:
        kwargs["metadata"] = {"user_id": request.metadata.end_user_id}
    budget = request.thinking_budget_tokens
    if budget is not None:
        if thinking_mode == "adaptive":
            kwargs["thinking"] = {"type": "adaptive"}
        elif budget < MIN_THINKING_BUDGET:
            violations.append(
                FieldViolation(
                    "thinking.budget_tokens",
                    f"must be at least {MIN_THINKING_BUDGET} for Anthropic models",
                )
            )
        else:
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
    return kwargs, violations


# -- Stream --------------------------------------------------------------------
# The raw events are the JSON objects of the wire format, as the SDK parsed
# them (see post_arguments in _upstream.py): plain dicts, read with .get()
# where the API may leave a field out.


def _usage(raw: Mapping[str, Any] | None, previous: Usage | None = None) -> Usage:
    """Anthropic usage as ours; counts `raw` leaves out keep their `previous` value."""
    base = previous or Usage()
    raw = raw or {}
    input_tokens = raw.get("input_tokens")
    output_tokens = raw.get("output_tokens")
    cache_read = raw.get("cache_read_input_tokens")
    cache_write = raw.get("cache_creation_input_tokens")
    return Usage(
        input_tokens=base.input_tokens if input_tokens is None else input_tokens,
        output_tokens=base.output_tokens if output_tokens is None else output_tokens,
        cache_read_input_tokens=base.cache_read_input_tokens if cache_read is None else cache_read,
        cache_creation_input_tokens=(
            base.cache_creation_input_tokens if cache_write is None else cache_write
        ),
    )


# The field that carries each kind of delta's value.
_DELTA_FIELDS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
    "signature_delta": "signature",
}


class MessagesStreamDecoder:
    """Turns raw Messages stream events into gateway events, one at a time."""

    __slots__ = (
        "_blocks",
        "_model",
        "_provider",
        "_request_id",
        "_stopped",
        "_upstream_request_id",
        "_usage",
    )

    def __init__(
        self, *, provider: str, model: str, request_id: str, upstream_request_id: str
    ) -> None:
        self._provider = provider
        self._model = model
        self._request_id = request_id
        self._upstream_request_id = upstream_request_id
        # upstream block index -> ours, for the blocks the contract has
        self._blocks: dict[int, int] = {}
        self._usage: Usage | None = None
        self._stopped = False

    def feed(self, raw: Mapping[str, Any]) -> StreamEvent | None:
        """The gateway event for one raw event, or None when it has none."""
        kind = raw.get("type")
        # Most frequent first: this runs for every chunk.
        if kind == "content_block_delta":
            delta = raw.get("delta") or {}
            delta_kind = delta.get("type")
            field = _DELTA_FIELDS.get(delta_kind) if isinstance(delta_kind, str) else None
            if field is None:
                return None  # citations and deltas of blocks the contract lacks
            return self.delta(raw.get("index", -1), str(delta_kind), delta.get(field) or "")
        if kind == "content_block_start":
            block = _start_block(raw.get("content_block") or {})
            if block is None:
                return None
            started = len(self._blocks)
            self._blocks[raw.get("index", -1)] = started
            return ContentBlockStart(started, block)
        if kind == "content_block_stop":
            stopped = self._blocks.get(raw.get("index", -1))
            return None if stopped is None else ContentBlockStop(stopped)
        if kind == "message_start":
            message = raw.get("message") or {}
            self._usage = _usage(message.get("usage"))
            return MessageStart(
                id=message.get("id") or "",
                model=self._model,
                provider=self._provider,
                request_id=self._request_id,
                upstream_request_id=self._upstream_request_id,
                usage=self._usage,
            )
        if kind == "message_delta":
            # Cumulative: replace, never add.
            self._usage = _usage(raw.get("usage"), self._usage)
            delta = raw.get("delta") or {}
            reason = delta.get("stop_reason")
            return MessageDelta(
                stop_reason=STOP_REASONS.get(reason) if reason else None,
                stop_sequence=delta.get("stop_sequence") or "",
                usage=self._usage,
            )
        if kind == "message_stop":
            self._stopped = True
            return MessageStop()
        return None

    def delta(self, upstream_index: object, kind: str, value: str) -> StreamEvent | None:
        """The event of a content_block_delta already read: its block's upstream
        index, its delta's type and the value of that type's field (_DELTA_FIELDS)."""
        ours = self._blocks.get(upstream_index)  # type: ignore[call-overload]
        if ours is None:
            return None
        if kind == "text_delta":
            return TextDelta(ours, value)
        if kind == "input_json_delta":
            return ToolInputDelta(ours, value)
        if kind == "thinking_delta":
            return ThinkingDelta(ours, value)
        if kind == "signature_delta":
            return SignatureDelta(ours, value)
        return None

    def finish(self) -> None:
        """Checks the stream ended properly once the upstream has no more events."""
        if not self._stopped:
            raise UpstreamStreamInterruptedError(
                f"provider {self._provider} ended the stream before message_stop",
                metadata={
                    "provider": self._provider,
                    "upstream_request_id": self._upstream_request_id,
                },
            )


def _start_block(raw: Mapping[str, Any]) -> ContentBlock | None:
    kind = raw.get("type")
    if kind == "text":
        return TextBlock(raw.get("text") or "")
    if kind == "tool_use":
        return ToolUseBlock(id=raw.get("id") or "", name=raw.get("name") or "")
    if kind == "thinking":
        return ThinkingBlock(text=raw.get("thinking") or "", signature=raw.get("signature") or "")
    if kind == "redacted_thinking":
        return ThinkingBlock(redacted_data=raw.get("data") or "")
    return None


def message_as_raw_events(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A complete (non-streaming) Message as the raw stream events that deliver it.

    Generate makes one non-streaming call; replaying its result through
    MessagesStreamDecoder keeps a single translation path for both RPCs.
    """
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        deltas: list[dict[str, Any]]
        if kind == "text":
            start: Mapping[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": block.get("text") or ""}]
        elif kind == "tool_use":
            start = {"type": "tool_use", "id": block.get("id"), "name": block.get("name")}
            arguments = json.dumps(block.get("input") or {})
            deltas = [{"type": "input_json_delta", "partial_json": arguments}]
        elif kind == "thinking":
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [
                {"type": "thinking_delta", "thinking": block.get("thinking") or ""},
                {"type": "signature_delta", "signature": block.get("signature") or ""},
            ]
        else:  # redacted thinking carries its data in the start; others are dropped
            start, deltas = block, []
        events.append({"type": "content_block_start", "index": index, "content_block": start})
        events.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
        events.append({"type": "content_block_stop", "index": index})
    delta = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    events.append({"type": "message_delta", "delta": delta, "usage": message.get("usage")})
    events.append({"type": "message_stop"})
    return events
