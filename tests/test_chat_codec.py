"""The Chat Completions codec of the HTTP front door: bodies in, OpenAI's chunk grammar out.

Decoding: every message kind and field, a tool round trip back through the
OpenAI provider's codec, images, every violation at once, what cannot be
translated or is dropped, and a fuzz that only InvalidArgumentError may
escape. Encoding: the chunks of each kind of turn, checked by the grammar
checker (itself shown to fail on bad streams) and by the `openai` SDK's own
models and stream accumulator, and a round trip through the OpenAI
provider's stream decoder.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.errors import InvalidArgumentError
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
from server.http_edge.chat_decoding import (
    UNTRANSLATABLE,
    DecodedChat,
    decode_chat,
    fill_max_tokens,
)
from server.http_edge.chat_encoding import (
    ChatStreamEncoder,
    encode_completion,
    error_chunk,
    finish_reason,
    usage_json,
)
from server.providers import _openai_codec
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
from tests.openai_chat_grammar import check_chat_stream

PNG = b"\x89PNG\r\n\x1a\nnot really"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}

# -- Builders of Chat JSON ---------------------------------------------------------------


def text(value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def image(url: Any = PNG_URL, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def call(call_id: str, name: str = "weather", arguments: Any = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def function_tool(name: str = "weather", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": SCHEMA, **function}}


def body_of(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **fields}


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


def decode(body: Any) -> DecodedChat:
    return decode_chat(body, request_id="req-1", deadline=12.5)


def violations(body: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgumentError) as caught:
        decode(body)
    return {v.field: v.description for v in caught.value.violations}


# -- Decoding ------------------------------------------------------------------------------


def full_body() -> dict[str, Any]:
    """A Chat body with every message kind and every translated field."""
    return body_of(
        {"role": "system", "content": "Be brief."},
        user(
            [
                text("Weather here?", prompt_cache_breakpoint={"mode": "explicit", "ttl": "12h"}),
                image(),
                image("https://x.test/a.jpg", detail="auto"),
            ]
        ),
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                call("call_1", arguments='{"city": "Oslo"}'),
                call("call_2", arguments=""),
            ],
        },
        {"role": "developer", "content": [text("Cite sources.")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [text("Rain"), text(" later")]},
        user("And tomorrow?"),
        {"role": "assistant", "content": [text("Tomorrow: "), text("snow.")]},
        user([text("Thanks.", cache_control={"type": "ephemeral", "ttl": "1h"})]),
        model="claude-x",
        tools=[
            function_tool(description="Forecast."),
            {"type": "function", "function": {"name": "noop"}},
        ],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        parallel_tool_calls=False,
        max_tokens=100,
        max_completion_tokens=20_000,
        temperature=1.5,
        top_p=0.5,
        stop=["END", ""],
        reasoning_effort="medium",
        user="user-1",
        safety_identifier="hashed-1",
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "text"},
        n=1,
        frequency_penalty=0,
        logprobs=False,
        modalities=["text"],
    )


def test_every_message_kind_and_field() -> None:
    decoded = decode(full_body())
    assert decoded.untranslatable == [] and decoded.dropped == []
    assert (decoded.stream, decoded.include_usage) == (True, True)
    assert decoded.request == GenerationRequest(
        model="claude-x",
        messages=[
            Message(
                Role.USER,
                [
                    TextBlock("Weather here?", CacheControl(43200.0)),
                    ImageBlock(data=PNG, media_type="image/png"),
                    ImageBlock(url="https://x.test/a.jpg"),
                ],
            ),
            Message(
                Role.ASSISTANT,
                [
                    TextBlock("Checking."),
                    ToolUseBlock("call_1", "weather", {"city": "Oslo"}),
                    ToolUseBlock("call_2", "weather", {}),
                ],
            ),
            # Both tool messages and the user message after them: one user turn.
            Message(
                Role.USER,
                [
                    ToolResultBlock("call_1", [TextBlock("Sunny")]),
                    ToolResultBlock("call_2", [TextBlock("Rain"), TextBlock(" later")]),
                    TextBlock("And tomorrow?"),
                ],
            ),
            Message(Role.ASSISTANT, [TextBlock("Tomorrow: "), TextBlock("snow.")]),
            Message(Role.USER, [TextBlock("Thanks.", CacheControl(3600.0))]),
        ],
        max_tokens=20_000,  # max_completion_tokens wins over max_tokens
        request_id="req-1",
        system=[TextBlock("Be brief."), TextBlock("Cite sources.")],
        tools=[
            Tool("weather", "Forecast.", SCHEMA),
            Tool("noop", "", {"type": "object", "properties": {}}),
        ],
        tool_choice=ToolChoice(ToolChoiceMode.TOOL, "weather", disable_parallel_tool_use=True),
        temperature=1.5,
        top_p=0.5,
        stop_sequences=["END"],
        thinking_budget_tokens=8192,
        metadata=CallerMetadata(end_user_id="hashed-1"),  # safety_identifier wins over user
        incremental=True,
        deadline=12.5,
    )


def test_the_least_body() -> None:
    decoded = decode(body_of(user("Hi")))
    assert (decoded.stream, decoded.include_usage) == (False, False)
    request = decoded.request
    assert request.messages == [Message(Role.USER, [TextBlock("Hi")])]
    assert request.max_tokens == 0  # no limit given: the adapter fills the model's default
    assert (request.incremental, request.tool_choice, request.thinking_budget_tokens) == (
        False,
        None,
        None,
    )
    fill_max_tokens(decoded, 4096)
    assert request.max_tokens == 4096
    assert decode(body_of(user("Hi"), stop="STOP")).request.stop_sequences == ["STOP"]


def test_a_tool_round_trip_through_the_openai_codec() -> None:
    """The decoded request, written back by the OpenAI provider's codec, is the body again."""
    body = body_of(
        {"role": "system", "content": "Be brief."},
        user([text("Weather?"), image()]),
        {"role": "assistant", "content": None, "tool_calls": [call("c1", arguments='{"a": 1}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        tools=[function_tool(description="Forecast.")],
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=500,
        stop=["X"],
        safety_identifier="u",
    )
    request = decode(body).request
    kwargs, refused = _openai_codec.request_arguments(
        request, "m", reasoning=False, cache_breakpoints=False, max_tokens_field="max_tokens"
    )
    assert refused == []
    assert kwargs["messages"] == body["messages"]
    for key in ("tools", "tool_choice", "parallel_tool_calls", "stop", "safety_identifier"):
        assert kwargs[key] == body[key], key
    assert kwargs["max_tokens"] == 500


@pytest.mark.parametrize(
    ("effort", "max_tokens", "budget"),
    [
        ("minimal", 32_000, 1024),
        ("low", 32_000, 2048),
        ("medium", 32_000, 8192),
        ("high", 32_000, 16384),
        ("xhigh", 100_000, 65536),
        ("max", 200_000, 131072),
        ("high", 10_000, 9999),  # kept below max_tokens
        ("low", 1024, None),  # no room for Anthropic's least budget: no thinking
        ("none", 32_000, None),
    ],
)
def test_reasoning_effort_is_a_thinking_budget(
    effort: str, max_tokens: int, budget: int | None
) -> None:
    decoded = decode(body_of(user("x"), reasoning_effort=effort, max_tokens=max_tokens))
    assert decoded.request.thinking_budget_tokens == budget
    cut = budget is None and effort != "none"
    assert decoded.dropped == (["reasoning_effort"] if cut else [])
    if effort in ("low", "medium", "high"):  # the OpenAI provider maps it back
        assert _openai_codec.reasoning_effort(REASONING[effort]) == effort


REASONING = {"low": 2048, "medium": 8192, "high": 16384}


def test_fill_max_tokens_fits_the_budget_under_the_default() -> None:
    decoded = decode(body_of(user("x"), reasoning_effort="high"))
    assert decoded.request.thinking_budget_tokens == 16384  # nominal until the limit is known
    fill_max_tokens(decoded, 8192)
    assert (decoded.request.max_tokens, decoded.request.thinking_budget_tokens) == (8192, 8191)
    small = decode(body_of(user("x"), reasoning_effort="high"))
    fill_max_tokens(small, 1000)
    assert small.request.thinking_budget_tokens is None
    assert small.dropped == ["reasoning_effort"]
    given = decode(body_of(user("x"), max_tokens=50))
    fill_max_tokens(given, 4096)
    assert given.request.max_tokens == 50


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", ToolChoice(ToolChoiceMode.NONE)),
        ("auto", ToolChoice(ToolChoiceMode.AUTO)),
        ("required", ToolChoice(ToolChoiceMode.ANY)),
        (
            {"type": "function", "function": {"name": "weather"}},
            ToolChoice(ToolChoiceMode.TOOL, "weather"),
        ),
        (None, None),
    ],
)
def test_tool_choice(choice: Any, expected: ToolChoice | None) -> None:
    body = body_of(user("x"), tools=[function_tool()])
    if choice is not None:
        body["tool_choice"] = choice
    assert decode(body).request.tool_choice == expected
    parallel = decode(body | {"parallel_tool_calls": False}).request.tool_choice
    assert parallel is not None and parallel.disable_parallel_tool_use
    assert parallel.mode is (expected.mode if expected else ToolChoiceMode.AUTO)


def test_every_violation_is_named_at_once() -> None:
    body = {
        "model": "",
        "messages": [
            {"role": "system", "content": [image()]},
            user([text("ok"), image("data:image/bmp;base64,AAAA"), {"text": "no type"}]),
            user([image("data:image/png;base64,@@@"), image("ftp://x"), image("data:text,hi")]),
            {"role": "assistant", "tool_calls": [call("c1", arguments="{not json")]},
            {"role": "assistant", "tool_calls": [call("c2", arguments="[1]"), call("c2")]},
            {"role": "tool", "tool_call_id": "nope", "content": "r"},
            {"role": "robot", "content": "beep"},
            "not a message",
        ],
        "tools": [
            function_tool("bad name!"),
            function_tool("weather", parameters={"type": "array"}),
            function_tool("weather"),
        ],
        "tool_choice": {"type": "function", "function": {"name": "missing"}},
        "n": -2,
        "temperature": 2.5,
        "top_p": -0.1,
        "max_tokens": 0,
        "max_completion_tokens": 1.5,
        "stream": "yes",
        "stream_options": {"include_usage": "yes"},
        "stop": [1],
        "reasoning_effort": "extreme",
        "user": 7,
        "response_format": {"type": "yaml"},
        "parallel_tool_calls": "no",
        "logprobs": "yes",
        "top_logprobs": 21,
        "modalities": ["video"],
        "frequency_penalty": 3,
    }
    found = violations(body)
    assert found == {
        "model": found["model"],
        "messages[0].content[0]": found["messages[0].content[0]"],
        "messages[1].content[1].image_url.url": found["messages[1].content[1].image_url.url"],
        "messages[1].content[2]": found["messages[1].content[2]"],
        "messages[2].content[0].image_url.url": found["messages[2].content[0].image_url.url"],
        "messages[2].content[1].image_url.url": found["messages[2].content[1].image_url.url"],
        "messages[2].content[2].image_url.url": found["messages[2].content[2].image_url.url"],
        "messages[3].tool_calls[0].function.arguments": "must be a JSON object",
        # The next assistant message comes before c1 was answered.
        "messages[3].tool_calls[0].id": "tool call 'c1' has no tool message answering it",
        "messages[4].tool_calls[0].function.arguments": "must be a JSON object",
        "messages[4].tool_calls[1].id": "duplicate tool call id 'c2'",
        "messages[4].tool_calls[0].id": "tool call 'c2' has no tool message answering it",
        "messages[5].tool_call_id": found["messages[5].tool_call_id"],
        "messages[6].role": found["messages[6].role"],
        "messages[7]": found["messages[7]"],
        "tools[0].function.name": found["tools[0].function.name"],
        "tools[1].function.parameters": found["tools[1].function.parameters"],
        "tools[2].function.name": "duplicate tool name 'weather'",
        "tool_choice.function.name": "no tool named 'missing' in tools",
        "n": "must be a positive integer",
        "temperature": "must be a number from 0 to 2",
        "top_p": "must be a number from 0 to 1",
        "max_tokens": "must be a positive integer",
        "max_completion_tokens": "must be a positive integer",
        "stream": "must be a boolean",
        "stream_options.include_usage": "must be a boolean",
        "stop[0]": "must be a string",
        "reasoning_effort": found["reasoning_effort"],
        "user": "must be a string",
        "response_format.type": found["response_format.type"],
        "parallel_tool_calls": "must be a boolean",
        "logprobs": "must be a boolean",
        "top_logprobs": "must be an integer from 0 to 20",
        "modalities": found["modalities"],
        "frequency_penalty": "must be a number from -2 to 2",
    }
    assert "minimal" in found["reasoning_effort"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [user("x")]}, "model"),
        (body_of(), "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        (body_of(user(None)), "messages[0].content"),
        (body_of(user("x"), tool_choice="required"), "tool_choice"),
        (body_of(user("x"), tool_choice="any"), "tool_choice"),
        (body_of(user("x"), n=0), "n"),
        (body_of(user("x"), stream_options=[]), "stream_options"),
        (body_of({"role": "tool", "content": "r"}), "messages[0].tool_call_id"),
        (body_of(user([image(detail="huge")])), "messages[0].content[0].image_url.detail"),
        (
            body_of(user([text("x", cache_control={"type": "x"})])),
            "messages[0].content[0].cache_control",
        ),
    ],
)
def test_single_violations(body: dict[str, Any], field: str) -> None:
    assert set(violations(body)) == {field}


