"""The Responses API codec of the HTTP front door: bodies in, OpenAI's stream grammar out.

Decoding: every item kind and field, a request as Codex CLI sends it, the
stateful fields refused, every violation at once, what cannot be translated
or is dropped, and a fuzz that only InvalidArgumentError may escape.
Encoding: the SSE bytes of each kind of turn, checked by the grammar checker
(itself shown to fail on bad streams) and by the `openai` SDK's own stream
state and models, the stream and the whole answer agreeing, and a turn's
output passed back as input decoding to what the model said.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types.responses import Response

from server.errors import (
    BudgetExceededError,
    ContextWindowExceededError,
    FieldViolation,
    InvalidArgumentError,
    RateLimitExceededError,
    UpstreamProtocolError,
    UpstreamUnavailableError,
)
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    ResponseAccumulator,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.http_edge.responses_decoding import (
    STATELESS,
    UNTRANSLATABLE,
    DecodedResponses,
    decode_responses,
    fit_max_tokens,
)
from server.http_edge.responses_encoding import (
    ResponsesStreamEncoder,
    encode_response,
    failure_code,
    open_thinking,
    seal_thinking,
)
from server.providers import _anthropic_codec
from server.schema import (
    CacheControl,
    CallerMetadata,
    GenerationRequest,
    GenerationResponse,
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
from server.token_estimate import count_request
from tests.openai_responses_grammar import check_responses_stream

PNG = b"\x89PNG\r\n\x1a\nnot really"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
SIGNED = ThinkingBlock("Let me think.", "c2lnbmF0dXJl")
OPENAI_REASONING = "gAAAAABoQ3Z0c2VjcmV0LWVuY3J5cHRlZC1yZWFzb25pbmc="

# Builders of Responses JSON, as the SDKs and Codex CLI write it.


def message(role: str, *parts: Any, **extra: Any) -> dict[str, Any]:
    """A message item; one string part is the content's string shorthand."""
    plain = len(parts) == 1 and isinstance(parts[0], str)
    return {"type": "message", "role": role, "content": parts[0] if plain else list(parts), **extra}


def input_text(text: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "input_text", "text": text, **extra}


def output_text(text: Any) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def input_image(url: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "input_image", "image_url": url, "detail": "auto", **extra}


def call(call_id: Any, name: Any = "f", arguments: Any = "{}", **extra: Any) -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        **extra,
    }


def call_output(call_id: Any, output: Any = "ok", **extra: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output, **extra}


def reasoning(sealed: Any, summary: str = "") -> dict[str, Any]:
    parts = [{"type": "summary_text", "text": summary}] if summary else []
    return {"type": "reasoning", "summary": parts, "encrypted_content": sealed}


def function(name: str, parameters: Any = None, **extra: Any) -> dict[str, Any]:
    tool = {"type": "function", "name": name, "parameters": parameters or SCHEMA}
    return tool | {"strict": False} | extra


def body_of(*items: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": list(items), **fields}


def decode(body: Any) -> DecodedResponses:
    return decode_responses(body, request_id="req-1", deadline=12.5)


def violations(body: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgumentError) as caught:
        decode(body)
    return {v.field: v.description for v in caught.value.violations}


def untranslatable(body: Any) -> set[str]:
    return {v.field for v in decode(body).untranslatable}


# -- Decoding --------------------------------------------------------------------------


def test_decodes_every_item_kind_and_field() -> None:
    body = body_of(
        message("developer", input_text("Answer in French.")),
        message(
            "user",
            input_text("What is in", prompt_cache_breakpoint={"mode": "explicit", "ttl": "12h"}),
            input_image(PNG_URL),
            input_image("https://example.com/a.png"),
        ),
        message("assistant", output_text("Let me look."), {"type": "refusal", "refusal": "No."}),
        reasoning(seal_thinking(SIGNED), "Let me think."),
        call("call_1", "weather", '{"city": "Paris"}'),
        call("call_2", "weather", ""),
        call_output("call_1", "sunny"),
        call_output("call_2", [input_text("rain"), input_image(PNG_URL)]),
        {"role": "user", "content": "Thanks!"},
        instructions="Be brief.",
        max_output_tokens=9000,
        stream=True,
        store=False,
        temperature=0.5,
        top_p=0.9,
        reasoning={"effort": "medium"},
        tools=[function("weather", description="The weather in a city.")],
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
        safety_identifier="user-7",
    )
    decoded = decode(body)
    assert decoded.stream is True
    assert decoded.untranslatable == []
    assert decoded.dropped == []
    image = ImageBlock(data=PNG, media_type="image/png")
    assert decoded.request == GenerationRequest(
        model="m",
        messages=[
            Message(
                Role.USER,
                [
                    TextBlock("What is in", CacheControl(43200.0)),
                    image,
                    ImageBlock(url="https://example.com/a.png"),
                ],
            ),
            Message(
                Role.ASSISTANT,
                [
                    TextBlock("Let me look."),
                    TextBlock("No."),
                    SIGNED,
                    ToolUseBlock("call_1", "weather", {"city": "Paris"}),
                    ToolUseBlock("call_2", "weather", {}),
                ],
            ),
            Message(
                Role.USER,
                [
                    ToolResultBlock("call_1", [TextBlock("sunny")]),
                    ToolResultBlock("call_2", [TextBlock("rain"), image]),
                    TextBlock("Thanks!"),
                ],
            ),
        ],
        max_tokens=9000,
        request_id="req-1",
        system=[TextBlock("Be brief."), TextBlock("Answer in French.")],
        tools=[Tool("weather", "The weather in a city.", SCHEMA)],
        tool_choice=ToolChoice(ToolChoiceMode.TOOL, "weather", disable_parallel_tool_use=True),
        temperature=0.5,
        top_p=0.9,
        thinking_budget_tokens=8192,
        metadata=CallerMetadata(end_user_id="user-7"),
        incremental=True,
        deadline=12.5,
    )
    assert decoded.echo == {
        "instructions": "Be brief.",
        "max_output_tokens": 9000,
        "parallel_tool_calls": False,
        "safety_identifier": "user-7",
        "store": False,
        "temperature": 0.5,
        "tool_choice": {"type": "function", "name": "weather"},
        "tools": body["tools"],
        "top_p": 0.9,
        "reasoning": {"effort": "medium", "summary": None},
    }


def test_input_as_a_string_and_the_defaults() -> None:
    decoded = decode({"model": "m", "input": "Hello"})
    assert decoded.stream is False
    assert decoded.request == GenerationRequest(
        model="m",
        messages=[Message(Role.USER, [TextBlock("Hello")])],
        max_tokens=0,  # the adapter fills it: fit_max_tokens
        request_id="req-1",
        incremental=False,
        deadline=12.5,
    )
    assert (decoded.untranslatable, decoded.dropped, decoded.echo) == ([], [], {})


def codex_request(**changes: Any) -> dict[str, Any]:
    """A request as Codex CLI sends it to a `wire_api = "responses"` provider, mid-task."""
    shell = {
        "type": "object",
        "properties": {
            "command": {"type": "array", "items": {"type": "string"}},
            "workdir": {"type": "string"},
            "timeout_ms": {"type": "number"},
        },
        "required": ["command"],
        "additionalProperties": False,
    }
    plan = {"type": "object", "properties": {"plan": {"type": "array"}}, "required": ["plan"]}
    request: dict[str, Any] = {
        "model": "claude-sonnet",
        "instructions": "You are Codex, a coding agent based on GPT-5.",
        "input": [
            message("developer", input_text("<permissions instructions>sandboxed")),
            message("user", input_text("<environment_context>cwd=/repo</environment_context>")),
            message("user", input_text("List the files.")),
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "**Listing files**"}],
                "content": None,
                "encrypted_content": OPENAI_REASONING,
            },
            call("call_a", "shell", '{"command":["ls"],"workdir":"/repo"}'),
            call_output("call_a", '{"output":"README.md\\n","metadata":{"exit_code":0}}'),
            message("assistant", output_text("There is one file: README.md.")),
            message("user", input_text("Thanks.")),
        ],
        "tools": [
            function("shell", shell, description="Runs a shell command."),
            function("update_plan", plan, description="Updates the task plan."),
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a7c3-5a4e-7d12-9c1e-2f5b8e4d3a10",
        "text": {"verbosity": "low"},
    }
    return request | changes


