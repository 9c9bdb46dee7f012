"""Internal events and responses as OpenAI's Responses API answers them.

The HTTP front door's encoder for a translated `POST /v1/responses` (a model
served by Anthropic or the offline models): ResponsesStreamEncoder turns the
internal stream into the Responses API's server-sent events, and
encode_response a whole response into its Response object. A relayed call
never comes here: its upstream's bytes go to the client as they came.

Each internal block is one output item: text a `message` with one
`output_text` part, a tool use a `function_call` (its id the call_id), and
thinking a `reasoning` item whose summary is the thinking's text. Anthropic
requires a turn's thinking back, signed, before its tool uses; so that
Codex CLI (and any client that passes output items back as input) returns
it, a signed or redacted thinking block is sealed into the item's
`encrypted_content` (seal_thinking; the Responses decoder opens it), which
such clients return untouched. Thinking without a signature (an
OpenAI-compatible server's) has nothing to verify and is only summarised.

The stream is `response.created` and `response.in_progress`, then for each
item `output_item.added`, its content events and `output_item.done`, one
item at a time with output_index contiguous from 0, then the whole Response
in `response.completed`, or `response.incomplete` when max_tokens (or the
context window, or a content filter) cut the answer short, as OpenAI does;
the last item of an incomplete response is itself `incomplete`. An item is
done when the next one begins or the response ends (so that it can be
marked incomplete); text or thinking resumed after another item opens a new
item of its kind, an empty text or thinking block makes no item, and a
function call that got no arguments gets "{}". `sequence_number` counts
every event from 0. Usage: `input_tokens` counts the cached and
cache-written tokens too, `cached_tokens` the ones read from the cache and
`cache_write_tokens` the ones written; reasoning tokens are not known
apart from the output (0).

It runs once per streamed chunk: a delta costs one string escape and one
number; the request's echoed settings are encoded once per response.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from server.errors import (
    BudgetExceededError,
    ContextWindowExceededError,
    GatewayError,
    OverLimitError,
    QuotaExceededError,
    QuotaExhaustedError,
    RateLimitedError,
    UpstreamProtocolError,
)
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

SEALED_PREFIX = "llmgw.thinking.v1."
# Why a response stopped short: Response.incomplete_details.reason.
INCOMPLETE_REASONS: dict[StopReason, str] = {
    StopReason.MAX_TOKENS: "max_output_tokens",
    StopReason.CONTEXT_WINDOW_EXCEEDED: "max_output_tokens",
    StopReason.CONTENT_FILTER: "content_filter",
}
# What a Response object says of settings the request left out; the
# request's own (DecodedResponses.echo) replace them.
DEFAULT_SETTINGS: dict[str, Any] = {
    "background": False,
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": False,
    "temperature": None,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "truncation": "disabled",
    "user": None,
}
# Fields of a Response that the encoder writes itself, never echoed.
_OWN_FIELDS = frozenset(
    {"id", "object", "created_at", "status", "model", "output", "usage", "error"}
    | {"incomplete_details"}
)

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_MESSAGE, _CALL, _REASONING = "message", "function_call", "reasoning"
_ID_PREFIXES = {_MESSAGE: "msg", _CALL: "fc", _REASONING: "rs"}
_SUFFIX = b',"sequence_number":%d}\n\n'
_TEXT_SUFFIX = b',"logprobs":[],"sequence_number":%d}\n\n'


def seal_thinking(block: ThinkingBlock) -> str | None:
    """A signed or redacted thinking block as a reasoning item's `encrypted_content`.

    None when there is nothing a provider could verify (no signature). The
    seal is not encrypted: it holds what the client was shown, and only the
    upstream that signed it can check it.
    """
    if block.redacted_data:
        payload: dict[str, str] = {"redacted": block.redacted_data}
    elif block.signature:
        payload = {"thinking": block.text, "signature": block.signature}
    else:
        return None
    raw = _JSON.encode(payload).encode("utf-8", "backslashreplace")
    return SEALED_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii")


def open_thinking(sealed: str) -> ThinkingBlock | None:
    """The thinking block seal_thinking sealed; None for someone else's encrypted
    content (OpenAI's); ValueError when it is a seal but damaged."""
    if not sealed.startswith(SEALED_PREFIX):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(sealed[len(SEALED_PREFIX) :]))
    except (binascii.Error, ValueError, RecursionError) as err:
        raise ValueError("damaged sealed thinking") from err
    if isinstance(payload, dict):
        redacted = payload.get("redacted")
        text, signature = payload.get("thinking"), payload.get("signature")
        if isinstance(redacted, str) and redacted:
            return ThinkingBlock(redacted_data=redacted)
        if isinstance(text, str) and isinstance(signature, str) and signature:
            return ThinkingBlock(text, signature)
    raise ValueError("damaged sealed thinking")


