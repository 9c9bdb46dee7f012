"""The Messages API codec of the HTTP front door: bodies in, Anthropic's stream grammar out.

Decoding: every block kind and field, every violation at once, what cannot be
translated, and a fuzz that only InvalidArgumentError may escape. Encoding:
the SSE bytes of each kind of turn, checked by the grammar checker (which is
itself shown to fail on bad streams), and round trips through the Anthropic
provider's codec in both directions.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import InvalidArgumentError, UpstreamProtocolError
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
from server.http_edge.messages_decoding import (
    UNTRANSLATABLE,
    decode_count_tokens,
    decode_messages,
)
from server.http_edge.messages_encoding import (
    StreamEncoder,
    anthropic_stop_reason,
    encode_message,
    error_event,
    ping_event,
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
    TokenCountRequest,
    Tool,
    ToolChoice,
    ToolChoiceMode,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from server.token_estimate import count_request
from tests.anthropic_grammar import check_anthropic_stream
from tests.fake_upstream import anthropic_wire
from tests.fake_upstream.script import RedactedThinking, Reply, Text, Thinking, ToolCall

PNG = b"\x89PNG\r\n\x1a\nnot really"
PNG64 = base64.b64encode(PNG).decode()
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
EPHEMERAL_1H = {"type": "ephemeral", "ttl": "1h"}

# Builders of Messages JSON, in the form Anthropic's codec writes it.


def text(value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def image(data: Any = PNG64, media_type: Any = "image/png") -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": url}}


def tool_use(use_id: str, name: str = "f", arguments: Any = None, **extra: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": use_id, "name": name, "input": arguments or {}, **extra}


def tool_result(use_id: str, content: Any = None, **extra: Any) -> dict[str, Any]:
    result = {"type": "tool_result", "tool_use_id": use_id, **extra}
    return result if content is None else result | {"content": content}


def user(*content: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(content)}


def body_of(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 8000, "messages": list(messages), **fields}


def decode(body: Any) -> Any:
    return decode_messages(body, request_id="req-1", deadline=12.5)


def violated_fields(body: Any) -> set[str]:
    with pytest.raises(InvalidArgumentError) as caught:
        decode(body)
    return {v.field for v in caught.value.violations}


def full_body() -> dict[str, Any]:
    """A Messages body with every block kind and field."""
    return body_of(
        user(text("Weather?"), image(), image_url("https://x.test/a.jpg")),
        assistant(
            {"type": "thinking", "thinking": "Look it up.", "signature": "sig1"},
            {"type": "redacted_thinking", "data": "opaque"},
            text("Checking."),
            tool_use("toolu_1", "weather", {"c": 1}),
            tool_use("toolu_2", "weather"),
        ),
        user(
            tool_result("toolu_1", [text("Sunny")]),
            tool_result(
                "toolu_2",
                [text("a map"), image_url("http://m.test")],
                is_error=True,
                cache_control={"type": "ephemeral", "ttl": "5m"},
            ),
        ),
        model="gpt-test",
        max_tokens=4096,
        system=[text("Be brief."), text("Cite.", cache_control=EPHEMERAL_1H)],
        tools=[
            {"name": "weather", "description": "Forecast.", "input_schema": SCHEMA},
            {"name": "noop", "input_schema": {"type": "object", "properties": {}}},
        ],
        tool_choice={"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        metadata={"user_id": "u-42"},
        thinking={"type": "enabled", "budget_tokens": 2048},
    )


# -- Decoding ----------------------------------------------------------------------------


def test_decodes_every_block_kind_and_field() -> None:
    body = full_body() | {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "stream": True}
    decoded = decode(body)
    assert decoded.stream is True
    assert decoded.untranslatable == []
    assert decoded.request == GenerationRequest(
        model="gpt-test",
        max_tokens=4096,
        request_id="req-1",
        system=[TextBlock("Be brief."), TextBlock("Cite.", CacheControl(3600.0))],
        messages=[
            Message(
                Role.USER,
                [
                    TextBlock("Weather?"),
                    ImageBlock(data=PNG, media_type="image/png"),
                    ImageBlock(url="https://x.test/a.jpg"),
                ],
            ),
            Message(
                Role.ASSISTANT,
                [
                    ThinkingBlock("Look it up.", "sig1"),
                    ThinkingBlock(redacted_data="opaque"),
                    TextBlock("Checking."),
                    ToolUseBlock("toolu_1", "weather", {"c": 1}),
                    ToolUseBlock("toolu_2", "weather", {}),
                ],
            ),
            Message(
                Role.USER,
                [
                    ToolResultBlock("toolu_1", [TextBlock("Sunny")]),
                    ToolResultBlock(
                        "toolu_2",
                        [TextBlock("a map"), ImageBlock(url="http://m.test")],
                        is_error=True,
                        cache_control=CacheControl(300.0),
                    ),
                ],
            ),
        ],
        tools=[
            Tool("weather", "Forecast.", SCHEMA),
            Tool("noop", "", {"type": "object", "properties": {}}),
        ],
        tool_choice=ToolChoice(ToolChoiceMode.TOOL, "weather", disable_parallel_tool_use=True),
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END"],
        thinking_budget_tokens=2048,
        metadata=CallerMetadata(end_user_id="u-42"),
        incremental=True,
        deadline=12.5,
    )


def test_string_shorthands_and_defaults() -> None:
    decoded = decode(
        body_of(
            {"role": "user", "content": "Hi"},
            assistant(tool_use("t")),
            user(tool_result("t", "42")),
            {"role": "assistant", "content": ""},  # an empty prefill is allowed last
            system="Be brief.",
            tools=[{"name": "f", "input_schema": {"type": "object"}, "type": "custom"}],
            temperature=None,
            cache_control={"type": "ephemeral"},  # checked, then dropped
        )
    )
    request = decoded.request
    assert (decoded.stream, request.incremental, decoded.untranslatable) == (False, False, [])
    assert request.system == [TextBlock("Be brief.")]
    assert request.messages[0].content == [TextBlock("Hi")]
    assert request.messages[2].content == [ToolResultBlock("t", [TextBlock("42")])]
    assert request.messages[3] == Message(Role.ASSISTANT, [])
    assert request.temperature is None and request.tool_choice is None


@pytest.mark.parametrize(
    ("thinking", "budget"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, 1024),
        ({"type": "disabled"}, None),
        ({"type": "adaptive"}, 7999),  # bounded by max_tokens alone
        ({"type": "adaptive", "display": "summarized"}, 7999),
    ],
)
def test_thinking_modes(thinking: dict[str, Any], budget: int | None) -> None:
    decoded = decode(body_of(user(text("x")), thinking=thinking))
    assert decoded.request.thinking_budget_tokens == budget


def test_response_fields_echoed_back_are_not_untranslatable() -> None:
    """SDKs that dump a response into the history send nulls and the direct caller."""
    body = body_of(
        user(text("x")),
        assistant(text("ok", citations=None), tool_use("t", caller={"type": "direct"})),
        container=None,
        metadata={"user_id": None},
    )
    assert decode(body).untranslatable == []


def test_every_hard_violation_is_named_at_once() -> None:
    body = body_of(
        {"role": "robot", "content": "hi"},
        user(tool_use("a")),
        user(image(data="@@@"), tool_result("nope"), "text"),
        assistant(),
        {"role": "user", "content": 5},
        max_tokens=True,
        stream="yes",
        temperature=1.5,
        top_p=-0.1,
        top_k=0,
        stop_sequences=["", 3],
        system=[text("ok"), text(7)],
        tools=[
            {"name": "bad name", "input_schema": {"type": "object"}},
            {"name": "f", "input_schema": "object"},
            {"name": "f", "input_schema": {"type": "array"}},
        ],
        tool_choice={"type": "tool", "name": "missing"},
        thinking={"type": "enabled", "budget_tokens": 100},
        metadata={"user_id": 1},
        cache_control={"type": "persistent"},
    )
    del body["model"]
    assert violated_fields(body) == {
        "model",
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences[0]",
        "stop_sequences[1]",
        "system[1].text",
        "messages[0].role",
        "messages[1].content[0]",  # a tool use in a user message
        "messages[2].content[0].source.data",
        "messages[2].content[1].tool_use_id",
        "messages[2].content[2]",
        "messages[3].content",
        "messages[4].content",
        "tools[0].name",
        "tools[1].input_schema",
        "tools[2].name",
        "tools[2].input_schema.type",
        "tool_choice.name",
        "thinking.budget_tokens",
        "metadata.user_id",
        "cache_control",
    }


def test_block_violations_carry_their_paths() -> None:
    body = body_of(
        user(text("a")),
        assistant({"type": "thinking", "thinking": "t"}),
        user(image(data="", media_type="image/tiff"), image_url("ftp://x")),
        assistant(tool_result("x")),
        tools=[{"name": "f", "input_schema": {}, "cache_control": {"type": "ephemeral", "ttl": 1}}],
        tool_choice={"type": "any", "name": "f"},
    )
    assert violated_fields(body) == {
        "messages[1].content[0].signature",
        "messages[2].content[0].source.media_type",
        "messages[2].content[0].source.data",
        "messages[2].content[1].source.url",
        "messages[3].content[0]",  # a tool result in an assistant message
        "messages[3].content[0].tool_use_id",
        "tools[0].cache_control.ttl",
        "tool_choice.name",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        (body_of(user(text("x")), model=""), "model"),
        (body_of(user(text("x")), max_tokens=None), "max_tokens"),
        (body_of(user(text("x")), max_tokens=-1), "max_tokens"),
        (body_of(), "messages"),
        (body_of() | {"messages": {"role": "user"}}, "messages"),
    ],
)
def test_top_level_violations(body: Any, field: str) -> None:
    assert field in violated_fields(body)


def test_untranslatable_fields_and_blocks_are_listed_and_still_counted() -> None:
    document = {"type": "document", "source": {"type": "text", "data": "word " * 400}}
    body = body_of(
        {"role": "system", "content": "Mid-conversation instructions."},
        user(
            document,
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
            {"type": "container_upload", "file_id": "file_2"},
        ),
        assistant(
            text("See [1].", citations=[{"type": "char_location"}]),
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            tool_use("t"),
        ),
        user(tool_result("t", [{"type": "search_result", "title": "r"}])),
        max_tokens=0,  # a prompt-cache warm-up
        container="cont_1",
        mcp_servers=[{"type": "url", "url": "https://mcp.test", "name": "x"}],
        context_management={"edits": []},
        service_tier="auto",
        output_config={"effort": "high"},
        metadata={"user_id": "u", "team": "a"},
        thinking={"type": "adaptive", "display": "omitted"},
        tools=[
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
            {"name": "f", "input_schema": {"type": "object"}, "strict": True},
        ],
    )
    decoded = decode(body)
    assert {v.field for v in decoded.untranslatable} == {
        "container",
        "mcp_servers",
        "max_tokens",
        "messages[1].content[0]",
        "messages[1].content[1].source.type",
        "messages[1].content[2]",
        "messages[2].content[1]",
        "messages[2].content[2]",
        "messages[3].content[0].content[0]",
        "tools[0]",
    }
    assert all(UNTRANSLATABLE in v.description for v in decoded.untranslatable)
    # Hints a translation leaves out, named, rather than refused (Claude Code sends them).
    assert set(decoded.dropped) == {
        "context_management",
        "service_tier",
        "output_config.effort",
        "messages[2].content[0].citations",
        "tools[1].strict",
        "thinking.display",
        "metadata.team",
    }
    request = decoded.request
    assert request.max_tokens == 0
    # A system message mid-conversation joins the system instructions.
    assert request.system == [TextBlock("Mid-conversation instructions.")]
    assert request.messages[0].role is Role.USER
    # An unknown block stands in as its compact JSON; an image by file id as an image.
    assert request.messages[0].content[:2] == [
        TextBlock(json.dumps(document, separators=(",", ":"))),
        ImageBlock(),
    ]
    assert request.tools[0].name == "web_search"
    assert count_request(request.system, request.messages, request.tools) > 400


def test_an_output_format_cannot_be_dropped() -> None:
    schema = {"type": "json_schema", "schema": {"type": "object"}}
    decoded = decode(body_of(user(text("x")), output_config={"effort": "low", "format": schema}))
    assert [v.field for v in decoded.untranslatable] == ["output_config.format"]
    assert decoded.dropped == ["output_config.effort"]


def test_a_base64_document_counts_as_an_image_not_as_its_characters() -> None:
    source = {"type": "base64", "media_type": "application/pdf", "data": "JVBE" * 250_000}
    pdf = {"type": "document", "source": source}
    request = decode(body_of(user(pdf, text("Summarize.")))).request
    elided = pdf | {"source": source | {"data": ""}}
    assert request.messages[0].content[:2] == [
        TextBlock(json.dumps(elided, separators=(",", ":"))),
        ImageBlock(),
    ]
    assert count_request(request.system, request.messages, request.tools) < 2_000


def test_count_tokens_needs_no_max_tokens() -> None:
    body = body_of(user(text("x")), system="s", tools=[])
    del body["max_tokens"]
    assert decode_count_tokens(body, deadline=3.0) == TokenCountRequest(
        "m", [Message(Role.USER, [TextBlock("x")])], [TextBlock("s")], [], 3.0
    )
    with pytest.raises(InvalidArgumentError) as caught:
        decode_count_tokens(body | {"model": None}, deadline=None)
    assert [v.field for v in caught.value.violations] == ["model"]


def test_round_trip_through_the_anthropic_codec() -> None:
    """The decoded request, written back by the Anthropic provider's codec, is the body again."""
    body = full_body()
    request = decode(body).request
    kwargs, violations = _anthropic_codec.request_arguments(request, "gpt-test", "budget")
    assert violations == []
    for key in ("model", "max_tokens", "system", "messages", "tools", "tool_choice"):
        assert kwargs[key] == body[key], key
    for key in ("stop_sequences", "metadata", "thinking"):
        assert kwargs[key] == body[key], key


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
JSON_OBJECT = st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=3)