def test_a_codex_request_translates_dropping_only_hints() -> None:
    decoded = decode(codex_request())
    request = decoded.request
    assert decoded.stream is True
    assert decoded.untranslatable == []
    # OpenAI's encrypted reasoning means nothing to another provider.
    assert decoded.dropped == [
        "prompt_cache_key",
        "input[3]",
        "reasoning.summary",
        "text.verbosity",
    ]
    assert [b.text for b in request.system] == [
        "You are Codex, a coding agent based on GPT-5.",
        "<permissions instructions>sandboxed",
    ]
    user, said = Role.USER, Role.ASSISTANT
    assert [m.role for m in request.messages] == [user, said, user, said, user]
    assert request.messages[0].content == [
        TextBlock("<environment_context>cwd=/repo</environment_context>"),
        TextBlock("List the files."),
    ]
    assert request.messages[1].content == [
        ToolUseBlock("call_a", "shell", {"command": ["ls"], "workdir": "/repo"})
    ]
    assert request.messages[2].content == [
        ToolResultBlock(
            "call_a", [TextBlock('{"output":"README.md\\n","metadata":{"exit_code":0}}')]
        ),
    ]
    assert request.tool_choice == ToolChoice(ToolChoiceMode.AUTO, disable_parallel_tool_use=True)
    assert [t.name for t in request.tools] == ["shell", "update_plan"]
    assert request.thinking_budget_tokens == 8192


def test_codex_tools_only_openai_runs_are_untranslatable_and_still_counted() -> None:
    patch = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edits files.",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: ..."},
    }
    body = codex_request(
        tools=[patch, {"type": "local_shell"}, {"type": "web_search"}],
        input=[
            message("user", input_text("Fix it.")),
            {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** x"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done."},
        ],
    )
    decoded = decode(body)
    assert {v.field for v in decoded.untranslatable} == {
        "tools[0]",
        "tools[1]",
        "input[1]",
        "input[2]",
    }
    # Web search, offered on every Codex request, is left out rather than refused.
    assert "tools[2]" in decoded.dropped
    request = decoded.request
    assert [t.name for t in request.tools] == ["apply_patch", "local_shell"]
    assert "start: ..." in request.tools[0].description
    assert [m.role for m in request.messages] == [Role.USER, Role.ASSISTANT, Role.USER]
    assert count_request(request.system, request.messages, request.tools) > 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"store": True}, "store"),
    ],
)
def test_state_the_gateway_does_not_keep_is_refused(fields: dict[str, Any], field: str) -> None:
    found = violations(body_of(message("user", input_text("hi")), **fields))
    assert list(found) == [field]
    assert STATELESS in found[field]
    assert "send the whole conversation in input" in found[field]


def test_store_false_or_left_out_and_the_other_stateful_things() -> None:
    for store in ({}, {"store": False}, {"store": None}):
        assert decode(body_of(message("user", input_text("hi")), **store)).dropped == []
    assert "send store: false" in violations(body_of(input_text("x"), store=True))["store"]
    found = violations(
        body_of(
            message("user", input_text("hi")),
            {"type": "item_reference", "id": "msg_1"},
            background=True,
        )
    )
    assert set(found) == {"input[1]", "background"}
    assert STATELESS in found["input[1]"]


