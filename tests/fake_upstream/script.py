"""What a fake upstream answers: a provider-neutral script, rendered per wire format.

A test enqueues Replies; the next request to either fake API takes the
first one (a default reply when none is queued). A Reply describes the
content (text, thinking, tool calls), how it ends, its usage, and the
failures to inject: an HTTP error with headers, a delay before the
response, a pause between events, an error event or a connection reset
after some events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Text:
    text: str
    # The pieces it streams in; default: one per word.
    pieces: list[str] | None = None

    def chunks(self) -> list[str]:
        if self.pieces is not None:
            return self.pieces
        words = self.text.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


@dataclass
class Thinking:
    text: str
    signature: str = "sig-abc123"


@dataclass
class RedactedThinking:
    data: str


@dataclass
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]
    # How many input_json / arguments fragments the input streams in.
    fragments: int = 2

    def json_fragments(self) -> list[str]:
        import json

        encoded = json.dumps(self.input, separators=(",", ":"))
        size = max(1, -(-len(encoded) // self.fragments))
        return [encoded[i : i + size] for i in range(0, len(encoded), size)] or [""]


Block = Text | Thinking | RedactedThinking | ToolCall


@dataclass
class Usage:
    """Disjoint counts, as the gateway reports them (Anthropic's meaning)."""

    input_tokens: int = 12
    output_tokens: int = 7
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


@dataclass
class Reply:
    blocks: list[Block] = field(default_factory=lambda: [Text("Hello from the fake upstream.")])
    # The provider's own stop/finish reason; None: derived from the blocks.
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = field(default_factory=Usage)
    message_id: str = "msg_fake0001"
    request_id: str = "req_fake0001"
    # Failures
    status: int = 200
    error_type: str = ""  # the provider's error type; default by status
    error_code: str | None = None  # OpenAI's `code`
    error_param: str | None = None  # OpenAI's `param`
    error_message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the response starts
    event_delay_s: float = 0.0  # between streamed events
    error_after: int | None = None  # an error event after this many events
    stream_error_type: str = "overloaded_error"
    # How the Responses API reports that error: an `error` event with the
    # error envelope, or a `response.failed` event (OpenAI sends both).
    responses_failure: Literal["error", "response.failed"] = "error"
    reset_after: int | None = None  # the connection is cut after this many events
    # Sent as the whole 200 body instead of the reply (SSE when the call streams)
    raw_body: bytes | None = None
    # The raw body's content type (e.g. a proxy's "text/html" page); None: what
    # the API would send (SSE or JSON).
    raw_content_type: str | None = None
    count_tokens: int = 42  # what count_tokens answers