def test_a_body_that_is_not_an_object() -> None:
    assert violations([1, 2]) == {"body": "must be a JSON object"}


def test_a_tool_message_answers_the_assistant_message_before_it() -> None:
    asked = {"role": "assistant", "tool_calls": [call("c1")]}
    answer = {"role": "tool", "tool_call_id": "c1", "content": "r"}
    assert set(violations(body_of(user("x"), asked, user("y"), answer))) == {
        "messages[1].tool_calls[0].id",  # unanswered when the user spoke again
        "messages[3].tool_call_id",  # too late
    }
    assert set(violations(body_of(user("x"), asked, answer, answer))) == {
        "messages[3].tool_call_id"  # answered twice
    }
    # A system message between the call and its answer is fine.
    system = {"role": "system", "content": "s"}
    assert decode(body_of(user("x"), asked, system, answer)).untranslatable == []


def test_untranslatable_and_dropped_fields() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR" * 100_000, "format": "wav"}}
    document = {"type": "file", "file": {"file_id": "file-1"}}
    body = body_of(
        {"role": "system", "content": "s", "name": "boss"},
        user([text("Listen."), audio, document], name="ann"),
        {
            "role": "assistant",
            "content": "Hm.",
            "reasoning_content": "I thought.",  # an earlier answer sent back as it came
            "function_call": {"name": "f", "arguments": "{}"},
            "refusal": None,
            "annotations": [{"type": "url_citation"}],
            "tool_calls": [{"id": "k1", "type": "custom", "custom": {"name": "g", "input": "x"}}],
        },
        {"role": "tool", "tool_call_id": "k1", "content": "done"},
        {"role": "function", "name": "f", "content": "result"},
        user([image(detail="low")]),
        tools=[
            function_tool(strict=True),
            {"type": "custom", "custom": {"name": "grammar"}},
        ],
        functions=[{"name": "f"}],
        function_call="auto",
        logprobs=True,
        top_logprobs=2,
        audio={"voice": "alloy", "format": "wav"},
        modalities=["text", "audio"],
        prediction={"type": "content", "content": "x"},
        web_search_options={},
        response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        frequency_penalty=0.5,
        presence_penalty=0,
        logit_bias={"50256": -100},
        moderation={"model": "m"},
        some_future_field=1,
        store=True,
        metadata={"team": "a"},
        service_tier="flex",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        seed=7,
        verbosity="low",
        stream_options={"include_obfuscation": False},
    )
    decoded = decode(body)
    assert {v.field for v in decoded.untranslatable} == {
        "messages[1].content[1]",
        "messages[1].content[2]",
        "messages[2].function_call",
        "messages[2].tool_calls[0]",
        "messages[4]",
        "tools[1]",
        "functions",
        "function_call",
        "logprobs",
        "top_logprobs",
        "audio",
        "modalities",
        "prediction",
        "response_format",
        "frequency_penalty",
        "logit_bias",
        "moderation",
        "some_future_field",
    }
    assert all(UNTRANSLATABLE in v.description for v in decoded.untranslatable)
    assert set(decoded.dropped) == {
        "messages[0].name",
        "messages[1].name",
        "messages[2].reasoning_content",
        "messages[2].annotations",
        "messages[5].content[0].image_url.detail",
        "tools[0].function.strict",
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "seed",
        "verbosity",
    }
    request = decoded.request
    # What cannot be carried stands in for the estimate; base64 audio counts as an image.
    elided = audio | {"input_audio": {"data": "", "format": "wav"}}
    assert request.messages[0].content[1:] == [
        TextBlock(json.dumps(elided, separators=(",", ":"))),
        ImageBlock(),
        TextBlock(json.dumps(document, separators=(",", ":"))),
    ]
    assert [t.name for t in request.tools] == ["weather", "grammar"]
    # Two images, not the 500,000 characters of audio.
    assert count_request(request.system, request.messages, request.tools) < 5_000