def test_every_hard_violation_is_named_at_once() -> None:
    body = {
        "model": "",
        "stream": "yes",
        "max_output_tokens": 0,
        "instructions": ["not", "a", "string"],
        "temperature": 2.5,
        "top_p": -1,
        "reasoning": {"effort": "extreme"},
        "tool_choice": "sometimes",
        "parallel_tool_calls": "no",
        "user": 7,
        "metadata": {"k": 1},
        "prompt_cache_key": 5,
        "truncation": "middle",
        "include": "reasoning.encrypted_content",
        "text": "plain",
        "tools": [
            {"type": "function", "name": ""},
            function("f"),
            function("f", parameters=[1]),
            {"name": "no type"},
        ],
        "input": [
            "not an item",
            {"type": "message", "role": "robot", "content": "hi"},
            message("user", {"text": "no type"}, input_text(3), input_image("ftp://x")),
            message("user", input_image("data:image/png;base64,@@@")),
            message("user", input_image("data:application/pdf;base64,AAAA")),
            message("assistant", input_image(PNG_URL)),
            call("", "", 7),
            call("dup"),
            call("dup"),
            call_output("unknown"),
            call_output("dup", {"not": "a list"}),
            reasoning(7),
            reasoning("llmgw.thinking.v1.not-base64!"),
        ],
    }
    assert set(violations(body)) == {
        "model",
        "stream",
        "max_output_tokens",
        "instructions",
        "temperature",
        "top_p",
        "reasoning.effort",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "metadata",
        "prompt_cache_key",
        "truncation",
        "include",
        "text",
        "tools[0].name",
        "tools[2].name",
        "tools[2].parameters",
        "tools[3]",
        "input[0]",
        "input[1].role",
        "input[2].content[0]",
        "input[2].content[1].text",
        "input[2].content[2].image_url",
        "input[3].content[0].image_url",
        "input[4].content[0].image_url",
        "input[5].content[0]",
        "input[6].call_id",
        "input[6].name",
        "input[6].arguments",
        "input[8].call_id",
        "input[9].call_id",
        "input[10].output",
        "input[11].encrypted_content",
        "input[12].encrypted_content",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"input": "hi"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": "m", "input": "hi", "tool_choice": {"type": "function"}}, "tool_choice.name"),
        (
            {"model": "m", "input": "hi", "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice.name",
        ),
        ({"model": "m", "input": "hi", "text": {"format": "json"}}, "text.format"),
        ({"model": "m", "input": "hi", "include": [3]}, "include[0]"),
        ({"model": "m", "input": "hi", "top_logprobs": -1}, "top_logprobs"),
        ({"model": "m", "input": "hi", "reasoning": "high"}, "reasoning"),
        ({"model": "m", "input": "hi", "reasoning": {"summary": 1}}, "reasoning.summary"),
        ({"model": "m", "input": "hi", "tools": {}}, "tools"),
        ({"model": "m", "input": "hi", "tools": [function("f", strict="yes")]}, "tools[0].strict"),
        ({"model": "m", "input": [message("user", "x", id=None)], "background": 1}, "background"),
        (
            {"model": "m", "input": [message("user", input_image(None))]},
            "input[0].content[0].image_url",
        ),
        (
            {
                "model": "m",
                "input": [
                    message(
                        "user",
                        input_text("x", prompt_cache_breakpoint={"mode": "explicit", "ttl": "1h"}),
                    )
                ],
            },
            "input[0].content[0].prompt_cache_breakpoint.ttl",
        ),
        (
            {"model": "m", "input": [message("user", input_text("x", prompt_cache_breakpoint=1))]},
            "input[0].content[0].prompt_cache_breakpoint",
        ),
        ({"model": "m", "input": [{"type": 3}]}, "input[0]"),
        ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ],
)
def test_top_level_and_item_violations(body: Any, field: str) -> None:
    assert field in violations(body)


def test_untranslatable_fields_parts_and_items_are_listed() -> None:
    body = body_of(
        message("system", input_text("Rules."), input_image(PNG_URL)),
        message(
            "user",
            {"type": "input_file", "filename": "a.pdf", "file_data": "JVBERi0xLjQ="},
            {"type": "input_image", "file_id": "file_1", "detail": "auto"},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            input_text("hi", weight=3),
        ),
        call("c1", "f", "[1, 2]"),
        call("c2", "f", "{}", caller={"type": "program", "caller_id": "p"}),
        call_output(None),
        {"type": "compaction", "encrypted_content": "xyz"},
        text={"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}},
        tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []},
        top_logprobs=2,
        include=["message.output_text.logprobs"],
        prompt={"id": "pmpt_1"},
        top_k=3,
    )
    assert untranslatable(body) == {
        "input[0].content[1]",
        "input[1].content[0]",
        "input[1].content[1].file_id",
        "input[1].content[2]",
        "input[1].content[3].weight",
        "input[2].arguments",
        "input[3].caller",
        "input[4].call_id",
        "input[5]",
        "text.format",
        "tool_choice",
        "top_logprobs",
        "include[0]",
        "prompt",
        "top_k",
    }
    found = decode(body)
    assert all(UNTRANSLATABLE in v.description for v in found.untranslatable)
    # A file's base64 is left out of what the estimate counts.
    counted = [b for m in found.request.messages for b in m.content if isinstance(b, TextBlock)]
    assert not any("JVBERi0" in b.text for b in counted)


def test_instructions_alone_are_untranslatable() -> None:
    decoded = decode(body_of(message("developer", input_text("Say hi.")), instructions="Be nice."))
    assert [v.field for v in decoded.untranslatable] == ["input"]