def failure_code(error: GatewayError) -> str:
    """The `error.code` of a response.failed event for a gateway error.

    Codex CLI reads it: `context_length_exceeded` makes it compact the
    conversation, `insufficient_quota` stop, `rate_limit_exceeded` retry
    after the "try again in Ns" of the message; anything else it retries.
    """
    if isinstance(error, ContextWindowExceededError):
        return "context_length_exceeded"
    if isinstance(error, BudgetExceededError | OverLimitError | QuotaExhaustedError):
        return "insufficient_quota"
    if isinstance(error, RateLimitedError | QuotaExceededError):
        return "rate_limit_exceeded"
    return "server_error"


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage: its input_tokens count the cached and cache-written ones too."""
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": usage.cache_read_input_tokens,
            "cache_write_tokens": usage.cache_creation_input_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + usage.output_tokens,
    }


def response_status(reason: StopReason | None) -> tuple[str, str | None]:
    """A response's status and, when incomplete, why."""
    incomplete = INCOMPLETE_REASONS.get(reason) if reason is not None else None
    return ("incomplete", incomplete) if incomplete else ("completed", None)


def encode_response(
    response: GenerationResponse,
    *,
    response_id: str,
    created_at: int,
    model: str,
    request_echo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole response as the Response object of a non-streamed answer.

    The same object as the stream's last event carries for the same events.
    Blocks an answer cannot hold (images, tool results) are left out.
    """
    stem = _stem(response_id)
    status, reason = response_status(response.stop_reason)
    output: list[dict[str, Any]] = []
    for block in response.content:
        item = _answer_item(block, stem, len(output))
        if item is not None:
            output.append(item)
    if reason is not None and output:
        output[-1]["status"] = "incomplete"
    return {
        **_head(response_id, created_at, status, model),
        "output": output,
        "usage": usage_json(response.usage),
        "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        **_settings(request_echo),
    }


def _answer_item(block: ContentBlock, stem: str, index: int) -> dict[str, Any] | None:
    if isinstance(block, TextBlock):
        return _message_item(_item_id(_MESSAGE, stem, index), block.text) if block.text else None
    if isinstance(block, ToolUseBlock):
        arguments = _JSON.encode(block.input)
        return _call_item(_item_id(_CALL, stem, index), block.id, block.name, arguments)
    if isinstance(block, ThinkingBlock):
        sealed = seal_thinking(block)
        if not block.text and sealed is None:
            return None
        return _reasoning_item(_item_id(_REASONING, stem, index), block.text, sealed)
    return None


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _reasoning_item(
    item_id: str, text: str, sealed: str | None, status: str = "completed"
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": item_id,
        "type": "reasoning",
        "status": status,
        "summary": [{"type": "summary_text", "text": text}] if text else [],
    }
    if sealed is not None:
        item["encrypted_content"] = sealed
    return item


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _head(response_id: str, created_at: int, status: str, model: str) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
    }


def _settings(echo: dict[str, Any] | None) -> dict[str, Any]:
    if not echo:
        return dict(DEFAULT_SETTINGS)
    return DEFAULT_SETTINGS | {k: v for k, v in echo.items() if k not in _OWN_FIELDS}


def _stem(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _item_id(kind: str, stem: str, index: int) -> str:
    return f"{_ID_PREFIXES[kind]}_{stem}_{index}"


@dataclass(slots=True)
class _Item:
    """One internal block, and the output item that carries it now."""

    kind: str  # _MESSAGE, _CALL or _REASONING; "" for a block no answer holds
    index: int = -1  # output_index; -1 before the item is sent
    id: str = ""
    stopped: bool = False  # the internal block stopped
    parts: list[str] = field(default_factory=list)  # text, argument or thinking fragments
    signature: list[str] = field(default_factory=list)
    redacted: str = ""
    call_id: str = ""
    name: str = ""
    summary: bool = False  # a reasoning item's summary part was added
    prefix: bytes = b""  # its delta event up to `"delta":`
    suffix: bytes = _SUFFIX  # and after the delta, up to the sequence number


class ResponsesStreamEncoder:
    """Internal stream events, in order, as the bytes of the Responses API's SSE stream.

    `feed` returns the bytes to write for one event (b"" when there are none
    yet); `finish` those still owed when the internal stream ended without
    MessageStop (nothing when response.created was never sent: the caller
    then owes an error, which `failed` writes as a whole failed stream).
    `request_echo` is DecodedResponses.echo: the settings the Response repeats.
    """

    __slots__ = (
        "_blocks",
        "_created_at",
        "_done",
        "_final",
        "_id",
        "_model",
        "_open",
        "_output",
        "_seq",
        "_settings",
        "_started",
        "_stem",
        "_usage",
    )

    def __init__(
        self,
        *,
        response_id: str,
        model: str,
        created_at: int,
        request_echo: dict[str, Any] | None = None,
    ) -> None:
        self._id = response_id
        self._stem = _stem(response_id)
        self._model = model
        self._created_at = created_at
        # The echoed settings, encoded once: every Response object repeats them.
        self._settings = _JSON.encode(_settings(request_echo))[1:-1]
        self._started = False
        self._done = False
        self._seq = 0
        self._blocks: dict[int, _Item] = {}  # internal index -> its item
        self._open: _Item | None = None  # the item open on the wire
        self._output: list[dict[str, Any]] = []  # the items done
        self._usage: Usage | None = None
        self._final: MessageDelta | None = None

    @property
    def started(self) -> bool:
        """Whether response.created was written (an error must then be an event)."""
        return self._started

    @property
    def done(self) -> bool:
        """Whether the last event (completed, incomplete or failed) was written."""
        return self._done

    def feed(self, event: StreamEvent) -> bytes:
        """The bytes to write for `event`; UpstreamProtocolError if it cannot be expressed."""
        # Most frequent first: this runs for every chunk.
        if isinstance(event, TextDelta):
            return self._delta(event.index, _MESSAGE, event.text)
        if isinstance(event, ToolInputDelta):
            return self._delta(event.index, _CALL, event.partial_json)
        if isinstance(event, ThinkingDelta):
            return self._delta(event.index, _REASONING, event.text)
        if isinstance(event, SignatureDelta):
            return self._signature(event.index, event.signature)
        if isinstance(event, ContentBlockStart):
            return self._start(event.index, event.block)
        if isinstance(event, ContentBlockStop):
            item = self._blocks.get(event.index)
            if item is not None:
                item.stopped = True  # done when the next item begins, or at the end
            return b""
        if isinstance(event, MessageDelta):
            self._final = event  # cumulative: the last one says it all
            return b""
        if isinstance(event, MessageStart):
            if self._started:
                return b""
            self._usage = event.usage
            return self._created()
        if isinstance(event, MessageStop):
            return self.finish()
        return b""  # a relayed call's raw bytes: not for a translated answer

    def finish(self) -> bytes:
        """The bytes still owed: the open item done, then response.completed or .incomplete."""
        if not self._started or self._done:
            return b""
        self._done = True
        final = self._final
        status, reason = response_status(final.stop_reason if final else None)
        out = self._close_open("incomplete" if reason else "completed")
        usage = final.usage if final is not None and final.usage is not None else self._usage
        tail = {
            "usage": usage_json(usage or Usage()),
            "error": None,
            "incomplete_details": {"reason": reason} if reason else None,
        }
        return out + self._lifecycle(f"response.{status}", status, tail)

    def failed(self, error_code: str, message: str) -> bytes:
        """The events that end the stream with `response.failed` (status failed,
        `error: {code, message}`), response.created first if it was not sent."""
        if self._done:
            return b""
        out = b"" if self._started else self._created()
        self._done = True
        final = self._final
        usage = final.usage if final is not None and final.usage is not None else self._usage
        tail = {
            "usage": usage_json(usage) if usage is not None else None,
            "error": {"code": error_code, "message": message},
            "incomplete_details": None,
        }
        out += self._close_open("incomplete")
        return out + self._lifecycle("response.failed", "failed", tail)

    # -- the response ------------------------------------------------------------

    def _created(self) -> bytes:
        self._started = True
        tail = {"usage": None, "error": None, "incomplete_details": None}
        created = self._lifecycle("response.created", "in_progress", tail)
        return created + self._lifecycle("response.in_progress", "in_progress", tail)

    def _lifecycle(self, name: str, status: str, tail: dict[str, Any]) -> bytes:
        """A response.* event carrying the whole Response in `status`."""
        head = _head(self._id, self._created_at, status, self._model)
        output = self._output if status != "in_progress" else []
        response = (
            f"{_JSON.encode(head)[:-1]},"
            f'"output":{_JSON.encode(output)},{_JSON.encode(tail)[1:-1]},{self._settings}}}'
        )
        data = f'{{"type":"{name}","response":{response},"sequence_number":{self._next()}}}'
        return f"event: {name}\ndata: {data}\n\n".encode("utf-8", "backslashreplace")

    def _next(self) -> int:
        seq = self._seq
        self._seq = seq + 1
        return seq

    def _event(self, name: str, data: dict[str, Any]) -> bytes:
        data = {"type": name, **data, "sequence_number": self._next()}
        return f"event: {name}\ndata: {_JSON.encode(data)}\n\n".encode("utf-8", "backslashreplace")

    # -- items -------------------------------------------------------------------

    def _start(self, index: int, block: ContentBlock) -> bytes:
        if not self._started or self._done or index in self._blocks:
            return b""
        if isinstance(block, TextBlock):
            self._blocks[index] = _Item(_MESSAGE)
            return self._delta(index, _MESSAGE, block.text)
        if isinstance(block, ToolUseBlock):
            item = _Item(_CALL, call_id=block.id, name=block.name)
            self._blocks[index] = item
            out = self._send(item)
            if block.input:
                out += self._delta(index, _CALL, _JSON.encode(block.input))
            return out
        if isinstance(block, ThinkingBlock):
            item = _Item(_REASONING, redacted=block.redacted_data)
            self._blocks[index] = item
            out = self._send(item) if block.redacted_data else b""
            out += self._delta(index, _REASONING, block.text)
            return out + self._signature(index, block.signature)
        # An image or a tool result: no answer holds one; its events are dropped.
        self._blocks[index] = _Item("", stopped=True)
        return b""

    def _current(self, index: int, kind: str) -> tuple[_Item | None, bytes]:
        """Block `index`'s item, sent and open, with the bytes that made it so."""
        item = self._blocks.get(index)
        if item is None or item.kind != kind or item.stopped or self._done:
            return None, b""
        if item is self._open:
            return item, b""
        if item.index >= 0:
            # Closed when another item began: resume in a new item of its kind.
            # A function call's arguments cannot be split across items.
            if kind == _CALL:
                raise UpstreamProtocolError(
                    f"tool input for block {index} came after another block started"
                )
            item = _Item(kind)
            self._blocks[index] = item
        return item, self._send(item)

    def _delta(self, index: int, kind: str, value: str) -> bytes:
        item = self._blocks.get(index)
        if (
            item is self._open
            and item is not None
            and item.kind == kind
            and value
            and not item.stopped
            and (item.summary or kind != _REASONING)
        ):
            return self._write(item, value)  # the usual case, kept short
        if not value:
            return b""
        item, out = self._current(index, kind)
        if item is None:
            return b""
        if kind == _REASONING and not item.summary:
            item.summary = True
            out += self._event(
                "response.reasoning_summary_part.added",
                {**self._where(item), "summary_index": 0, "part": _summary("")},
            )
        return out + self._write(item, value)

    def _write(self, item: _Item, value: str) -> bytes:
        """A delta event of the open `item`."""
        item.parts.append(value)
        return b"".join((item.prefix, _escape(value), item.suffix % self._next()))

    def _signature(self, index: int, signature: str) -> bytes:
        if not signature:
            return b""
        item, out = self._current(index, _REASONING)
        if item is not None:
            item.signature.append(signature)  # sealed into the item when it is done
        return out

    def _send(self, item: _Item) -> bytes:
        """Closes the open item and sends `item`: output_item.added and its first part."""
        out = self._close_open("completed")
        item.index = len(self._output)
        item.id = _item_id(item.kind, self._stem, item.index)
        self._open = item
        where = self._where(item)
        added: dict[str, Any]
        if item.kind == _MESSAGE:
            added = {"id": item.id, "type": "message", "status": "in_progress"}
            added |= {"role": "assistant", "content": []}
            delta = "response.output_text.delta"
            head = '"content_index":0,"delta":'
            item.suffix = _TEXT_SUFFIX
        elif item.kind == _CALL:
            added = _call_item(item.id, item.call_id, item.name, "", "in_progress")
            delta = "response.function_call_arguments.delta"
            head = '"delta":'
        else:
            added = {"id": item.id, "type": "reasoning", "status": "in_progress", "summary": []}
            delta = "response.reasoning_summary_text.delta"
            head = '"summary_index":0,"delta":'
        out += self._event(
            "response.output_item.added", {"output_index": item.index, "item": added}
        )
        if item.kind == _MESSAGE:
            out += self._event(
                "response.content_part.added",
                {**where, "content_index": 0, "part": _text_part("")},
            )
        item.prefix = (
            f'event: {delta}\ndata: {{"type":"{delta}","item_id":"{item.id}",'
            f'"output_index":{item.index},{head}'
        ).encode("utf-8", "backslashreplace")
        return out

    def _close_open(self, status: str) -> bytes:
        """The open item's closing events, and its place in the output."""
        item = self._open
        if item is None:
            return b""
        self._open = None
        where = self._where(item)
        text = "".join(item.parts)
        out = b""
        if item.kind == _MESSAGE:
            at = {**where, "content_index": 0}
            out += self._event("response.output_text.done", {**at, "text": text, "logprobs": []})
            out += self._event("response.content_part.done", {**at, "part": _text_part(text)})
            done = _message_item(item.id, text, status)
        elif item.kind == _CALL:
            if not text:  # a call without arguments: OpenAI's are never empty
                out += self._write(item, "{}")
                text = "{}"
            out += self._event(
                "response.function_call_arguments.done", {**where, "arguments": text}
            )
            done = _call_item(item.id, item.call_id, item.name, text, status)
        else:
            if item.summary:
                at = {**where, "summary_index": 0}
                out += self._event("response.reasoning_summary_text.done", {**at, "text": text})
                out += self._event(
                    "response.reasoning_summary_part.done", {**at, "part": _summary(text)}
                )
            block = ThinkingBlock(text, "".join(item.signature), item.redacted)
            done = _reasoning_item(item.id, text, seal_thinking(block), status)
        self._output.append(done)
        return out + self._event(
            "response.output_item.done", {"output_index": item.index, "item": done}
        )

    def _where(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index}


def _summary(text: str) -> dict[str, str]:
    return {"type": "summary_text", "text": text}


def _escape(value: str) -> bytes:
    # backslashreplace turns a lone surrogate (which UTF-8 cannot hold) into
    # its JSON escape: it can only occur inside a JSON string.
    return _JSON.encode(value).encode("utf-8", "backslashreplace")
