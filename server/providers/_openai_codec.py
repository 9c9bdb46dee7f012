"""OpenAI Chat Completions <-> the gateway's types: the request out, the events back.

`request_arguments` turns a GenerationRequest into keyword arguments for
`AsyncOpenAI.chat.completions.create` (sent through `client.post`, see
`post_arguments` in _upstream.py); `ChatStreamDecoder` turns streamed chunks
(the wire format's JSON objects) into the gateway's StreamEvents as they
arrive. Rules where the two do not meet one to one:

- system blocks become one `system` message; tool results become `tool`
  messages, placed before the rest of their user turn (OpenAI wants them
  right after the assistant's tool calls). A tool result holds only text
  on OpenAI (an image in one is refused) and has no error flag: an error
  result's text is sent as "Error: <text>".
- Thinking blocks in the history are dropped: Chat Completions takes no
  reasoning as input. Images in assistant turns are refused.
- max_tokens is sent as `max_completion_tokens` (or `max_tokens`, per the
  provider's `max_tokens_field`, for older OpenAI-compatible servers).
- top_k is not a Chat Completions parameter: refused with INVALID_ARGUMENT
  unless the model lists it in `sampling` (vLLM takes it in the body).
- thinking: a reasoning model gets `reasoning_effort` from the budget
  (< 4096 low, < 16384 medium, < 65536 high, else xhigh); the budget itself
  is not sent. Without thinking the model's default effort applies.
- cache_control becomes a `prompt_cache_breakpoint` (TTL 30m, or 12h when
  longer) on models with `cache_breakpoints` (GPT-5.6 and later); it is
  ignored elsewhere, where OpenAI caches prefixes by itself.
- The end-user id is sent as `safety_identifier`.
- Usage: `prompt_tokens` counts cached and cache-written tokens too; the
  gateway's input_tokens is what is left after both are taken out, so no
  token is counted twice.
- finish_reason `stop` is END_TURN even when a stop sequence matched:
  OpenAI does not say which. A refusal streams as text with REFUSAL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from server.errors import FieldViolation, UpstreamStreamInterruptedError
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
from server.json_members import Base64Text
from server.providers._sse import JSON_STRING, string_text
from server.providers._upstream import UnreadableAnswerError, image_base64
from server.schema import (
    CacheControl,
    GenerationRequest,
    ImageBlock,
    Message,
    Role,
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

FINISH_REASONS: Mapping[str, StopReason] = {
    "stop": StopReason.END_TURN,
    "length": StopReason.MAX_TOKENS,
    "tool_calls": StopReason.TOOL_USE,
    "function_call": StopReason.TOOL_USE,
    "content_filter": StopReason.CONTENT_FILTER,
}


def reasoning_effort(budget_tokens: int) -> str:
    if budget_tokens < 4096:
        return "low"
    if budget_tokens < 16384:
        return "medium"
    if budget_tokens < 65536:
        return "high"
    return "xhigh"


class _Encoder:
    """Builds the Chat Completions messages of one request, collecting refusals."""

    def __init__(self, cache_breakpoints: bool) -> None:
        self.cache_breakpoints = cache_breakpoints
        self.violations: list[FieldViolation] = []

    def text_part(self, block: TextBlock) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "text", "text": block.text}
        self.mark(part, block.cache_control)
        return part

    def image_part(self, block: ImageBlock) -> dict[str, Any]:
        url: str | Base64Text
        if block.url is not None:
            url = block.url
        else:
            # A large image's base64 is written in steps (request_content).
            url = image_base64(block.data or b"", f"data:{block.media_type};base64,")
        part: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
        self.mark(part, block.cache_control)
        return part

    def mark(self, part: dict[str, Any], cache: CacheControl | None) -> None:
        if cache is None or not self.cache_breakpoints:
            return
        breakpoint_: dict[str, str] = {"mode": "explicit"}
        if cache.ttl_seconds is not None:
            breakpoint_["ttl"] = "30m" if cache.ttl_seconds <= 1800 else "12h"
        part["prompt_cache_breakpoint"] = breakpoint_

    def system(self, blocks: list[TextBlock]) -> dict[str, Any]:
        if len(blocks) == 1 and blocks[0].cache_control is None:
            return {"role": "system", "content": blocks[0].text}
        return {"role": "system", "content": [self.text_part(b) for b in blocks]}

    def messages(self, conversation: list[Message]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, message in enumerate(conversation):
            if message.role is Role.USER:
                out.extend(self.user(message, f"messages[{i}]"))
            else:
                out.append(self.assistant(message, f"messages[{i}]"))
        return out

    def user(self, message: Message, path: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if isinstance(block, ToolResultBlock):
                out.append(self.tool_result(block, f"{path}.content[{j}].tool_result"))
            elif isinstance(block, TextBlock):
                parts.append(self.text_part(block))
            elif isinstance(block, ImageBlock):
                parts.append(self.image_part(block))
        if parts:
            # One unmarked text part goes as a plain string, which every
            # OpenAI-compatible server understands.
            plain = len(parts) == 1 and parts[0].keys() == {"type", "text"}
            out.append({"role": "user", "content": parts[0]["text"] if plain else parts})
        return out

    def tool_result(self, block: ToolResultBlock, path: str) -> dict[str, Any]:
        texts = []
        for k, inner in enumerate(block.content):
            if isinstance(inner, TextBlock):
                texts.append(inner.text)
            else:
                self.violations.append(
                    FieldViolation(f"{path}.content[{k}]", "OpenAI tool results hold only text")
                )
        text = "\n".join(texts)
        if block.is_error:
            text = f"Error: {text}"
        return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}

    def assistant(self, message: Message, path: str) -> dict[str, Any]:
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": json.dumps(block.input)},
                    }
                )
            elif isinstance(block, ImageBlock):
                self.violations.append(
                    FieldViolation(f"{path}.content[{j}]", "OpenAI assistant turns hold no images")
                )
            # ThinkingBlock: Chat Completions takes no reasoning as input.
        out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
        if calls:
            out["tool_calls"] = calls
        return out


def tools(declared: list[Tool]) -> list[dict[str, Any]]:
    out = []
    for tool in declared:
        function: dict[str, Any] = {
            "name": tool.name,
            "parameters": tool.input_schema or {"type": "object", "properties": {}},
        }
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.mode is ToolChoiceMode.TOOL:
        return {"type": "function", "function": {"name": choice.tool_name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.mode.value]


def request_arguments(
    request: GenerationRequest,
    upstream_model: str,
    *,
    reasoning: bool,
    cache_breakpoints: bool,
    max_tokens_field: str,
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """`chat.completions.create` keyword arguments (sampling and options excepted)."""
    encoder = _Encoder(cache_breakpoints)
    conversation = encoder.messages(request.messages)
    if request.system:
        conversation.insert(0, encoder.system(request.system))
    kwargs: dict[str, Any] = {
        "model": upstream_model,
        "messages": conversation,
        max_tokens_field: request.max_tokens,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        kwargs["tools"] = tools(request.tools)
        choice = request.tool_choice
        if choice is not None:
            kwargs["tool_choice"] = tool_choice(choice)
            if choice.disable_parallel_tool_use and choice.mode is not ToolChoiceMode.NONE:
                kwargs["parallel_tool_calls"] = False
    if request.stop_sequences:
        kwargs["stop"] = request.stop_sequences
    if request.metadata.end_user_id:
        kwargs["safety_identifier"] = request.metadata.end_user_id
    if request.thinking_budget_tokens is not None and reasoning:
        kwargs["reasoning_effort"] = reasoning_effort(request.thinking_budget_tokens)
    return kwargs, encoder.violations


# -- Stream --------------------------------------------------------------------
# Chunks are the JSON objects of the wire format, as the SDK parsed them (see
# post_arguments in _upstream.py): plain dicts, read with .get() where a
# field may be missing or null.


def usage_of(raw: Mapping[str, Any]) -> Usage:
    """OpenAI usage as ours: cached and cache-written tokens taken out of input."""
    details = raw.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    return Usage(
        input_tokens=max(0, (raw.get("prompt_tokens") or 0) - cached - written),
        output_tokens=raw.get("completion_tokens") or 0,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=written,
    )


class ChatStreamDecoder:
    """Turns Chat Completions chunks into gateway events.

    One block is open at a time, as the event contract says: a block of
    another kind, or the next tool call, stops the open block before it
    starts (text after a tool call opens a new text block); the finish
    reason stops the last one. A tool call's arguments continuing after the
    next call began cannot be told in order: an unreadable answer. The final
    MessageDelta waits for the usage-only chunk that follows the finish reason.
    """

    __slots__ = (
        "_finish",
        "_model",
        "_next",
        "_open_block",
        "_provider",
        "_refused",
        "_request_id",
        "_started",
        "_text",
        "_thinking",
        "_tool_blocks",
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
        self._started = False
        self._next = 0
        self._text: int | None = None
        self._thinking: int | None = None
        self._tool_blocks: dict[int, int] = {}  # tool call index -> block index
        self._open_block: int | None = None  # the one block started and not stopped
        self._finish: str | None = None
        self._refused = False
        self._usage: Usage | None = None

    def feed(self, chunk: Mapping[str, Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not self._started:
            self._started = True
            events.append(
                MessageStart(
                    id=chunk.get("id") or "",
                    model=self._model,
                    provider=self._provider,
                    request_id=self._request_id,
                    upstream_request_id=self._upstream_request_id,
                )
            )
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage_of(usage)
        for choice in chunk.get("choices") or ():
            if choice.get("index") == 0:
                self._choice(choice, events)
        return events

    def _choice(self, choice: Mapping[str, Any], events: list[StreamEvent]) -> None:
        delta = choice.get("delta")
        if delta is not None:
            # OpenAI-compatible servers (vLLM, Ollama) stream reasoning here.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                if self._thinking is None:
                    self._thinking = self._open(ThinkingBlock(), events)
                events.append(ThinkingDelta(self._thinking, reasoning))
            text = delta.get("content")
            refusal = delta.get("refusal")
            if refusal:
                text, self._refused = refusal, True
            if text:
                self._text_delta(text, events)
            for call in delta.get("tool_calls") or ():
                position = call.get("index", 0)
                index = self._tool_blocks.get(position)
                function = call.get("function") or {}
                if index is not None and index != self._open_block:
                    raise UnreadableAnswerError(
                        f"tool call {position}'s arguments continued after another block began"
                    )
                if index is None:
                    block = ToolUseBlock(
                        id=call.get("id") or f"call_{position}", name=function.get("name") or ""
                    )
                    index = self._tool_blocks[position] = self._open(block, events)
                arguments = function.get("arguments")
                if arguments:
                    events.append(ToolInputDelta(index, arguments))
        finish_reason = choice.get("finish_reason")
        if finish_reason and self._finish is None:
            self._finish = finish_reason
            self._stop_open(events)

    @property
    def started(self) -> bool:
        """Whether the first chunk has been read (it starts the message)."""
        return self._started

    def text(self, text: str) -> list[StreamEvent]:
        """The events of chunks after the first whose only news is text of the first
        choice (`plain_text`): what `feed` makes of them, their texts joined."""
        events: list[StreamEvent] = []
        self._text_delta(text, events)
        return events

    def _text_delta(self, text: str, events: list[StreamEvent]) -> None:
        if self._text is None:
            self._text = self._open(TextBlock(""), events)
        events.append(TextDelta(self._text, text))

    def _open(
        self, block: TextBlock | ThinkingBlock | ToolUseBlock, events: list[StreamEvent]
    ) -> int:
        self._stop_open(events)
        index = self._open_block = self._next
        self._next += 1
        events.append(ContentBlockStart(index, block))
        return index

    def _stop_open(self, events: list[StreamEvent]) -> None:
        """Stops the open block, if any; text or thinking after it opens a new block."""
        if self._open_block is None:
            return
        events.append(ContentBlockStop(self._open_block))
        if self._open_block == self._text:
            self._text = None
        elif self._open_block == self._thinking:
            self._thinking = None
        self._open_block = None

    def finish(self) -> list[StreamEvent]:
        """The closing events, once the upstream stream has ended."""
        if self._finish is None:
            raise UpstreamStreamInterruptedError(
                f"provider {self._provider} ended the stream before a finish reason",
                metadata={
                    "provider": self._provider,
                    "upstream_request_id": self._upstream_request_id,
                },
            )
        reason = StopReason.REFUSAL if self._refused else FINISH_REASONS.get(self._finish)
        return [MessageDelta(stop_reason=reason, usage=self._usage), MessageStop()]


# The only choice of a chunk, index 0, with text in its delta and nothing else,
# not finished: how OpenAI streams an answer's text (spaces optional: other
# servers write JSON with them).
_TEXT_CHOICE = re.compile(
    rb'"choices": ?\[\{"index": ?0, ?"delta": ?\{"content": ?' + JSON_STRING + rb"\}"
    rb'(?:, ?"logprobs": ?null)?, ?"finish_reason": ?null\}\]'
)
_NO_USAGE = re.compile(rb'"usage": ?null')


def plain_text(data: bytes) -> str | None:
    """The text of a chunk whose only news is text of the first choice, read by a
    pattern instead of parsed (most chunks of a streamed answer), or None: the
    chunk must be parsed.

    Its `usage` must be null or absent, and no key `error` anywhere: a quote is
    escaped inside a JSON string, so `"usage"` and `"error"` are keys there (or
    a whole string of that text, which only sends the chunk to be parsed).
    """
    match = _TEXT_CHOICE.search(data)
    if match is None or not match[1] or b'"error"' in data:
        return None
    usage = data.count(b'"usage"')
    if usage and len(_NO_USAGE.findall(data)) != usage:
        return None
    return string_text(match[1])


def completion_as_chunks(completion: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A complete (non-streaming) ChatCompletion as the chunks that would stream it.

    Generate makes one non-streaming call; replaying its result through
    ChatStreamDecoder keeps a single translation path for both RPCs.
    """
    chunks: list[dict[str, Any]] = []
    completion_id = completion.get("id")
    for choice in completion.get("choices") or ():
        if choice.get("index") != 0:
            continue
        message = choice.get("message") or {}
        calls = [
            {"index": i, "id": call.get("id"), "function": call["function"]}
            for i, call in enumerate(message.get("tool_calls") or ())
            if call.get("function") is not None
        ]
        delta = {
            "content": message.get("content"),
            "refusal": message.get("refusal"),
            "reasoning_content": message.get("reasoning_content"),
            "reasoning": message.get("reasoning"),
            "tool_calls": calls,
        }
        finish = {"index": 0, "delta": None, "finish_reason": choice.get("finish_reason")}
        chunks.append({"id": completion_id, "choices": [{"index": 0, "delta": delta}]})
        chunks.append({"id": completion_id, "choices": [finish]})
    chunks.append({"id": completion_id, "usage": completion.get("usage"), "choices": []})
    return chunks