def test_hints_a_translation_leaves_out_are_listed_as_dropped() -> None:
    body = body_of(
        message("user", input_image("https://x/a.png", detail="high")),
        message("assistant", output_text("hi"), phase="final_answer"),
        call("c1", "f", "{}", namespace="tools"),
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        metadata={"team": "a"},
        service_tier="flex",
        truncation="auto",
        max_tool_calls=3,
        stream_options={"include_obfuscation": False},
        include=["reasoning.encrypted_content", "web_search_call.action.sources"],
        reasoning={"effort": "low", "summary": "detailed", "context": "all_turns"},
        text={"format": {"type": "text"}, "verbosity": "high"},
        tools=[function("f", strict=True, defer_loading=False)],
        parallel_tool_calls=True,
    )
    decoded = decode(body)
    assert decoded.untranslatable == []
    assert set(decoded.dropped) == {
        "input[0].content[0].detail",
        "input[1].phase",
        "input[2].namespace",
        "prompt_cache_key",
        "prompt_cache_retention",
        "metadata",
        "service_tier",
        "truncation",
        "max_tool_calls",
        "stream_options",
        "include[1]",
        "reasoning.context",
        "reasoning.summary",
        "text.verbosity",
        "tools[0].strict",
    }
    assert decoded.request.tool_choice is None  # parallel tool calls are the default


@pytest.mark.parametrize(
    ("effort", "max_output_tokens", "budget"),
    [
        ("none", None, None),
        ("minimal", None, 1024),
        ("low", None, 2048),
        ("medium", None, 8192),
        ("high", None, 32768),
        ("xhigh", None, 65536),
        ("max", None, 131072),
        ("high", 16000, 15999),
        ("medium", 1025, 1024),
        ("low", 1024, None),
        (None, None, None),
    ],
)
def test_reasoning_effort_is_a_thinking_budget_below_max_tokens(
    effort: str | None, max_output_tokens: int | None, budget: int | None
) -> None:
    body = body_of(message("user", input_text("hi")), reasoning={"effort": effort})
    if max_output_tokens is not None:
        body["max_output_tokens"] = max_output_tokens
    decoded = decode(body)
    assert decoded.request.thinking_budget_tokens == budget
    assert ("reasoning.effort" in decoded.dropped) == (effort == "low" and budget is None)


def test_fit_max_tokens_keeps_thinking_below_the_model_default() -> None:
    request = decode(body_of(message("user", "hi"), reasoning={"effort": "high"})).request
    assert (request.max_tokens, request.thinking_budget_tokens) == (0, 32768)
    fit_max_tokens(request, 64000)
    assert (request.max_tokens, request.thinking_budget_tokens) == (64000, 32768)
    fit_max_tokens(request, 8192)
    assert (request.max_tokens, request.thinking_budget_tokens) == (8192, 8191)
    fit_max_tokens(request, 1000)
    assert (request.max_tokens, request.thinking_budget_tokens) == (1000, None)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("none", None, ToolChoice(ToolChoiceMode.NONE)),
        ("auto", None, ToolChoice(ToolChoiceMode.AUTO)),
        ("required", None, ToolChoice(ToolChoiceMode.ANY)),
        ({"type": "function", "name": "f"}, None, ToolChoice(ToolChoiceMode.TOOL, "f")),
        ("required", False, ToolChoice(ToolChoiceMode.ANY, disable_parallel_tool_use=True)),
        (None, False, ToolChoice(ToolChoiceMode.AUTO, disable_parallel_tool_use=True)),
        (None, True, None),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, expected: ToolChoice | None) -> None:
    body = body_of(message("user", "hi"), tools=[function("f")], tool_choice=choice)
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert decode(body).request.tool_choice == expected


def test_the_end_user_is_the_safety_identifier_or_else_user() -> None:
    def end_user(**fields: Any) -> str:
        return decode(body_of(message("user", "hi"), **fields)).request.metadata.end_user_id

    assert end_user(user="u") == "u"
    assert end_user(safety_identifier="s") == "s"
    assert end_user(user="u", safety_identifier="s") == "s"
    assert end_user(user="u", safety_identifier="") == "u"


def test_sealed_thinking_opens_to_the_same_block_and_nothing_else_does() -> None:
    redacted = ThinkingBlock(redacted_data="EmwKAhgBEgy3va3pzix/LafPsn4a")
    for block in (SIGNED, redacted, ThinkingBlock("", "sig-only")):
        sealed = seal_thinking(block)
        assert sealed is not None
        assert open_thinking(sealed) == block
    assert seal_thinking(ThinkingBlock("unsigned")) is None
    assert open_thinking(OPENAI_REASONING) is None
    sealed = seal_thinking(SIGNED) or ""
    for damaged in (sealed[:-3], sealed[:18] + "e30=", sealed[:18] + "W10="):
        with pytest.raises(ValueError, match="damaged"):
            open_thinking(damaged)


# -- Decoding fuzz ---------------------------------------------------------------------

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
SHORT = st.text(max_size=6)


