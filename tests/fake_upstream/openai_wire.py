"""OpenAI's Chat Completions wire format, rendered from a Reply.

Streaming: `chat.completion.chunk` objects as `data:` lines. The first
delta carries the role; text comes as `content`, tool calls as
`tool_calls` deltas by index (id, type and name first, then `arguments`
fragments); a chunk with an empty delta carries the finish_reason; with
`stream_options.include_usage` every chunk has `"usage": null` and a last
chunk with no choices carries the usage; then `data: [DONE]`.
`prompt_tokens` counts cached (and cache-written) tokens too. Errors are
`{"error": {message, type, param, code}}` bodies, or such an object as a
`data:` line inside the stream.
"""

from __future__ import annotations

import json
from typing import Any

from tests.fake_upstream.script import Reply, Text, Thinking, ToolCall

ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}
CREATED = 1_763_683_200


def response_headers(reply: Reply) -> dict[str, str]:
    return {
        "x-request-id": reply.request_id,
        "openai-organization": "org-fake",
        "openai-processing-ms": "12",
        "openai-version": "2020-10-01",
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
        **reply.headers,
    }


def finish_reason(reply: Reply) -> str:
    if reply.stop_reason is not None:
        return reply.stop_reason
    return "tool_calls" if any(isinstance(b, ToolCall) for b in reply.blocks) else "stop"


def usage(reply: Reply) -> dict[str, Any]:
    u = reply.usage
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": u.cache_read_input_tokens,
            "cache_write_tokens": u.cache_creation_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body(reply: Reply, model: str) -> dict[str, Any]:
    """The JSON body of a non-streaming response."""
    text = "".join(b.text for b in reply.blocks if isinstance(b, Text))
    calls = [
        {
            "id": b.id,
            "type": "function",
            "function": {"name": b.name, "arguments": json.dumps(b.input)},
        }
        for b in reply.blocks
        if isinstance(b, ToolCall)
    ]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text or None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": reply.message_id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(reply),
            }
        ],
        "usage": usage(reply),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _chunk(reply: Reply, model: str, delta: dict[str, Any] | None, finish: str | None) -> bytes:
    data = {
        "id": reply.message_id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    return f"data: {json.dumps(data)}\n\n".encode()


def stream_events(reply: Reply, model: str, include_usage: bool) -> list[bytes]:
    """Every SSE line of a streaming response, in order, [DONE] included."""
    events = [_chunk(reply, model, {"role": "assistant", "content": "", "refusal": None}, None)]
    tool_index = 0
    for block in reply.blocks:
        if isinstance(block, Text):
            events.extend(_chunk(reply, model, {"content": p}, None) for p in block.chunks())
        elif isinstance(block, Thinking):
            # What vLLM and Ollama send; OpenAI itself streams no reasoning text.
            events.append(_chunk(reply, model, {"reasoning_content": block.text}, None))
        elif isinstance(block, ToolCall):
            head = {
                "index": tool_index,
                "id": block.id,
                "type": "function",
                "function": {"name": block.name, "arguments": ""},
            }
            events.append(_chunk(reply, model, {"tool_calls": [head]}, None))
            for fragment in block.json_fragments():
                part = {"index": tool_index, "function": {"arguments": fragment}}
                events.append(_chunk(reply, model, {"tool_calls": [part]}, None))
            tool_index += 1
    events.append(_chunk(reply, model, {}, finish_reason(reply)))
    if include_usage:
        data = json.loads(_chunk(reply, model, None, None)[len(b"data: ") :])
        data["usage"] = usage(reply)
        events.append(f"data: {json.dumps(data)}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def error_body(reply: Reply, status: int) -> dict[str, Any]:
    error_type, code = ERROR_TYPES.get(status, ("server_error", None))
    return {
        "error": {
            "message": reply.error_message,
            "type": reply.error_type or error_type,
            "param": reply.error_param,
            "code": reply.error_code if reply.error_code is not None else code,
        }
    }


def stream_error_event(reply: Reply) -> bytes:
    error = {
        "message": "The server had an error while processing your request.",
        "type": reply.stream_error_type,
        "param": None,
        "code": None,
    }
    return f"data: {json.dumps({'error': error})}\n\n".encode()
