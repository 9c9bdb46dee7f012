"""Anthropic's Messages API wire format, rendered from a Reply.

The SSE sequence is the one the API sends: message_start (usage with the
input counts and output_tokens 1), then per block content_block_start, a
ping after the first one, content_block_delta events (text_delta,
input_json_delta, thinking_delta then signature_delta), content_block_stop;
then message_delta with the stop reason and cumulative usage, and
message_stop. Errors are `{"type": "error", "error": {...}, "request_id"}`
bodies, or an `event: error` inside the stream.
"""

from __future__ import annotations

import json
from typing import Any

from tests.fake_upstream.script import RedactedThinking, Reply, Text, Thinking, ToolCall

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def response_headers(reply: Reply) -> dict[str, str]:
    return {
        "request-id": reply.request_id,
        "anthropic-organization-id": "org-fake",
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
        "anthropic-ratelimit-requests-reset": "2026-11-21T00:00:01Z",
        **reply.headers,
    }


def stop_reason(reply: Reply) -> str:
    if reply.stop_reason is not None:
        return reply.stop_reason
    return "tool_use" if any(isinstance(b, ToolCall) for b in reply.blocks) else "end_turn"


def _usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
    u = reply.usage
    return {
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": u.cache_creation_input_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _message(reply: Reply, model: str, content: list[Any], final: bool) -> dict[str, Any]:
    return {
        "id": reply.message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(reply) if final else None,
        "stop_sequence": reply.stop_sequence if final else None,
        "usage": _usage(reply, reply.usage.output_tokens if final else 1),
    }


def _block(block: Any) -> dict[str, Any]:
    if isinstance(block, Text):
        return {"type": "text", "text": block.text}
    if isinstance(block, Thinking):
        return {"type": "thinking", "thinking": block.text, "signature": block.signature}
    if isinstance(block, RedactedThinking):
        return {"type": "redacted_thinking", "data": block.data}
    return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}


def message_body(reply: Reply, model: str) -> dict[str, Any]:
    """The JSON body of a non-streaming response."""
    return _message(reply, model, [_block(b) for b in reply.blocks], final=True)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(reply: Reply, model: str) -> list[bytes]:
    """Every SSE event of a streaming response, in order."""
    events = [
        _sse(
            "message_start", {"type": "message_start", "message": _message(reply, model, [], False)}
        )
    ]
    for index, block in enumerate(reply.blocks):
        if isinstance(block, Text):
            start: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in block.chunks()]
        elif isinstance(block, Thinking):
            start = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [{"type": "thinking_delta", "thinking": block.text}]
            deltas.append({"type": "signature_delta", "signature": block.signature})
        elif isinstance(block, RedactedThinking):
            start = {"type": "redacted_thinking", "data": block.data}
            deltas = []
        else:
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            deltas = [
                {"type": "input_json_delta", "partial_json": fragment}
                for fragment in block.json_fragments()
            ]
        events.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        if index == 0:
            events.append(_sse("ping", {"type": "ping"}))
        for delta in deltas:
            events.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    u = reply.usage
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(reply), "stop_sequence": reply.stop_sequence},
                # Cumulative: the totals so far, not an increment.
                "usage": {
                    "input_tokens": u.input_tokens,
                    "cache_creation_input_tokens": u.cache_creation_input_tokens,
                    "cache_read_input_tokens": u.cache_read_input_tokens,
                    "output_tokens": u.output_tokens,
                },
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


def error_body(reply: Reply, status: int) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {
            "type": reply.error_type or ERROR_TYPES.get(status, "api_error"),
            "message": reply.error_message,
        },
        "request_id": reply.request_id,
    }


def stream_error_event(reply: Reply) -> bytes:
    return _sse(
        "error",
        {
            "type": "error",
            "error": {"type": reply.stream_error_type, "message": "Overloaded"},
            "request_id": reply.request_id,
        },
    )