def mostly(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually `strategy`'s valid values, sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, JSON_VALUE)


SEALS = st.sampled_from(
    [seal_thinking(SIGNED), OPENAI_REASONING, "llmgw.thinking.v1.e30=", "llmgw.thinking.v1.%"]
)
PART = st.one_of(
    st.builds(input_text, mostly(SHORT)),
    st.builds(output_text, mostly(SHORT)),
    st.builds(input_image, mostly(st.sampled_from([PNG_URL, "https://x/y.png", "data:,"]))),
    st.fixed_dictionaries({"type": st.sampled_from(["input_file", "refusal"])}),
    JSON_VALUE,
)
ROLE = st.sampled_from(["user", "assistant", "system", "developer", "tool"])
CALL_ID = st.sampled_from(["c1", "c2", ""])
ITEM = st.one_of(
    st.builds(lambda role, parts: message(role, *parts), ROLE, st.lists(PART, max_size=3)),
    st.fixed_dictionaries({"role": ROLE, "content": mostly(SHORT)}),
    st.builds(call, CALL_ID, mostly(SHORT), mostly(st.sampled_from(['{"a": 1}', "[]", "", "{"]))),
    st.builds(call_output, CALL_ID, mostly(SHORT | st.lists(PART, max_size=2))),
    st.builds(reasoning, mostly(SEALS)),
    st.fixed_dictionaries({"type": st.sampled_from(["item_reference", "web_search_call"])}),
    JSON_VALUE,
)
TOOL = st.one_of(
    st.builds(function, st.sampled_from(["f", "g", ""]), mostly(st.just(SCHEMA))),
    st.fixed_dictionaries({"type": st.sampled_from(["custom", "web_search"])}),
    JSON_VALUE,
)
BODY = st.fixed_dictionaries(
    {"model": mostly(st.just("m")), "input": mostly(SHORT | st.lists(ITEM, max_size=6))},
    optional={
        "instructions": mostly(SHORT),
        "stream": mostly(st.booleans()),
        "store": mostly(st.booleans()),
        "max_output_tokens": mostly(st.integers(0, 70000)),
        "temperature": mostly(st.floats(0, 2)),
        "top_p": mostly(st.floats(0, 1)),
        "reasoning": mostly(
            st.fixed_dictionaries(
                {},
                optional={
                    "effort": st.sampled_from(["low", "high", "max", "none", "wild"]),
                    "summary": st.sampled_from(["auto", "none", "concise"]),
                },
            )
        ),
        "tools": mostly(st.lists(TOOL, max_size=3)),
        "tool_choice": mostly(
            st.sampled_from(["auto", "none", "required", {"type": "function", "name": "f"}])
        ),
        "parallel_tool_calls": mostly(st.booleans()),
        "include": mostly(st.lists(st.sampled_from(["reasoning.encrypted_content", "x"]))),
        "text": mostly(st.fixed_dictionaries({"verbosity": st.just("low")})),
        "metadata": mostly(st.dictionaries(SHORT, SHORT, max_size=2)),
        "user": mostly(SHORT),
        "prompt_cache_key": mostly(SHORT),
        "previous_response_id": st.none() | SHORT,
        "truncation": mostly(st.sampled_from(["auto", "disabled"])),
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(JSON_VALUE, BODY, BODY, BODY))
def test_no_json_input_raises_anything_but_invalid_argument(body: Any) -> None:
    try:
        decoded = decode(body)
    except InvalidArgumentError as err:
        assert err.violations
        return
    request = decoded.request
    count_request(request.system, request.messages, request.tools)
    if not decoded.untranslatable:
        # What the Response object repeats of the request is what the SDK accepts.
        answer = GenerationResponse(id="x", model="m", provider="p", content=[TextBlock("hi")])
        document = encode_response(
            answer, response_id="resp_1", created_at=1, model="m", request_echo=decoded.echo
        )
        Response.model_validate(document)


# -- Encoding --------------------------------------------------------------------------


def encoder(**echo: Any) -> ResponsesStreamEncoder:
    return ResponsesStreamEncoder(
        response_id="resp_7", model="claude-x", created_at=1700000000, request_echo=echo
    )


def encode(events: list[StreamEvent], *, finish: bool = False) -> bytes:
    e = encoder()
    out = b"".join(e.feed(event) for event in events)
    return out + e.finish() if finish else out


def final(raw: bytes) -> dict[str, Any]:
    """The Response the stream's last event carries, checked by the grammar."""
    name, data = check_responses_stream(raw)[-1]
    assert name in ("response.completed", "response.incomplete", "response.failed")
    response: dict[str, Any] = data["response"]
    if name != "response.failed":  # its error code may be one the SDK does not list
        Response.model_validate(response)
    return response


def names(raw: bytes) -> list[str]:
    return [name for name, _ in check_responses_stream(raw)]


START = MessageStart("msg_up", "claude-x-1", "anthropic", usage=Usage(input_tokens=12))
USAGE = Usage(input_tokens=12, output_tokens=30, cache_read_input_tokens=100)
END: list[StreamEvent] = [MessageDelta(StopReason.END_TURN, usage=USAGE), MessageStop()]
TEXT_TURN: list[StreamEvent] = [
    START,
    ContentBlockStart(0, TextBlock("")),
    TextDelta(0, "Hello"),
    TextDelta(0, ", wörld"),
    ContentBlockStop(0),
    *END,
]


def test_a_text_turn_follows_the_grammar() -> None:
    raw = encode(TEXT_TURN)
    assert names(raw) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    response = final(raw)
    assert response["status"] == "completed"
    assert response["id"] == "resp_7"
    assert response["model"] == "claude-x"
    assert response["output"] == [
        {
            "id": "msg_7_0",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Hello, wörld", "annotations": [], "logprobs": []}
            ],
        }
    ]
    assert response["usage"] == {
        "input_tokens": 112,
        "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 142,
    }


def tool_turn(*calls: tuple[str, str, list[str]], text: str = "") -> list[StreamEvent]:
    events: list[StreamEvent] = [START]
    index = 0
    if text:
        events += [ContentBlockStart(0, TextBlock(text)), ContentBlockStop(0)]
        index = 1
    for call_id, name, fragments in calls:
        events.append(ContentBlockStart(index, ToolUseBlock(call_id, name)))
        events += [ToolInputDelta(index, f) for f in fragments]
        events.append(ContentBlockStop(index))
        index += 1
    return [*events, MessageDelta(StopReason.TOOL_USE, usage=USAGE), MessageStop()]


def test_a_function_call_turn() -> None:
    raw = encode(tool_turn(("toolu_1", "weather", ['{"city"', ': "Paris"}']), text="Let me see."))
    assert names(raw)[8:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    response = final(raw)
    assert response["output"][1] == {
        "id": "fc_7_1",
        "type": "function_call",
        "status": "completed",
        "call_id": "toolu_1",
        "name": "weather",
        "arguments": '{"city": "Paris"}',
    }


def test_two_function_calls_and_one_without_arguments() -> None:
    raw = encode(tool_turn(("c1", "ls", ['{"path":"/"}']), ("c2", "pwd", [])))
    output = final(raw)["output"]
    assert [(i["type"], i["call_id"], i["arguments"]) for i in output] == [
        ("function_call", "c1", '{"path":"/"}'),
        ("function_call", "c2", "{}"),
    ]
    assert [i["id"] for i in output] == ["fc_7_0", "fc_7_1"]


def test_a_call_whose_input_comes_whole_at_its_start() -> None:
    events: list[StreamEvent] = [
        START,
        ContentBlockStart(0, ToolUseBlock("c1", "f", {"a": [1, "é"]})),
        ContentBlockStop(0),
        *END,
    ]
    assert final(encode(events))["output"][0]["arguments"] == '{"a":[1,"é"]}'


def test_thinking_is_a_reasoning_item_with_its_seal() -> None:
    events: list[StreamEvent] = [
        START,
        ContentBlockStart(0, ThinkingBlock("")),
        ThinkingDelta(0, "Let me "),
        ThinkingDelta(0, "think."),
        SignatureDelta(0, "c2lnbmF0dXJl"),
        ContentBlockStop(0),
        ContentBlockStart(1, ThinkingBlock(redacted_data="EmwKAhgB")),
        ContentBlockStop(1),
        ContentBlockStart(2, ThinkingBlock("")),
        ThinkingDelta(2, "unsigned"),
        ContentBlockStop(2),
        ContentBlockStart(3, TextBlock("Yes.")),
        ContentBlockStop(3),
        *END,
    ]
    raw = encode(events)
    assert names(raw)[2:8] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ]
    output = final(raw)["output"]
    assert [i["type"] for i in output] == ["reasoning", "reasoning", "reasoning", "message"]
    assert output[0]["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert open_thinking(output[0]["encrypted_content"]) == SIGNED
    assert output[1]["summary"] == []
    assert open_thinking(output[1]["encrypted_content"]) == ThinkingBlock(redacted_data="EmwKAhgB")
    assert "encrypted_content" not in output[2]


@pytest.mark.parametrize(
    ("reason", "status", "why"),
    [
        (StopReason.MAX_TOKENS, "incomplete", "max_output_tokens"),
        (StopReason.CONTEXT_WINDOW_EXCEEDED, "incomplete", "max_output_tokens"),
        (StopReason.CONTENT_FILTER, "incomplete", "content_filter"),
        (StopReason.END_TURN, "completed", None),
        (StopReason.STOP_SEQUENCE, "completed", None),
        (StopReason.REFUSAL, "completed", None),
        (None, "completed", None),
    ],
)
def test_a_turn_cut_short_is_incomplete(reason: StopReason | None, status: str, why: str) -> None:
    events: list[StreamEvent] = [*TEXT_TURN[:-2], MessageDelta(reason, usage=USAGE), MessageStop()]
    raw = encode(events)
    assert names(raw)[-1] == f"response.{status}"
    response = final(raw)
    assert response["status"] == status
    assert response["incomplete_details"] == ({"reason": why} if why else None)
    assert response["output"][-1]["status"] == status


def test_blocks_left_open_and_interleaved_become_items_one_at_a_time() -> None:
    # OpenAI's decoder keeps text and tool blocks open together.
    events: list[StreamEvent] = [
        START,
        ContentBlockStart(0, TextBlock("")),
        TextDelta(0, "Looking"),
        ContentBlockStart(1, ToolUseBlock("c1", "f")),
        ToolInputDelta(1, "{}"),
        TextDelta(0, " again"),
        ContentBlockStart(2, TextBlock("")),  # empty: no item
        ContentBlockStop(2),
        ContentBlockStop(0),
        ContentBlockStop(1),
        *END,
    ]
    output = final(encode(events))["output"]
    assert [(i["type"], i["id"]) for i in output] == [
        ("message", "msg_7_0"),
        ("function_call", "fc_7_1"),
        ("message", "msg_7_2"),
    ]
    assert output[2]["content"][0]["text"] == " again"


def test_tool_input_after_another_item_began_is_refused() -> None:
    e = encoder()
    events: list[StreamEvent] = [
        START,
        ContentBlockStart(0, ToolUseBlock("c1", "f")),
        ToolInputDelta(0, '{"a"'),
        ContentBlockStart(1, TextBlock("x")),
    ]
    for event in events:
        e.feed(event)
    with pytest.raises(UpstreamProtocolError):
        e.feed(ToolInputDelta(0, ": 1}"))


def test_encoder_edges() -> None:
    e = encoder()
    assert e.feed(ContentBlockStart(0, TextBlock("early"))) == b""
    assert e.finish() == b""  # nothing started: the caller owes an error
    assert not e.started
    raw = e.feed(START) + e.feed(START)
    raw += e.feed(ContentBlockStart(0, ImageBlock(url="https://x/y.png")))
    raw += e.feed(TextDelta(0, "to an image"))
    raw += e.feed(TextDelta(5, "to nothing"))
    raw += e.feed(ContentBlockStart(1, TextBlock("")))
    raw += e.feed(TextDelta(1, ""))
    raw += e.feed(ContentBlockStop(1))
    raw += e.feed(TextDelta(1, "after its stop"))
    raw += e.feed(MessageStop())
    assert e.started and e.done
    assert e.feed(TextDelta(1, "after the end")) + e.finish() + e.failed("server_error", "x") == b""
    response = final(raw)
    assert response["output"] == []
    assert response["usage"]["input_tokens"] == 12  # MessageStart's usage, none came after


def test_the_request_settings_are_echoed() -> None:
    decoded = decode(codex_request(max_output_tokens=5000, metadata={"team": "a"}))
    e = ResponsesStreamEncoder(
        response_id="resp_1", model="claude-sonnet", created_at=1, request_echo=decoded.echo
    )
    created = check_responses_stream(e.feed(START), partial=True)[0][1]["response"]
    assert created["instructions"] == "You are Codex, a coding agent based on GPT-5."
    assert created["tools"] == codex_request()["tools"]
    assert created["parallel_tool_calls"] is False
    assert created["max_output_tokens"] == 5000
    assert created["metadata"] == {"team": "a"}
    assert created["reasoning"] == {"effort": "medium", "summary": "auto"}
    assert created["text"] == {"verbosity": "low"}
    assert created["prompt_cache_key"] == codex_request()["prompt_cache_key"]
    assert created["store"] is False
    assert created["status"] == "in_progress"
    Response.model_validate(created)


def test_a_failure_mid_stream_and_before_anything() -> None:
    e = encoder()
    raw = e.feed(START) + e.feed(ContentBlockStart(0, TextBlock(""))) + e.feed(TextDelta(0, "Hi"))
    raw += e.failed("context_length_exceeded", "prompt is too long")
    response = final(raw)
    assert response["status"] == "failed"
    assert response["error"] == {"code": "context_length_exceeded", "message": "prompt is too long"}
    assert response["output"][0]["status"] == "incomplete"
    assert response["usage"]["input_tokens"] == 12
    assert e.done and e.failed("server_error", "again") == b""
    raw = encoder().failed("server_error", "upstream unavailable")
    assert names(raw) == ["response.created", "response.in_progress", "response.failed"]
    assert final(raw)["usage"] is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            ContextWindowExceededError([FieldViolation("input", "too long")]),
            "context_length_exceeded",
        ),
        (BudgetExceededError([]), "insufficient_quota"),
        (RateLimitExceededError([]), "rate_limit_exceeded"),
        (UpstreamUnavailableError("down"), "server_error"),
    ],
)
def test_failure_codes_are_the_ones_codex_reads(error: Any, code: str) -> None:
    assert failure_code(error) == code


