"""Internal events and responses as OpenAI's Chat Completions API answers them.

The HTTP front door's encoder for a translated chat call (a model served by
Anthropic or the offline models): ChatStreamEncoder turns the internal
stream into `chat.completion.chunk` server-sent events, and
encode_completion a whole response into a `chat.completion`. A relayed call
never comes here: its upstream's bytes go to the client as they came.

Chat has no content blocks, only one delta per chunk, so the encoder needs
none of the Messages encoder's block bookkeeping:

- the first chunk (on MessageStart) carries `{"role": "assistant", "content": ""}`;
- text is `content`; thinking text is `reasoning_content`, the field
  DeepSeek's API, vLLM and LiteLLM use for it (OpenAI's own chat answers
  carry no reasoning text; its SDK keeps unknown fields, so its clients
  ignore it or read it); thinking signatures and redacted thinking have no
  place in Chat and are left out;
- each tool use is a tool call numbered from 0 in the order tool uses start
  (not by block index): a first delta with index, id, type and name and
  empty arguments, then argument fragments under the same index;
- one last chunk with an empty delta carries the finish reason: `tool_calls`
  when the turn holds a tool call, unless it was cut short (`length`) or
  filtered (`content_filter`: a tool call it stopped may be incomplete);
- with `include_usage`, every chunk carries `"usage": null` and a chunk with
  `choices: []` and the usage follows the finish chunk, as OpenAI does;
  then `data: [DONE]`.

It runs once per streamed chunk: the chunk's head and tail are built once
per stream, each tool call's delta head once per call, and a delta costs
one string escape.
"""

from __future__ import annotations

import json
from typing import Any