def mostly(valid: Any) -> Any:
    """Mostly `valid`, else any JSON value: junk that still reaches the deep paths."""
    return st.integers(0, 7).flatmap(lambda n: valid if n else JSON_VALUE)


def with_junk(block: Any) -> Any:
    """A block, sometimes with a key changed to any JSON value."""
    junk = st.tuples(block, st.sampled_from(["type", "text", "id", "input", "content", "x"]))
    changed = junk.flatmap(lambda b: JSON_VALUE.map(lambda v: b[0] | {b[1]: v}))
    return st.integers(0, 7).flatmap(lambda n: block if n else changed)


SHORT = st.text(max_size=4)
USE_ID = st.sampled_from(["t1", "t2"])
SHARED_BLOCKS = (
    st.builds(text, SHORT)
    | st.just(image())
    | st.just(image_url("https://x.test"))
    | JSON_OBJECT.map(lambda o: o | {"type": "document"})
)
USER_BLOCK = with_junk(
    SHARED_BLOCKS
    | st.builds(tool_result, USE_ID, st.none() | SHORT | st.lists(st.builds(text, SHORT)))
)
ASSISTANT_BLOCK = with_junk(
    SHARED_BLOCKS
    | st.builds(tool_use, USE_ID, st.just("f"), JSON_OBJECT)
    | st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, SHORT, SHORT)
    | st.just({"type": "redacted_thinking", "data": "x"})
)
MESSAGE = mostly(
    st.builds(user, *[USER_BLOCK] * 2)
    | st.builds(assistant, *[ASSISTANT_BLOCK] * 2)
    | st.fixed_dictionaries({"role": mostly(st.just("user")), "content": mostly(SHORT)})
)
TOOL = mostly(
    st.fixed_dictionaries(
        {"name": mostly(st.just("f")), "input_schema": mostly(st.just(SCHEMA))},
        optional={"type": mostly(st.just("web_search_20250305")), "strict": JSON_VALUE},
    )
)
BODY = st.fixed_dictionaries(
    {
        "model": mostly(st.just("m")),
        "max_tokens": mostly(st.integers(min_value=0, max_value=10**30)),
        "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=4)),
    },
    optional={
        "system": mostly(SHORT | st.lists(st.builds(text, SHORT), max_size=2)),
        "stream": mostly(st.booleans()),
        "temperature": mostly(st.floats(0, 1)),
        "top_p": mostly(st.floats(0, 1)),
        "top_k": mostly(st.integers(1, 10**30)),
        "stop_sequences": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        "tools": mostly(st.lists(TOOL, max_size=2)),
        "tool_choice": mostly(st.builds(lambda t: {"type": t}, st.sampled_from(["auto", "any"]))),
        "thinking": mostly(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["enabled", "adaptive", "disabled", "later"])},
                optional={"budget_tokens": mostly(st.integers(1024, 10**30))},
            )
        ),
        "metadata": mostly(st.fixed_dictionaries({}, optional={"user_id": SHORT})),
        "container": JSON_VALUE,
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
        count_request(request.system, request.messages, request.tools)
    try:
        decode_count_tokens(body, deadline=None)
    except InvalidArgumentError as err:
        assert err.violations