def test_a_lone_surrogate_becomes_its_json_escape() -> None:
    raw = encode(
        [START, ContentBlockStart(0, TextBlock("")), TextDelta(0, "a\ud800b"), ContentBlockStop(0)],
        finish=True,
    )
    assert b"\\ud800" in raw
    check_responses_stream(raw)


def fold(events: list[StreamEvent]) -> GenerationResponse:
    accumulator = ResponseAccumulator()
    for event in events:
        accumulator.add(event)
    return accumulator.result()


TURNS: dict[str, list[StreamEvent]] = {
    "text": TEXT_TURN,
    "tools": tool_turn(("c1", "ls", ['{"path":', '"/"}']), ("c2", "pwd", ["{}"]), text="Ok."),
    "thinking": [
        START,
        ContentBlockStart(0, ThinkingBlock("")),
        ThinkingDelta(0, "Hm."),
        SignatureDelta(0, "sig"),
        ContentBlockStop(0),
        ContentBlockStart(1, ToolUseBlock("c1", "f")),
        ToolInputDelta(1, '{"a":1}'),
        ContentBlockStop(1),
        MessageDelta(StopReason.TOOL_USE, usage=USAGE),
        MessageStop(),
    ],
    "cut": [*TEXT_TURN[:-2], MessageDelta(StopReason.MAX_TOKENS, usage=USAGE), MessageStop()],
}


