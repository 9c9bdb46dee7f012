"""A checker of OpenAI's Chat Completions stream grammar, for every streaming chat test.

`check_chat_stream` parses the SSE bytes a client received and fails
(AssertionError) unless they follow the grammar the `openai` SDKs rely on:

    chunk+  finish-chunk  usage-chunk?  [DONE]

with data-only events (no `event:` names), every chunk of one `id`,
`object`, `created` and `model`; a first delta with role `assistant`; one
choice of index 0 per chunk; tool-call deltas that open each call (index
0, 1, 2... in order, with id, type `function` and a name) before any of its
argument fragments, and arguments that add up to a JSON object unless the
answer was cut short; exactly one chunk with a finish_reason, after which no
delta comes; a usage chunk (`choices: []`, counts that add up) after it if
and only if usage was asked for, `"usage"` null elsewhere. A
`data: {"error": {...}}` may end the stream at any point, followed by
`[DONE]` or by nothing (servers differ; the SDK raises on the error either
way). `partial=True` accepts a stream cut anywhere (a client that
disconnected): a prefix of the grammar, its last incomplete event ignored.
"""

from __future__ import annotations

import json
from typing import Any, TypeGuard

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
DELTA_KEYS = {"role", "content", "refusal", "reasoning_content", "tool_calls", "function_call"}
DONE = "[DONE]"


def parse_data(raw: bytes, *, partial: bool = False) -> list[str]:
    """The `data` of each SSE event of `raw`; `partial`: drop a last incomplete event."""
    raw = raw.replace(b"\r\n", b"\n")
    end = raw.rfind(b"\n\n") + 2 if b"\n\n" in raw else 0
    tail = raw[end:]  # what follows the last blank line: an event cut short
    if tail.strip(b"\n"):
        assert partial, f"the stream ends inside an event: {tail[:200]!r}"
    events: list[str] = []
    # Decoded only up to the cut, which may fall inside a UTF-8 character.
    for chunk in raw[:end].decode("utf-8").split("\n\n"):
        data_lines = []
        for line in chunk.split("\n"):
            if not line or line.startswith(":"):
                continue  # a comment
            name, _, value = line.partition(":")
            assert name == "data", f"a Chat stream has only data lines, not {line!r}"
            data_lines.append(value.removeprefix(" "))
        if data_lines:
            events.append("\n".join(data_lines))
    return events


def check_chat_stream(
    raw: bytes, *, include_usage: bool, partial: bool = False
) -> list[dict[str, Any]]:
    """Parses `raw` and asserts the Chat stream grammar; returns every chunk (and error)."""
    grammar = _Grammar(include_usage)
    chunks: list[dict[str, Any]] = []
    for position, data in enumerate(parse_data(raw, partial=partial)):
        where = f"event {position}"
        assert not grammar.done, f"{where} follows [DONE]"
        if data == DONE:
            grammar.finish_stream(where)
            continue
        assert not grammar.failed, f"{where}: only [DONE] may follow an error"
        chunk = json.loads(data)
        assert isinstance(chunk, dict), f"{where}: data is not a JSON object"
        chunks.append(chunk)
        grammar.step(where, chunk)
    if not partial:
        assert grammar.done or grammar.failed, "the stream ends without [DONE] or an error"
    return chunks