def test_instructions_alone_cannot_be_translated() -> None:
    decoded = decode(body_of({"role": "developer", "content": "Say hi."}, user("")))
    assert decoded.request.messages == []
    assert [v.field for v in decoded.untranslatable] == ["messages"]


def test_an_answer_appended_by_the_sdk_decodes_back() -> None:
    """`messages.append(completion.choices[0].message)`: the SDK sends what it parsed."""
    response = GenerationResponse(
        id="x",
        model="m",
        provider="p",
        content=[ThinkingBlock("why", "sig"), ToolUseBlock("call_9", "weather", {"city": "Rome"})],
        stop_reason=StopReason.TOOL_USE,
    )
    encoded = encode_completion(response, completion_id="chatcmpl-1", created=1, model="m")
    message = ChatCompletion.model_validate(encoded).choices[0].message
    sent = message.model_dump(exclude_unset=True, mode="json")
    answer = {"role": "tool", "tool_call_id": "call_9", "content": "Sunny"}
    decoded = decode(body_of(user("Weather?"), sent, answer, tools=[function_tool()]))
    assert decoded.untranslatable == []
    assert decoded.dropped == ["messages[1].reasoning_content"]
    assert decoded.request.messages[1] == Message(
        Role.ASSISTANT, [ToolUseBlock("call_9", "weather", {"city": "Rome"})]
    )


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def mostly(valid: Any) -> Any:
    """Mostly `valid`, else any JSON value: junk that still reaches the deep paths."""
    return st.integers(0, 7).flatmap(lambda n: valid if n else JSON_VALUE)