@pytest.mark.parametrize("events", TURNS.values(), ids=TURNS.keys())
def test_the_stream_and_the_whole_answer_agree(events: list[StreamEvent]) -> None:
    echo = decode(codex_request()).echo
    e = ResponsesStreamEncoder(
        response_id="resp_7", model="claude-x", created_at=1700000000, request_echo=echo
    )
    streamed = final(b"".join(e.feed(event) for event in events))
    whole = encode_response(
        fold(events),
        response_id="resp_7",
        created_at=1700000000,
        model="claude-x",
        request_echo=echo,
    )
    assert whole == streamed
    Response.model_validate(whole)


def test_a_turns_output_passed_back_decodes_to_what_the_model_said() -> None:
    events = TURNS["thinking"]
    output = encode_response(fold(events), response_id="resp_7", created_at=1, model="m")["output"]
    body = body_of(message("user", "go"), *output, call_output("c1", "done"))
    decoded = decode(body)
    assert (decoded.untranslatable, decoded.dropped) == ([], [])
    assert decoded.request.messages[1] == Message(
        Role.ASSISTANT, [ThinkingBlock("Hm.", "sig"), ToolUseBlock("c1", "f", {"a": 1})]
    )
    # Anthropic gets the turn's thinking back, signed, before its tool use.
    assert _anthropic_codec.messages(decoded.request.messages)[1]["content"] == [
        {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
    ]
    text = encode_response(fold(TEXT_TURN), response_id="resp_8", created_at=1, model="m")
    decoded = decode(body_of(message("user", "hi"), *text["output"]))
    assert decoded.request.messages[1] == Message(Role.ASSISTANT, [TextBlock("Hello, wörld")])
    assert (decoded.untranslatable, decoded.dropped) == ([], [])


INDEX = st.integers(0, 3)
EVENT = st.one_of(
    st.builds(
        ContentBlockStart,
        INDEX,
        st.one_of(
            st.builds(TextBlock, st.text(max_size=3)),
            st.builds(ToolUseBlock, st.uuids().map(str), st.just("f")),
            st.builds(ThinkingBlock, st.text(max_size=3), st.text(max_size=3)),
            st.builds(ImageBlock),
        ),
    ),
    st.builds(TextDelta, INDEX, st.text(max_size=3)),
    st.builds(ToolInputDelta, INDEX, st.just('{"a":1}')),
    st.builds(ThinkingDelta, INDEX, st.text(max_size=3)),
    st.builds(SignatureDelta, INDEX, st.text(max_size=3)),
    st.builds(ContentBlockStop, INDEX),
    st.builds(MessageDelta, st.none() | st.sampled_from(StopReason)),
    st.just(MessageStop()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=25))
def test_any_event_sequence_encodes_to_the_grammar(events: list[StreamEvent]) -> None:
    e = encoder()
    raw, inputs = e.feed(START), set()
    for event in events:
        if isinstance(event, ToolInputDelta):
            if event.index in inputs:
                continue  # one whole input per tool use, so that it parses
            inputs.add(event.index)
        try:
            raw += e.feed(event)
        except UpstreamProtocolError:
            check_responses_stream(raw + e.failed("server_error", "interleaved tool input"))
            return
    check_responses_stream(raw + e.finish())


# -- The official SDK on the encoder's bytes -------------------------------------------


def sdk_client(body: bytes, content_type: str) -> OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    http = httpx2.Client(transport=httpx2.MockTransport(answer))
    return OpenAI(api_key="k", base_url="http://gateway/v1", http_client=http)


def test_the_sdks_responses_stream_reads_the_stream() -> None:
    raw = encode(TURNS["tools"])
    with sdk_client(raw, "text/event-stream").responses.stream(model="m", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        response = stream.get_final_response()
    assert deltas == ["Ok."]
    assert response.output_text == "Ok."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("c1", "ls", {"path": "/"}),
        ("c2", "pwd", {}),
    ]
    assert response.usage is not None and response.usage.total_tokens == 142


def test_the_sdks_responses_create_reads_the_whole_answer() -> None:
    document = encode_response(fold(TEXT_TURN), response_id="resp_7", created_at=1, model="m")
    body = json.dumps(document).encode()
    response = sdk_client(body, "application/json").responses.create(model="m", input="hi")
    assert response.output_text == "Hello, wörld"
    assert response.status == "completed"


# -- The checker itself ----------------------------------------------------------------

GOOD = encode(TEXT_TURN)
GOOD_EVENTS = [chunk + b"\n\n" for chunk in GOOD.split(b"\n\n") if chunk]


def renumbered(chunks: list[bytes]) -> list[bytes]:
    """The events with their sequence numbers made right again."""
    out = []
    for n, chunk in enumerate(chunks):
        head, _, data = chunk.partition(b"data: ")
        document = json.loads(data)
        document["sequence_number"] = n
        out.append(head + b"data: " + json.dumps(document).encode() + b"\n\n")
    return out


def edited(position: int, change: Any) -> list[bytes]:
    chunks = list(GOOD_EVENTS)
    head, _, data = chunks[position].partition(b"data: ")
    document = json.loads(data)
    change(document)
    chunks[position] = head + b"data: " + json.dumps(document).encode() + b"\n\n"
    return chunks


BAD = {
    "no-created": renumbered(GOOD_EVENTS[1:]),
    "sequence-gap": GOOD_EVENTS[:3] + GOOD_EVENTS[4:],
    "no-terminal": GOOD_EVENTS[:-1],
    "delta-before-item": renumbered([*GOOD_EVENTS[:2], GOOD_EVENTS[4], *GOOD_EVENTS[2:4]]),
    "item-never-done": renumbered([*GOOD_EVENTS[:8], GOOD_EVENTS[9]]),
    "event-after-completed": [*GOOD_EVENTS, *renumbered(GOOD_EVENTS)[-1:]],
    "text-not-its-deltas": edited(6, lambda d: d.update(text="Hello")),
    "output-not-the-items": edited(9, lambda d: d["response"].update(output=[])),
    "item-id-changed": edited(4, lambda d: d.update(item_id="msg_other")),
    "output-index-gap": edited(2, lambda d: d.update(output_index=1)),
    "name-not-type": [
        GOOD_EVENTS[0].replace(b"event: response.created", b"event: x"),
        *GOOD_EVENTS[1:],
    ],
    "usage-does-not-add-up": edited(9, lambda d: d["response"]["usage"].update(total_tokens=1)),
    "not-an-sdk-event": edited(4, lambda d: d.update(logprobs="none")),
    "cut-short": [GOOD[:-1]],
}


def test_checker_accepts_a_good_stream_with_crlf_and_comments() -> None:
    raw = (b": keep-alive\n\n" + GOOD).replace(b"\n", b"\r\n")
    assert names(raw) == names(GOOD)


@pytest.mark.parametrize("pieces", BAD.values(), ids=BAD.keys())
def test_checker_rejects_bad_streams(pieces: list[bytes]) -> None:
    with pytest.raises((AssertionError, ValueError, RuntimeError)):
        check_responses_stream(b"".join(pieces))


def test_checker_partial_mode_accepts_a_cut_stream() -> None:
    cut = GOOD[: GOOD.index("ö".encode()) + 1]  # inside a character
    events = check_responses_stream(cut, partial=True)
    assert [name for name, _ in events][-1] == "response.output_text.delta"
    with pytest.raises(AssertionError):
        check_responses_stream(cut)