from server.events import (
    ContentBlockStart,
    MessageDelta,
    MessageStart,
    MessageStop,
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

FINISH_REASONS: dict[StopReason, str] = {
    StopReason.END_TURN: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.PAUSE_TURN: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.CONTEXT_WINDOW_EXCEEDED: "length",
    StopReason.TOOL_USE: "tool_calls",
    StopReason.REFUSAL: "content_filter",
    StopReason.CONTENT_FILTER: "content_filter",
}
# Reasons kept even when a tool call began: the call may be incomplete.
_CUT_SHORT = frozenset(
    {
        StopReason.MAX_TOKENS,
        StopReason.CONTEXT_WINDOW_EXCEEDED,
        StopReason.REFUSAL,
        StopReason.CONTENT_FILTER,
    }
)

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ROLE_DELTA = b'{"role":"assistant","content":"","refusal":null}'
_DONE = b"data: [DONE]\n\n"


def finish_reason(reason: StopReason | None, *, tool_calls: bool) -> str:
    """Chat's finish_reason for ours; `tool_calls`: the answer holds a tool call."""
    if tool_calls and reason not in _CUT_SHORT:
        return "tool_calls"
    if reason is None:
        return "stop"
    return FINISH_REASONS[reason]


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage: prompt_tokens counts cached and cache-written tokens too.

    Ours are disjoint (Anthropic's meaning); the reverse of _openai_codec.usage_of.
    Reasoning tokens are part of completion_tokens, not counted apart.
    """
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read_input_tokens,
            "cache_write_tokens": usage.cache_creation_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def error_chunk(message: str, error_type: str, code: str | None) -> bytes:
    """`data: {"error": ...}`: the last chunk of a stream that failed after it began."""
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return b"data: " + _escape({"error": error}) + b"\n\n"


def encode_completion(
    response: GenerationResponse, *, completion_id: str, created: int, model: str
) -> dict[str, Any]:
    """A whole response as the `chat.completion` of a non-streamed answer.

    Blocks an answer cannot hold (images, tool results) and thinking
    signatures are left out; `content` is null when the answer is tool calls alone.
    """
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in response.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = _JSON.encode(block.input)
            function = {"name": block.name, "arguments": arguments}
            call_id = block.id or f"call_{len(calls)}"
            calls.append({"id": call_id, "type": "function", "function": function})
        elif isinstance(block, ThinkingBlock) and block.text:
            reasoning.append(block.text)
    content = "".join(texts)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content or (None if calls else ""),
        "refusal": None,
        "annotations": [],
    }
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(response.stop_reason, tool_calls=bool(calls)),
    }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(response.usage),
    }


class ChatStreamEncoder:
    """Internal stream events, in order, as the bytes of a Chat Completions stream.

    `feed` returns the bytes to write for one event (b"" when there are
    none); `finish` those still owed when the internal stream ended without
    MessageStop: the finish chunk, the usage chunk if asked for, and
    `data: [DONE]`. Nothing is written before MessageStart, and `finish`
    then writes nothing either: the caller owes an error.
    """

    __slots__ = (
        "_arguments_end",
        "_content",
        "_done",
        "_final",
        "_head",
        "_include_usage",
        "_prefix",
        "_reasoning",
        "_started",
        "_suffix",
        "_text_end",
        "_tools",
        "_usage",
    )

    def __init__(
        self, *, completion_id: str, model: str, created: int, include_usage: bool
    ) -> None:
        head = _JSON.encode(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
        )
        # `data: {"id":...,"model":...` without the closing brace, for every chunk.
        self._head = b"data: " + head[:-1].encode("utf-8", "backslashreplace")
        self._prefix = self._head + b',"choices":[{"index":0,"delta":'
        usage = b',"usage":null' if include_usage else b""
        self._suffix = b',"logprobs":null,"finish_reason":null}]' + usage + b"}\n\n"
        # A delta chunk is one of these heads, an escaped string and its end.
        self._content = self._prefix + b'{"content":'
        self._reasoning = self._prefix + b'{"reasoning_content":'
        self._text_end = b"}" + self._suffix
        self._arguments_end = b"}}]}" + self._suffix
        self._include_usage = include_usage
        self._started = False
        self._done = False
        # Block index -> the chunk head of its tool call's argument fragments.
        self._tools: dict[int, bytes] = {}
        self._usage = Usage()
        self._final: MessageDelta | None = None

    @property
    def started(self) -> bool:
        """Whether the first chunk was written (an error must then be a chunk)."""
        return self._started

    @property
    def done(self) -> bool:
        """Whether `data: [DONE]` was written."""
        return self._done

    def feed(self, event: StreamEvent) -> bytes:
        """The bytes to write for `event`."""
        # Most frequent first: this runs for every chunk.
        if isinstance(event, TextDelta):
            return self._text(self._content, event.text)
        if isinstance(event, ToolInputDelta):
            head = self._tools.get(event.index)
            if head is None or not event.partial_json or self._done:
                return b""
            return head + _escape(event.partial_json) + self._arguments_end
        if isinstance(event, ThinkingDelta):
            return self._text(self._reasoning, event.text)
        if isinstance(event, ContentBlockStart):
            return self._start(event.index, event.block)
        if isinstance(event, MessageDelta):
            # Cumulative: the last one says it all; it goes out at the end.
            self._final = event
            return b""
        if isinstance(event, MessageStart):
            if self._started:
                return b""
            self._started = True
            self._usage = event.usage or Usage()
            return self._chunk(_ROLE_DELTA)
        if isinstance(event, MessageStop):
            return self.finish()
        # Block stops and signatures have no place in Chat; raw bytes are a relay's.
        return b""

    def finish(self) -> bytes:
        """The bytes still owed to end the stream: finish chunk, usage chunk, `[DONE]`."""
        if not self._started or self._done:
            return b""
        self._done = True
        final = self._final
        reason = finish_reason(final.stop_reason if final else None, tool_calls=bool(self._tools))
        out = b'%s{},"logprobs":null,"finish_reason":"%s"}]%s}\n\n' % (
            self._prefix,
            reason.encode(),
            b',"usage":null' if self._include_usage else b"",
        )
        if self._include_usage:
            usage = final.usage if final is not None and final.usage is not None else self._usage
            out += self._head + b',"choices":[],"usage":' + _escape(usage_json(usage))
            out += b"}\n\n"
        return out + _DONE

    def _text(self, head: bytes, text: str) -> bytes:
        if not self._started or self._done or not text:
            return b""
        return head + _escape(text) + self._text_end

    def _chunk(self, delta: bytes) -> bytes:
        return b"".join((self._prefix, delta, self._suffix))

    def _start(self, index: int, block: ContentBlock) -> bytes:
        if not self._started or self._done:
            return b""
        if isinstance(block, TextBlock):
            return self._text(self._content, block.text)
        if isinstance(block, ThinkingBlock):
            return self._text(self._reasoning, block.text)
        if not isinstance(block, ToolUseBlock) or index in self._tools:
            return b""  # an image or a tool result: no answer holds one
        position = len(self._tools)
        head = b'%s{"tool_calls":[{"index":%d,"function":{"arguments":' % (self._prefix, position)
        self._tools[index] = head
        call = {
            "index": position,
            "id": block.id or f"call_{position}",
            "type": "function",
            "function": {"name": block.name, "arguments": ""},
        }
        out = self._chunk(b'{"tool_calls":[' + _escape(call) + b"]}")
        if block.input:  # a whole input given at the start: one fragment
            arguments = _JSON.encode(block.input)
            out += head + _escape(arguments) + self._arguments_end
        return out


def _escape(value: Any) -> bytes:
    """`value` as JSON bytes.

    backslashreplace turns a lone surrogate (which UTF-8 cannot hold) into
    its JSON escape: it can only occur inside a JSON string.
    """
    return _JSON.encode(value).encode("utf-8", "backslashreplace")