class _Grammar:
    """The state of a stream being checked."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.head: tuple[Any, ...] | None = None
        self.finish_reason: str | None = None
        self.usage_seen = False
        self.done = False
        self.failed = False
        self.arguments: list[list[str]] = []  # per tool call, its fragments

    def step(self, where: str, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            error = chunk["error"]
            assert isinstance(error, dict), f"{where}: no error object"
            assert isinstance(error.get("message"), str), f"{where}: the error has no message"
            assert isinstance(error.get("type"), str), f"{where}: the error has no type"
            assert "param" in error and "code" in error, f"{where}: error.param / error.code"
            self.failed = True
            return
        head = (chunk.get("id"), chunk.get("object"), chunk.get("created"), chunk.get("model"))
        assert isinstance(head[0], str) and head[0], f"{where}: id {head[0]!r}"
        assert head[1] == "chat.completion.chunk", f"{where}: object {head[1]!r}"
        assert isinstance(head[2], int), f"{where}: created {head[2]!r}"
        assert isinstance(head[3], str), f"{where}: model {head[3]!r}"
        first = self.head is None
        if first:
            self.head = head
        assert head == self.head, f"{where}: id/object/created/model {head} != {self.head}"
        choices = chunk.get("choices")
        assert isinstance(choices, list), f"{where}: no choices"
        usage = chunk.get("usage")
        if not choices:
            self.usage_chunk(where, usage)
            return
        assert usage is None, f"{where}: usage in a chunk with choices"
        assert not self.usage_seen, f"{where}: a delta after the usage chunk"
        assert len(choices) == 1, f"{where}: {len(choices)} choices (n is 1)"
        choice = choices[0]
        assert isinstance(choice, dict) and choice.get("index") == 0, f"{where}: choice index"
        assert choice.get("logprobs") is None, f"{where}: logprobs"
        assert self.finish_reason is None, f"{where}: a choice after the finish chunk"
        delta = choice.get("delta")
        assert isinstance(delta, dict), f"{where}: no delta"
        self.delta(where, delta, first)
        reason = choice.get("finish_reason")
        if reason is not None:
            assert reason in FINISH_REASONS, f"{where}: finish_reason {reason!r}"
            self.finish_reason = reason
            if reason not in ("length", "content_filter"):
                for i, fragments in enumerate(self.arguments):
                    joined = "".join(fragments)
                    if joined:
                        parsed = json.loads(joined)
                        assert isinstance(parsed, dict), f"tool call {i}: arguments not an object"

    def delta(self, where: str, delta: dict[str, Any], first: bool) -> None:
        assert set(delta) <= DELTA_KEYS, f"{where}: unknown delta keys {set(delta) - DELTA_KEYS}"
        if first:
            assert delta.get("role") == "assistant", f"{where}: the first delta has no role"
        else:
            assert delta.get("role") in (None, "assistant"), f"{where}: role {delta['role']!r}"
        for key in ("content", "refusal", "reasoning_content"):
            value = delta.get(key)
            assert value is None or isinstance(value, str), f"{where}: {key} is no string"
        calls = delta.get("tool_calls")
        if calls is None:
            return
        assert isinstance(calls, list) and calls, f"{where}: tool_calls is no list"
        for call in calls:
            assert isinstance(call, dict), f"{where}: a tool call is no object"
            index = call.get("index")
            assert isinstance(index, int), f"{where}: tool call without an index"
            function = call.get("function") or {}
            assert isinstance(function, dict), f"{where}: tool call {index}: function"
            if index == len(self.arguments):  # a new call: it opens with id, type and name
                assert isinstance(call.get("id"), str) and call["id"], f"{where}: call {index} id"
                assert call.get("type") == "function", f"{where}: call {index} type"
                name = function.get("name")
                assert isinstance(name, str) and name, f"{where}: tool call {index} has no name"
                self.arguments.append([])
            else:
                assert index < len(self.arguments), (
                    f"{where}: tool call {index} before call {len(self.arguments)}"
                )
                assert call.get("id") is None, f"{where}: tool call {index} opened twice"
                assert function.get("name") is None, f"{where}: tool call {index} renamed"
            arguments = function.get("arguments")
            if arguments is not None:
                assert isinstance(arguments, str), f"{where}: call {index} arguments no string"
                self.arguments[index].append(arguments)

    def usage_chunk(self, where: str, usage: Any) -> None:
        assert self.include_usage, f"{where}: a usage chunk that was not asked for"
        assert self.finish_reason is not None, f"{where}: the usage chunk before the finish"
        assert not self.usage_seen, f"{where}: a second usage chunk"
        assert isinstance(usage, dict), f"{where}: a chunk with no choices and no usage"
        prompt, completion, total = (
            usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        )
        assert _is_count(prompt), f"{where}: usage.prompt_tokens {prompt!r}"
        assert _is_count(completion), f"{where}: usage.completion_tokens {completion!r}"
        assert total == prompt + completion, f"{where}: total_tokens is not the sum"
        details = usage.get("prompt_tokens_details")
        if details is not None:
            cached = details.get("cached_tokens")
            assert cached is None or _is_count(cached), f"{where}: cached_tokens"
            assert cached is None or cached <= prompt, f"{where}: cached > prompt tokens"
        self.usage_seen = True

    def finish_stream(self, where: str) -> None:
        if not self.failed:
            assert self.finish_reason is not None, f"{where}: [DONE] before a finish_reason"
            assert self.usage_seen == self.include_usage, (
                f"{where}: usage chunk {'missing' if self.include_usage else 'not asked for'}"
            )
        self.done = True


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