def with_junk(value: Any) -> Any:
    """An object, sometimes with a key changed to any JSON value."""
    keys = st.sampled_from(["type", "text", "id", "function", "content", "image_url", "x"])
    changed = st.tuples(value, keys, JSON_VALUE).map(lambda t: t[0] | {t[1]: t[2]})
    return st.integers(0, 7).flatmap(lambda n: value if n else changed)


SHORT = st.text(max_size=4)
CALL_ID = st.sampled_from(["c1", "c2"])
PART = with_junk(
    st.builds(text, SHORT)
    | st.just(image())
    | st.just(image("https://x.test", detail="low"))
    | st.builds(image, st.sampled_from(["data:image/png;base64,", "data:,", "data:x;base64,@"]))
    | st.just({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})
)
CALL = with_junk(
    st.builds(call, CALL_ID, st.just("f"), st.sampled_from(['{"a": 1}', "", "[", "{}", "1"]))
)
MESSAGE = with_junk(
    st.builds(user, SHORT | st.lists(PART, max_size=2))
    | st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer"]), "content": SHORT | st.lists(PART)}
    )
    | st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={"content": st.none() | SHORT, "tool_calls": st.lists(CALL, max_size=2)},
    )
    | st.fixed_dictionaries(
        {"role": st.just("tool"), "tool_call_id": CALL_ID, "content": SHORT | st.lists(PART)}
    )
)
TOOL = with_junk(st.just(function_tool("f")) | st.just({"type": "custom", "custom": {}}))
BODY = st.fixed_dictionaries(
    {"model": mostly(st.just("m")), "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=5))},
    optional={
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": mostly(st.integers(0, 3)),
        "max_tokens": mostly(st.integers(0, 10**30)),
        "max_completion_tokens": mostly(st.integers(0, 10**30)),
        "temperature": mostly(st.floats(0, 2)),
        "top_p": mostly(st.floats(0, 1)),
        "stop": mostly(SHORT | st.lists(SHORT, max_size=2)),
        "tools": mostly(st.lists(TOOL, max_size=2)),
        "tool_choice": mostly(
            st.sampled_from(["auto", "none", "required"])
            | st.just({"type": "function", "function": {"name": "f"}})
        ),
        "parallel_tool_calls": mostly(st.booleans()),
        "reasoning_effort": mostly(st.sampled_from(["none", "minimal", "high", "max"])),
        "user": mostly(SHORT),
        "response_format": mostly(
            st.builds(lambda t: {"type": t}, st.sampled_from(["text", "json_object"]))
        ),
        "seed": JSON_VALUE,
        "logit_bias": JSON_VALUE,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON_VALUE, BODY, BODY))
def test_no_json_input_raises_anything_but_invalid_argument(body: Any) -> None:
    try:
        decoded = decode(body)
    except InvalidArgumentError as err:
        assert err.violations
    else:
        request = decoded.request
        fill_max_tokens(decoded, 4096)
        assert request.max_tokens > 0
        budget = request.thinking_budget_tokens
        assert budget is None or 1024 <= budget < request.max_tokens
        assert all(m.content for m in request.messages)
        count_request(request.system, request.messages, request.tools)


# -- Encoding ------------------------------------------------------------------------------


def encode(
    events: list[StreamEvent], *, include_usage: bool = False, finish: bool = False
) -> bytes:
    encoder = ChatStreamEncoder(
        completion_id="chatcmpl-7", model="alias", created=1700000000, include_usage=include_usage
    )
    out = b"".join(encoder.feed(event) for event in events)
    return out + encoder.finish() if finish else out


def checked(raw: bytes, *, include_usage: bool = False) -> list[dict[str, Any]]:
    """The chunks of a stream, checked by the grammar and by the SDK's own model."""
    chunks = check_chat_stream(raw, include_usage=include_usage)
    for chunk in chunks:
        if "error" not in chunk:
            ChatCompletionChunk.model_validate(chunk)
    return chunks


def final_completion(chunks: list[dict[str, Any]], tools: list[Any] | None = None) -> Any:
    """What the SDK's stream helper (`chat.completions.stream`) makes of the chunks."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState(input_tools=tools or [])
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def finish_of(chunks: list[dict[str, Any]]) -> str:
    reason: str
    (reason,) = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"][-1:] and c["choices"][0]["finish_reason"]
    ]
    return reason


def test_text_stream() -> None:
    raw = encode(
        [
            MessageStart("msg_1", "claude-x", "anthropic", usage=Usage(input_tokens=12)),
            ContentBlockStart(0, TextBlock("")),
            TextDelta(0, "Hello, "),
            TextDelta(0, 'wörld "\n'),
            TextDelta(0, ""),
            ContentBlockStop(0),
            MessageDelta(StopReason.END_TURN, usage=Usage(input_tokens=12, output_tokens=5)),
            MessageStop(),
        ]
    )
    assert raw.startswith(b'data: {"id":"chatcmpl-7","object":"chat.completion.chunk"')
    assert "wörld".encode() in raw and raw.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in raw  # not asked for
    chunks = checked(raw)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hello, "},
        {"content": 'wörld "\n'},
        {},
    ]
    assert {(c["id"], c["model"], c["created"]) for c in chunks} == {
        ("chatcmpl-7", "alias", 1700000000)
    }
    completion = final_completion(chunks)
    assert completion.choices[0].message.content == 'Hello, wörld "\n'
    assert completion.choices[0].finish_reason == "stop"


def test_two_parallel_tool_calls_stream() -> None:
    raw = encode(
        [
            MessageStart("msg_1", "m", "p"),
            ContentBlockStart(0, TextBlock("Let me look.")),
            ContentBlockStop(0),
            ContentBlockStart(1, ToolUseBlock("toolu_1", "weather")),
            ToolInputDelta(1, '{"city": '),
            ContentBlockStart(2, ToolUseBlock("toolu_2", "clock", {"tz": "CET"})),
            ToolInputDelta(1, '"Paris"}'),  # interleaved: its own index still
            ToolInputDelta(7, "{}"),  # for no tool call: dropped
            ContentBlockStop(1),
            ContentBlockStop(2),
            MessageDelta(StopReason.END_TURN),  # the upstream said end_turn
            MessageStop(),
        ]
    )
    chunks = checked(raw)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[2:-1]]
    assert calls == [
        {
            "index": 0,
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"city": '}},
        {
            "index": 1,
            "id": "toolu_2",
            "type": "function",
            "function": {"name": "clock", "arguments": ""},
        },
        {"index": 1, "function": {"arguments": '{"tz":"CET"}'}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    assert finish_of(chunks) == "tool_calls"
    tools = [function_tool("weather"), function_tool("clock")]
    message = final_completion(chunks, tools).choices[0].message
    assert message.content == "Let me look."
    assert [
        (c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls
    ] == [
        ("toolu_1", "weather", {"city": "Paris"}),
        ("toolu_2", "clock", {"tz": "CET"}),
    ]


def test_thinking_streams_as_reasoning_content() -> None:
    chunks = checked(
        encode(
            [
                MessageStart("msg_1", "m", "p"),
                ContentBlockStart(0, ThinkingBlock()),
                ThinkingDelta(0, "Hmm."),
                SignatureDelta(0, "sig=="),  # no place in Chat
                ContentBlockStop(0),
                ContentBlockStart(1, ThinkingBlock(redacted_data="enc")),
                ContentBlockStart(2, TextBlock("Done.")),
                MessageStop(),
            ],
            finish=True,
        )
    )
    assert [c["choices"][0]["delta"] for c in chunks[1:]] == [
        {"reasoning_content": "Hmm."},
        {"content": "Done."},
        {},
    ]


def test_usage_chunk_only_when_asked() -> None:
    events: list[StreamEvent] = [
        MessageStart("msg_1", "m", "p", usage=Usage(input_tokens=3, cache_read_input_tokens=100)),
        ContentBlockStart(0, TextBlock("Hi")),
        MessageDelta(StopReason.MAX_TOKENS, usage=Usage(input_tokens=1, output_tokens=2)),
        MessageDelta(
            StopReason.END_TURN,
            usage=Usage(
                input_tokens=3,
                output_tokens=9,
                cache_read_input_tokens=100,
                cache_creation_input_tokens=20,
            ),
        ),
        MessageStop(),
    ]
    chunks = checked(encode(events, include_usage=True), include_usage=True)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert finish_of(chunks) == "stop"  # the last MessageDelta says it all
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 123  # cached tokens inside prompt_tokens
    assert last["usage"]["completion_tokens"] == 9
    assert last["usage"]["total_tokens"] == 132
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 100
    assert final_completion(chunks).usage.prompt_tokens_details.cached_tokens == 100
    # OpenAI's usage read back by the OpenAI provider is ours again.
    assert _openai_codec.usage_of(last["usage"]) == Usage(3, 9, 100, 20)
    no_usage = checked(encode(events))
    assert all("usage" not in c for c in no_usage)


def test_usage_chunk_falls_back_to_message_start() -> None:
    encoder = ChatStreamEncoder(completion_id="c", model="m", created=0, include_usage=True)
    raw = encoder.feed(MessageStart("m1", "m", "p", usage=Usage(input_tokens=4))) + encoder.finish()
    assert checked(raw, include_usage=True)[-1]["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize(
    ("reason", "tool_calls", "expected"),
    [
        (StopReason.END_TURN, False, "stop"),
        (StopReason.STOP_SEQUENCE, False, "stop"),
        (StopReason.PAUSE_TURN, False, "stop"),
        (None, False, "stop"),
        (StopReason.MAX_TOKENS, False, "length"),
        (StopReason.CONTEXT_WINDOW_EXCEEDED, True, "length"),  # a cut tool call stays cut
        (StopReason.TOOL_USE, True, "tool_calls"),
        (StopReason.END_TURN, True, "tool_calls"),
        (None, True, "tool_calls"),
        (StopReason.REFUSAL, False, "content_filter"),
        (StopReason.CONTENT_FILTER, True, "content_filter"),
    ],
)
def test_finish_reasons(reason: StopReason | None, tool_calls: bool, expected: str) -> None:
    assert finish_reason(reason, tool_calls=tool_calls) == expected


def test_a_failed_stream_ends_with_an_error_chunk() -> None:
    start = encode([MessageStart("msg_1", "m", "p"), ContentBlockStart(0, TextBlock("Hi"))])
    error = error_chunk("Overloaded", "server_error", "overloaded")
    assert error == (
        b'data: {"error":{"message":"Overloaded","type":"server_error","param":null,'
        b'"code":"overloaded"}}\n\n'
    )
    chunks = check_chat_stream(start + error, include_usage=True)
    assert chunks[-1]["error"]["code"] == "overloaded"
    check_chat_stream(start + error + b"data: [DONE]\n\n", include_usage=True)


def test_encoder_edges() -> None:
    encoder = ChatStreamEncoder(completion_id="c", model="m", created=0, include_usage=False)
    assert encoder.feed(TextDelta(0, "early")) == b""
    assert encoder.feed(ContentBlockStart(0, ToolUseBlock("t", "f"))) == b""
    assert encoder.finish() == b""  # nothing started: the caller owes an error instead
    assert not encoder.started
    start = encoder.feed(MessageStart("msg_7", "served", "p"))
    assert encoder.started and encoder.feed(MessageStart("msg_8", "m", "p")) == b""
    assert encoder.feed(ContentBlockStart(0, ImageBlock(url="https://x"))) == b""
    assert encoder.feed(ToolInputDelta(0, "{}")) == b""  # an image is no tool call
    end = encoder.feed(MessageStop())
    assert encoder.done and encoder.feed(TextDelta(0, "late")) == b""
    assert encoder.feed(MessageStop()) == b"" and encoder.finish() == b""
    assert finish_of(checked(start + end)) == "stop"


def test_a_lone_surrogate_becomes_its_json_escape() -> None:
    raw = encode([MessageStart("msg_1", "m", "p"), TextDelta(0, "a\ud800b"), MessageStop()])
    assert checked(raw)[1]["choices"][0]["delta"]["content"] == "a\ud800b"


def test_the_openai_decoder_reads_the_stream_back() -> None:
    """Our chunks -> the OpenAI provider's stream decoder -> the same response."""
    events: list[StreamEvent] = [
        MessageStart("msg_1", "m", "p"),
        ContentBlockStart(0, ThinkingBlock()),
        ThinkingDelta(0, "Plan."),
        ContentBlockStart(1, TextBlock("")),
        TextDelta(1, "Calling."),
        ContentBlockStart(2, ToolUseBlock("toolu_1", "weather")),
        ToolInputDelta(2, '{"city": "Oslo"}'),
        ContentBlockStop(0),
        ContentBlockStop(1),
        ContentBlockStop(2),
        MessageDelta(StopReason.TOOL_USE, usage=Usage(5, 6, 7, 8)),
        MessageStop(),
    ]
    original = ResponseAccumulator()
    for event in events:
        original.add(event)
    decoder = _openai_codec.ChatStreamDecoder(
        provider="openai", model="m", request_id="r", upstream_request_id="u"
    )
    again = ResponseAccumulator()
    for chunk in checked(encode(events, include_usage=True), include_usage=True):
        for event in decoder.feed(chunk):
            again.add(event)
    for event in decoder.finish():
        again.add(event)
    first, second = original.result(), again.result()
    assert second.content == first.content
    assert (second.stop_reason, second.usage) == (first.stop_reason, first.usage)


INDEX = st.integers(0, 3)
STARTED_BLOCK = st.sampled_from(
    [
        TextBlock(""),
        TextBlock("hi"),
        ToolUseBlock("t", "f"),
        ToolUseBlock("u", "g", {"a": 1}),
        ThinkingBlock(),
        ThinkingBlock(redacted_data="r"),
        ImageBlock(),
    ]
)
EVENT = st.one_of(
    st.builds(MessageStart, st.sampled_from(["msg_1", ""]), st.just("m"), st.just("p")),
    st.builds(ContentBlockStart, INDEX, STARTED_BLOCK),
    st.builds(TextDelta, INDEX, st.text(max_size=3)),
    st.builds(ToolInputDelta, INDEX, st.just('{"a": 1}')),
    st.builds(ThinkingDelta, INDEX, st.text(max_size=3)),
    st.builds(SignatureDelta, INDEX, st.text(max_size=3)),
    st.builds(ContentBlockStop, INDEX),
    st.builds(
        MessageDelta,
        st.none() | st.sampled_from(StopReason),
        st.just(""),
        st.none() | st.builds(Usage, *[st.integers(0, 100)] * 4),
    ),
    st.just(MessageStop()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=25), st.booleans())
def test_any_event_sequence_encodes_to_the_grammar(
    events: list[StreamEvent], include_usage: bool
) -> None:
    encoder = ChatStreamEncoder(
        completion_id="c", model="m", created=0, include_usage=include_usage
    )
    raw, inputs = encoder.feed(MessageStart("msg_0", "m", "p")), set()
    for event in events:
        if (
            isinstance(event, ContentBlockStart)
            and isinstance(event.block, ToolUseBlock)
            and event.block.input
        ):
            inputs.add(event.index)
        if isinstance(event, ToolInputDelta):
            if event.index in inputs:
                continue  # one whole input per tool call, so that it parses
            inputs.add(event.index)
        raw += encoder.feed(event)
    raw += encoder.finish()
    checked(raw, include_usage=include_usage)


def test_usage_json_counts_cached_tokens_inside_the_prompt() -> None:
    usage = usage_json(Usage(10, 4, cache_read_input_tokens=30, cache_creation_input_tokens=5))
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (45, 49)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 30


def test_encode_completion() -> None:
    response = GenerationResponse(
        id="msg_1",
        model="claude-x",
        provider="anthropic",
        content=[
            ThinkingBlock("why", "sig"),
            TextBlock("Calling "),
            TextBlock("now."),
            ToolUseBlock("toolu_1", "f", {"a": "é"}),
            ImageBlock(url="https://x"),
        ],
        stop_reason=StopReason.TOOL_USE,
        usage=Usage(input_tokens=3, output_tokens=4, cache_read_input_tokens=2),
    )
    encoded = encode_completion(response, completion_id="chatcmpl-1", created=5, model="alias")
    ChatCompletion.model_validate(encoded)
    assert encoded == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "alias",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Calling now.",
                    "refusal": None,
                    "annotations": [],
                    "reasoning_content": "why",
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":"é"}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": usage_json(Usage(3, 4, 2, 0)),
    }
    only_tools = GenerationResponse(
        id="x", model="m", provider="p", content=[ToolUseBlock("t", "f")]
    )
    message = encode_completion(only_tools, completion_id="c", created=0, model="m")
    assert message["choices"][0]["message"]["content"] is None
    nothing = GenerationResponse(id="x", model="m", provider="p", stop_reason=StopReason.REFUSAL)
    encoded = encode_completion(nothing, completion_id="c", created=0, model="m")
    assert encoded["choices"][0]["message"]["content"] == ""
    assert encoded["choices"][0]["finish_reason"] == "content_filter"
    ChatCompletion.model_validate(encoded)


