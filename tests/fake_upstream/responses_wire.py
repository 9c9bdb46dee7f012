"""OpenAI's Responses API wire format (`POST /v1/responses`), rendered from a Reply.

A Response object holds output items: `reasoning` for Thinking (a summary
only when the request asked for one with `reasoning.summary`, and
`encrypted_content` only when `include` has "reasoning.encrypted_content"),
`message` with one `output_text` part for each Text, `function_call` for
each ToolCall. The response echoes the request's settings (tools,
tool_choice, temperature, ...) with OpenAI's defaults. `input_tokens`
counts cached (and cache-written) tokens too. A stop_reason of "length",
"max_tokens" or "max_output_tokens" makes the response `incomplete`.

Streaming: named SSE events whose `event:` is the data's `type`, with
`sequence_number` counting from 0: response.created, response.in_progress;
per item output_item.added, its content events (content_part.added,
output_text.delta per chunk, output_text.done, content_part.done;
function_call_arguments.delta per fragment and .done;
reasoning_summary_part.added, reasoning_summary_text.delta and .done,
reasoning_summary_part.done), output_item.done; then response.completed
(or response.incomplete) with the whole response. No `[DONE]` line.

A failure after some events is an `error` event carrying the HTTP error
envelope (what OpenAI sends for rate limits and overloads once a stream
has started), or, with `Reply.responses_failure = "response.failed"`, a
response.failed event whose response has status failed and an error.
HTTP errors are Chat Completions' `{"error": {...}}` bodies.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.fake_upstream.openai_wire import CREATED, error_body, response_headers
from tests.fake_upstream.script import RedactedThinking, Reply, Text, Thinking, ToolCall

__all__ = ["error_body", "response_body", "response_headers", "stream_error_event", "stream_events"]

INCOMPLETE_REASONS = {
    "length": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "max_output_tokens": "max_output_tokens",
    "content_filter": "content_filter",
}
# OpenAI pads deltas with random characters (stream_options.include_obfuscation).
OBFUSCATION = "Qx7f2a"
FAILED_MESSAGE = (
    "An error occurred while processing your request. You can retry your request, "
    "or contact us through our help center at help.openai.com if the error persists. "
    "Please include the request ID {} in your message."
)


def _stem(reply: Reply) -> str:
    return reply.message_id.removeprefix("msg_").removeprefix("resp_")


def response_id(reply: Reply) -> str:
    return f"resp_{_stem(reply)}"


def _incomplete_reason(reply: Reply) -> str | None:
    return INCOMPLETE_REASONS.get(reply.stop_reason or "")


def usage(reply: Reply) -> dict[str, Any]:
    u = reply.usage
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": u.cache_read_input_tokens,
            "cache_write_tokens": u.cache_creation_input_tokens,
        },
        "output_tokens": u.output_tokens,
        # A Reply does not say how many of its output tokens were reasoning.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + u.output_tokens,
    }


def _wants_summary(request: dict[str, Any]) -> bool:
    return (request.get("reasoning") or {}).get("summary") is not None


def _wants_encrypted(request: dict[str, Any]) -> bool:
    return "reasoning.encrypted_content" in (request.get("include") or [])


def _wants_obfuscation(request: dict[str, Any]) -> bool:
    return (request.get("stream_options") or {}).get("include_obfuscation") is not False


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _arguments(call: ToolCall) -> str:
    return "".join(call.json_fragments())


def _reasoning_text(block: Thinking | RedactedThinking) -> str:
    return block.text if isinstance(block, Thinking) else ""


def _item(reply: Reply, request: dict[str, Any], index: int, block: Any) -> dict[str, Any]:
    """The output item for `block`, as it is once done."""
    if isinstance(block, Text):
        return {
            "id": f"msg_{_stem(reply)}_{index}",
            "type": "message",
            "status": "completed",
            "content": [_text_part(block.text)],
            "role": "assistant",
        }
    if isinstance(block, ToolCall):
        return {
            "id": f"fc_{_stem(reply)}_{index}",
            "type": "function_call",
            "status": "completed",
            "arguments": _arguments(block),
            "call_id": block.id,
            "name": block.name,
        }
    item: dict[str, Any] = {"id": f"rs_{_stem(reply)}_{index}", "type": "reasoning"}
    if _wants_encrypted(request):
        item["encrypted_content"] = block.signature if isinstance(block, Thinking) else block.data
    text = _reasoning_text(block)
    item["summary"] = (
        [{"type": "summary_text", "text": text}] if text and _wants_summary(request) else []
    )
    return item


def _output(reply: Reply, request: dict[str, Any]) -> list[dict[str, Any]]:
    output = [_item(reply, request, i, block) for i, block in enumerate(reply.blocks)]
    # The item the token limit cut short.
    if _incomplete_reason(reply) and output and output[-1]["type"] != "reasoning":
        output[-1]["status"] = "incomplete"
    return output


def _tools(request: dict[str, Any]) -> list[Any]:
    tools = request.get("tools") or []
    return [
        {"description": None, "strict": True, **t}
        if isinstance(t, dict) and t.get("type") == "function"
        else t
        for t in tools
    ]


def _response(
    reply: Reply,
    request: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response object in `status`, echoing the request's settings."""
    reasoning = request.get("reasoning") or {}
    thinks = any(isinstance(b, Thinking | RedactedThinking) for b in reply.blocks)
    tier = request.get("service_tier")
    reason = _incomplete_reason(reply) if status == "incomplete" else None
    final = status in ("completed", "incomplete")
    return {
        "id": response_id(reply),
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "background": bool(request.get("background", False)),
        "billing": {"payer": "developer"},
        "completed_at": CREATED + 1 if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "max_tool_calls": request.get("max_tool_calls"),
        "model": request.get("model", ""),
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": request.get("prompt_cache_key"),
        "prompt_cache_retention": request.get("prompt_cache_retention"),
        "reasoning": {
            "effort": reasoning.get("effort", "medium" if thinks else None),
            "summary": reasoning.get("summary"),
        },
        "safety_identifier": request.get("safety_identifier"),
        "service_tier": "default" if tier in (None, "auto") else tier,
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **(request.get("text") or {})},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": _tools(request),
        "top_logprobs": request.get("top_logprobs", 0),
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation", "disabled"),
        "usage": usage(reply) if final else None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def _final_status(reply: Reply) -> str:
    return "incomplete" if _incomplete_reason(reply) else "completed"