# -- Encoding --------------------------------------------------------------------------


def encode(events: list[StreamEvent], *, finish: bool = False) -> bytes:
    encoder = StreamEncoder()
    out = b"".join(encoder.feed(event) for event in events)
    return out + encoder.finish() if finish else out


def blocks_of(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The content blocks a stream describes, its deltas applied."""
    blocks: list[dict[str, Any]] = []
    for name, data in events:
        if name == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            delta, block = data["delta"], blocks[data["index"]]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "input_json_delta":
                block.setdefault("json", "")
                block["json"] += delta["partial_json"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                block["signature"] += delta["signature"]
    return blocks


def final_delta(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    (data,) = [data for name, data in events if name == "message_delta"]
    return data


def test_text_stream_follows_the_grammar() -> None:
    raw = encode(
        [
            MessageStart("chatcmpl-9", "gpt-x", "openai", usage=Usage(input_tokens=12)),
            ContentBlockStart(0, TextBlock("")),
            TextDelta(0, "Hello, "),
            TextDelta(0, 'wörld "\n'),
            ContentBlockStop(0),
            MessageDelta(usage=Usage(input_tokens=12, output_tokens=2)),
            MessageDelta(StopReason.END_TURN, usage=Usage(input_tokens=12, output_tokens=5)),
            MessageStop(),
        ]
    )
    assert raw.startswith(b"event: message_start\ndata: {")
    assert "wörld".encode() in raw  # ensure_ascii=False
    events = check_anthropic_stream(raw)
    message = events[0][1]["message"]
    assert (message["id"], message["model"]) == ("msg_chatcmpl-9", "gpt-x")
    assert message["usage"] == {
        "input_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    assert blocks_of(events) == [{"type": "text", "text": 'Hello, wörld "\n'}]
    delta = final_delta(events)  # one message_delta: the last, cumulative
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 5
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (StopReason.END_TURN, "tool_use"),
        (None, "tool_use"),
        (StopReason.MAX_TOKENS, "max_tokens"),  # a truncated tool input stays truncated
    ],
)
def test_tool_use_turn_ends_tool_use(upstream: StopReason | None, expected: str) -> None:
    events = check_anthropic_stream(
        encode(
            [
                MessageStart("msg_1", "m", "p"),
                ContentBlockStart(0, TextBlock("Let me look.")),
                ContentBlockStart(1, ToolUseBlock("call_1", "weather")),
                ToolInputDelta(1, '{"city": '),
                ToolInputDelta(1, '"Paris"}'),
                ContentBlockStart(2, ToolUseBlock("call_2", "clock", {"tz": "CET"})),
                ContentBlockStop(0),
                ContentBlockStop(1),
                ContentBlockStop(2),
                MessageDelta(upstream),
                MessageStop(),
            ]
        )
    )
    assert blocks_of(events) == [
        {"type": "text", "text": "Let me look."},
        {
            "type": "tool_use",
            "id": "call_1",
            "name": "weather",
            "input": {},
            "json": '{"city": "Paris"}',
        },
        {"type": "tool_use", "id": "call_2", "name": "clock", "input": {}, "json": '{"tz":"CET"}'},
    ]
    assert final_delta(events)["delta"]["stop_reason"] == expected


def test_thinking_with_signature_and_redacted_thinking() -> None:
    events = check_anthropic_stream(
        encode(
            [
                MessageStart("msg_1", "m", "p"),
                ContentBlockStart(0, ThinkingBlock()),
                ThinkingDelta(0, "Hmm."),
                SignatureDelta(0, "sig=="),
                ContentBlockStop(0),
                ContentBlockStart(1, ThinkingBlock(redacted_data="enc")),
                ContentBlockStop(1),
                ContentBlockStart(2, TextBlock("")),
                TextDelta(2, "Done."),
                ContentBlockStop(2),
                MessageDelta(StopReason.END_TURN),
                MessageStop(),
            ]
        )
    )
    assert blocks_of(events) == [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig=="},
        {"type": "redacted_thinking", "data": "enc"},
        {"type": "text", "text": "Done."},
    ]


def test_blocks_left_open_and_interleaved_are_serialized() -> None:
    """As the OpenAI decoder streams: blocks open together, all stopped at the end."""
    events = check_anthropic_stream(
        encode(
            [
                MessageStart("", "m", "p"),
                TextDelta(5, "for a block never started"),
                ContentBlockStart(0, ThinkingBlock()),
                ThinkingDelta(0, "First "),
                ContentBlockStart(1, TextBlock("")),
                TextDelta(1, "Answer"),
                ThinkingDelta(0, "then more."),
                TextDelta(1, " resumed"),
                ToolInputDelta(1, "{}"),  # of the wrong kind: dropped
                MessageDelta(StopReason.CONTENT_FILTER, usage=Usage(output_tokens=9)),
            ],
            finish=True,  # no ContentBlockStop, no MessageStop
        )
    )
    assert events[0][1]["message"]["id"].startswith("msg_")
    assert blocks_of(events) == [
        {"type": "thinking", "thinking": "First ", "signature": ""},
        {"type": "text", "text": "Answer"},
        {"type": "thinking", "thinking": "then more.", "signature": ""},
        {"type": "text", "text": " resumed"},
    ]
    assert final_delta(events)["delta"]["stop_reason"] == "refusal"
    assert final_delta(events)["usage"]["output_tokens"] == 9


def test_tool_input_after_another_block_started_is_refused() -> None:
    encoder = StreamEncoder()
    for event in (
        MessageStart("msg_1", "m", "p"),
        ContentBlockStart(0, ToolUseBlock("a", "f")),
        ContentBlockStart(1, ToolUseBlock("b", "f")),
    ):
        encoder.feed(event)
    with pytest.raises(UpstreamProtocolError):
        encoder.feed(ToolInputDelta(0, "{}"))


def test_encoder_edges() -> None:
    encoder = StreamEncoder(model="alias")
    assert encoder.feed(ContentBlockStart(0, TextBlock("early"))) == b""
    assert encoder.finish() == b""  # nothing started: the caller owes an error instead
    assert not encoder.started
    start = encoder.feed(MessageStart("msg_7", "served", "p"))
    assert b'"model":"alias"' in start and encoder.started
    assert encoder.feed(MessageStart("msg_8", "m", "p")) == b""
    assert encoder.feed(ContentBlockStart(0, ImageBlock(url="https://x"))) == b""
    assert encoder.feed(TextDelta(0, "x")) == b""
    assert encoder.feed(ContentBlockStop(3)) == b""
    end = encoder.feed(MessageStop())
    assert encoder.done and encoder.feed(MessageStop()) == b"" and encoder.finish() == b""
    events = check_anthropic_stream(start + end)
    assert final_delta(events)["delta"]["stop_reason"] == "end_turn"


INDEX = st.integers(0, 3)
STARTED_BLOCK = st.sampled_from(
    [
        TextBlock(""),
        TextBlock("hi"),
        ToolUseBlock("t", "f"),
        ThinkingBlock(),
        ThinkingBlock(redacted_data="r"),
        ImageBlock(),
    ]
)
EVENT = st.one_of(
    st.builds(MessageStart, st.sampled_from(["msg_1", "", "x"]), st.just("m"), st.just("p")),
    st.builds(ContentBlockStart, INDEX, STARTED_BLOCK),
    st.builds(TextDelta, INDEX, st.text(max_size=3)),
    st.builds(ToolInputDelta, INDEX, st.just('{"a": 1}')),
    st.builds(ThinkingDelta, INDEX, st.text(max_size=3)),
    st.builds(SignatureDelta, INDEX, st.text(max_size=3)),
    st.builds(ContentBlockStop, INDEX),
    st.builds(MessageDelta, st.none() | st.sampled_from(StopReason)),
    st.just(MessageStop()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENT, max_size=25))
def test_any_event_sequence_encodes_to_the_grammar(events: list[StreamEvent]) -> None:
    encoder = StreamEncoder()
    raw, inputs = encoder.feed(MessageStart("msg_0", "m", "p")), set()
    for event in events:
        if isinstance(event, ToolInputDelta):
            if event.index in inputs:
                continue  # one whole input per tool use, so that it parses
            inputs.add(event.index)
        try:
            raw += encoder.feed(event)
        except UpstreamProtocolError:
            check_anthropic_stream(raw + error_event("api_error", "interleaved tool input"))
            return
    check_anthropic_stream(raw + encoder.finish())


def test_a_lone_surrogate_becomes_its_json_escape() -> None:
    raw = encode(
        [
            MessageStart("msg_1", "m", "p"),
            ContentBlockStart(0, TextBlock("")),
            TextDelta(0, "a\ud800b"),
            MessageStop(),
        ]
    )
    assert blocks_of(check_anthropic_stream(raw)) == [{"type": "text", "text": "a\ud800b"}]


@pytest.mark.parametrize(
    ("reason", "tool_use", "expected"),
    [
        (StopReason.CONTENT_FILTER, False, "refusal"),
        (StopReason.CONTEXT_WINDOW_EXCEEDED, True, "model_context_window_exceeded"),
        (StopReason.STOP_SEQUENCE, False, "stop_sequence"),
        (StopReason.PAUSE_TURN, False, "pause_turn"),
        (StopReason.REFUSAL, True, "tool_use"),
        (None, False, "end_turn"),
    ],
)
def test_stop_reasons(reason: StopReason | None, tool_use: bool, expected: str) -> None:
    assert anthropic_stop_reason(reason, tool_use=tool_use) == expected


def test_ping_and_error_events() -> None:
    start = encode([MessageStart("msg_1", "m", "p"), ContentBlockStart(0, TextBlock(""))])
    raw = ping_event() + start + ping_event() + error_event("overloaded_error", "Overloaded")
    events = check_anthropic_stream(raw)
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert ping_event() == b'event: ping\ndata: {"type": "ping"}\n\n'


def test_encode_message() -> None:
    response = GenerationResponse(
        id="chatcmpl-1",
        model="gpt-x",
        provider="openai",
        content=[
            ThinkingBlock("why", "sig"),
            TextBlock("Calling."),
            ToolUseBlock("call_1", "f", {"a": 1}),
            ImageBlock(url="https://x"),
        ],
        stop_reason=StopReason.END_TURN,
        usage=Usage(input_tokens=3, output_tokens=4, cache_read_input_tokens=2),
    )
    assert encode_message(response) == {
        "id": "msg_chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "gpt-x",
        "content": [
            {"type": "thinking", "thinking": "why", "signature": "sig"},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 3,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2,
            "output_tokens": 4,
        },
    }


def test_anthropic_stream_survives_decoding_and_encoding_again() -> None:
    """Anthropic's SSE -> the provider's decoder -> StreamEncoder gives the same stream back."""
    reply = Reply(
        blocks=[
            Thinking("Plan."),
            RedactedThinking("enc"),
            Text("Calling the tool."),
            ToolCall("toolu_1", "weather", {"city": "Oslo"}),
        ],
        stop_sequence=None,
    )
    original = check_anthropic_stream(b"".join(anthropic_wire.stream_events(reply, "claude-x")))
    decoder = _anthropic_codec.MessagesStreamDecoder(
        provider="anthropic", model="claude-x", request_id="r", upstream_request_id="u"
    )
    encoder = StreamEncoder()
    raw = b""
    for _, data in original:
        event = decoder.feed(data)
        if event is not None:
            raw += encoder.feed(event)
    again = check_anthropic_stream(raw)
    assert blocks_of(again) == blocks_of(original)
    assert again[0][1]["message"]["id"] == original[0][1]["message"]["id"]
    assert final_delta(again)["delta"] == final_delta(original)["delta"]
    assert final_delta(again)["usage"] == final_delta(original)["usage"]


# -- The grammar checker -----------------------------------------------------------------


def sse(name: str, **fields: Any) -> bytes:
    data = json.dumps({"type": name, **fields}, ensure_ascii=False)
    return f"event: {name}\ndata: {data}\n\n".encode()


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [],
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 1, "output_tokens": 0},
}
START = sse("message_start", message=MESSAGE)
BLOCK_START = sse("content_block_start", index=0, content_block={"type": "text", "text": ""})
DELTA = sse("content_block_delta", index=0, delta={"type": "text_delta", "text": "hé"})
BLOCK_STOP = sse("content_block_stop", index=0)
END_TURN = {"stop_reason": "end_turn", "stop_sequence": None}
MESSAGE_DELTA = sse("message_delta", delta=END_TURN, usage={"output_tokens": 3})
STOP = sse("message_stop")
GOOD = [START, BLOCK_START, DELTA, BLOCK_STOP, MESSAGE_DELTA, STOP]
BAD = {
    "delta-unopened": [START, DELTA, BLOCK_STOP, MESSAGE_DELTA, STOP],
    "second-message-start": [START, *GOOD],
    "no-message-stop": GOOD[:-1],
    "block-before-start": [BLOCK_START, *GOOD[1:]],
    "block-left-open": [START, BLOCK_START, MESSAGE_DELTA, STOP],
    "two-message-deltas": [*GOOD[:4], MESSAGE_DELTA, MESSAGE_DELTA, STOP],
    "event-after-stop": [*GOOD, ping_event()],
    "delta-of-another-block": [*GOOD[:2], DELTA.replace(b'"index": 0', b'"index": 1'), *GOOD[3:]],
    "index-gap": [START, BLOCK_START.replace(b'"index": 0', b'"index": 1'), *GOOD[2:]],
    "name-not-type": [START.replace(b"event: message_start", b"event: message_stop"), *GOOD[1:]],
    "delta-of-wrong-kind": [
        *GOOD[:2],
        DELTA.replace(b"text_delta", b"input_json_delta"),
        *GOOD[3:],
    ],
    "event-after-error": [*GOOD[:3], error_event("api_error", "x"), BLOCK_STOP],
    "cut-short": [b"".join(GOOD)[:-1]],
}


def test_checker_accepts_a_good_stream_with_crlf_and_comments() -> None:
    raw = (b": keep-alive\n\n" + b"".join(GOOD)).replace(b"\n", b"\r\n")
    names = [name for name, _ in check_anthropic_stream(raw)]
    assert names == [json.loads(e.split(b"data: ")[1])["type"] for e in GOOD]


@pytest.mark.parametrize("pieces", BAD.values(), ids=BAD.keys())
def test_checker_rejects_bad_streams(pieces: list[bytes]) -> None:
    with pytest.raises(AssertionError):
        check_anthropic_stream(b"".join(pieces))


def test_checker_partial_mode_accepts_a_cut_stream() -> None:
    cut = b"".join(GOOD[:3]) + DELTA[: DELTA.index("é".encode()) + 1]  # inside a character
    events = check_anthropic_stream(cut, partial=True)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    with pytest.raises(AssertionError):
        check_anthropic_stream(cut)
    with pytest.raises(AssertionError):
        check_anthropic_stream(START + DELTA, partial=True)