# -- The grammar checker -----------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **head: Any) -> bytes:
    data: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        **head,
    }
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def usage_chunk(prompt: int = 1, completion: int = 2, total: int = 3) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    data = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": usage,
    }
    return b"data: " + json.dumps(data).encode() + b"\n\n"


ROLE = chunk({"role": "assistant", "content": ""})
TEXT = chunk({"content": "hé"})
OPEN_CALL = chunk(
    {
        "tool_calls": [
            {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
        ]
    }
)
ARGUMENTS = chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
FINISH = chunk(finish="stop")
DONE = b"data: [DONE]\n\n"
GOOD = [ROLE, TEXT, OPEN_CALL, ARGUMENTS, FINISH, usage_chunk(), DONE]
ERROR = error_chunk("x", "server_error", None)
BAD = {
    "no-role-first": [TEXT, FINISH, usage_chunk(), DONE],
    "another-id": [ROLE, chunk({"content": "x"}, id="chatcmpl-2"), FINISH, usage_chunk(), DONE],
    "another-object": [ROLE, chunk({"content": "x"}, object="chat.completion"), FINISH, DONE],
    "arguments-before-open": [ROLE, ARGUMENTS, OPEN_CALL, FINISH, usage_chunk(), DONE],
    "call-without-name": [ROLE, OPEN_CALL.replace(b'"name": "f"', b'"name": ""'), FINISH, DONE],
    "call-index-gap": [ROLE, OPEN_CALL.replace(b'"index": 0, "id"', b'"index": 1, "id"'), FINISH],
    "arguments-not-an-object": [ROLE, OPEN_CALL, ARGUMENTS.replace(b"{}", b"[]"), FINISH, DONE],
    "two-finish-chunks": [ROLE, FINISH, FINISH, usage_chunk(), DONE],
    "no-finish": [ROLE, TEXT, usage_chunk(), DONE],
    "delta-after-finish": [ROLE, FINISH, TEXT, usage_chunk(), DONE],
    "usage-missing": [ROLE, FINISH, DONE],
    "usage-before-finish": [ROLE, usage_chunk(), FINISH, DONE],
    "usage-twice": [ROLE, FINISH, usage_chunk(), usage_chunk(), DONE],
    "usage-total-wrong": [ROLE, FINISH, usage_chunk(total=4), DONE],
    "no-done": [ROLE, FINISH, usage_chunk()],
    "after-done": [*GOOD, TEXT],
    "after-error": [ROLE, ERROR, TEXT],
    "event-name": [b"event: chunk\n" + ROLE, FINISH, usage_chunk(), DONE],
    "bad-finish-reason": [ROLE, chunk(finish="done"), usage_chunk(), DONE],
    "cut-short": [b"".join(GOOD)[:-1]],
}


def test_checker_accepts_a_good_stream_with_crlf_and_comments() -> None:
    raw = (b": keep-alive\n\n" + b"".join(GOOD)).replace(b"\n", b"\r\n")
    assert len(check_chat_stream(raw, include_usage=True)) == len(GOOD) - 1


@pytest.mark.parametrize("pieces", BAD.values(), ids=BAD.keys())
def test_checker_rejects_bad_streams(pieces: list[bytes]) -> None:
    with pytest.raises(AssertionError):
        check_chat_stream(b"".join(pieces), include_usage=True)


def test_checker_wants_no_usage_chunk_unless_asked() -> None:
    check_chat_stream(ROLE + FINISH + DONE, include_usage=False)
    with pytest.raises(AssertionError):
        check_chat_stream(b"".join(GOOD), include_usage=False)


def test_checker_partial_mode_accepts_a_cut_stream() -> None:
    cut = ROLE + TEXT[: TEXT.index("é".encode()) + 1]  # inside a character
    assert len(check_chat_stream(cut, include_usage=True, partial=True)) == 1
    with pytest.raises(AssertionError):
        check_chat_stream(cut, include_usage=True)
    with pytest.raises(AssertionError):
        check_chat_stream(ARGUMENTS, include_usage=True, partial=True)


def test_several_choices_are_for_a_relay_to_give_and_reserve() -> None:
    decoded = decode_chat(
        {"model": "m", "n": 3, "messages": [{"role": "user", "content": "x"}]},
        request_id="r",
        deadline=None,
    )
    # An OpenAI deployment answers n choices (and the reservation counts them);
    # a translation, which gives one, refuses.
    assert decoded.request.choices == 3
    assert [v.field for v in decoded.untranslatable] == ["n"]