def response_body(reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a non-streaming response."""
    return _response(reply, request, status=_final_status(reply), output=_output(reply, request))


def _item_events(
    request: dict[str, Any], index: int, block: Any, done: dict[str, Any]
) -> list[dict[str, Any]]:
    """The events between an item's output_item.added and output_item.done."""
    ids = {"item_id": done["id"], "output_index": index}
    pad = {"obfuscation": OBFUSCATION} if _wants_obfuscation(request) else {}
    if isinstance(block, Text):
        at = {**ids, "content_index": 0}
        return [
            {"type": "response.content_part.added", **at, "part": _text_part("")},
            *(
                {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": [], **pad}
                for piece in block.chunks()
            ),
            {"type": "response.output_text.done", **at, "text": block.text, "logprobs": []},
            {"type": "response.content_part.done", **at, "part": _text_part(block.text)},
        ]
    if isinstance(block, ToolCall):
        return [
            *(
                {"type": "response.function_call_arguments.delta", **ids, "delta": f, **pad}
                for f in block.json_fragments()
            ),
            {
                "type": "response.function_call_arguments.done",
                **ids,
                "arguments": done["arguments"],
            },
        ]
    events: list[dict[str, Any]] = []
    for summary_index, summary in enumerate(done["summary"]):
        at = {**ids, "summary_index": summary_index}
        text = summary["text"]
        events.append({"type": "response.reasoning_summary_part.added", **at, "part": _summary("")})
        events.extend(
            {"type": "response.reasoning_summary_text.delta", **at, "delta": piece, **pad}
            for piece in Text(text).chunks()
        )
        events.append({"type": "response.reasoning_summary_text.done", **at, "text": text})
        events.append(
            {"type": "response.reasoning_summary_part.done", **at, "part": _summary(text)}
        )
    return events


def _summary(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def _added(done: dict[str, Any]) -> dict[str, Any]:
    """An item as output_item.added shows it: in progress, nothing generated yet."""
    if done["type"] == "message":
        return {**done, "status": "in_progress", "content": []}
    if done["type"] == "function_call":
        return {**done, "status": "in_progress", "arguments": ""}
    return {**done, "summary": []}


def _events(reply: Reply, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every event of a streaming response, numbered."""
    start = _response(reply, request, status="in_progress", output=[])
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
    ]
    output = _output(reply, request)
    for index, (block, done) in enumerate(zip(reply.blocks, output, strict=True)):
        events.append(
            {"type": "response.output_item.added", "output_index": index, "item": _added(done)}
        )
        events.extend(_item_events(request, index, block, done))
        events.append({"type": "response.output_item.done", "output_index": index, "item": done})
    status = _final_status(reply)
    final = _response(reply, request, status=status, output=output)
    events.append({"type": f"response.{status}", "response": final})
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def _sse(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(reply: Reply, request: dict[str, Any]) -> list[bytes]:
    """Every SSE event of a streaming response, in order."""
    return [_sse(event) for event in _events(reply, request)]


def _output_so_far(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items a client has seen begin or end in `events`."""
    items: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] in ("response.output_item.added", "response.output_item.done"):
            items[event["output_index"]] = copy.deepcopy(event["item"])
    return [items[i] for i in sorted(items)]


def stream_error_event(reply: Reply, request: dict[str, Any]) -> bytes:
    """The event that fails the stream after `reply.error_after` events."""
    sent = reply.error_after or 0
    if reply.responses_failure == "response.failed":
        error = {
            "code": reply.error_code or "server_error",
            "message": FAILED_MESSAGE.format(reply.request_id),
        }
        output = _output_so_far(_events(reply, request)[:sent])
        failed = _response(reply, request, status="failed", output=output, error=error)
        return _sse({"type": "response.failed", "response": failed, "sequence_number": sent})
    envelope = {
        "type": reply.stream_error_type,
        "code": reply.error_code,
        "message": "The server had an error while processing your request.",
        "param": None,
    }
    return _sse({"type": "error", "error": envelope, "sequence_number": sent})
