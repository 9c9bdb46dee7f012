"""The Anthropic provider, end to end: gRPC caller -> gateway -> SDK -> fake Anthropic API.

Each test checks both what the fake upstream received and what the caller got.
"""

from __future__ import annotations

import base64

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import field_violations
from tests.event_grammar import check_event_stream
from tests.fake_upstream import (
    FakeUpstream,
    RedactedThinking,
    Reply,
    Text,
    Thinking,
    ToolCall,
    Usage,
)
from tests.upstream_fixtures import (
    ANTHROPIC_KEY,
    PNG,
    ask,
    assistant,
    fold_stream,
    generate,
    kinds,
    stream_all,
    text,
)
from tests.upstream_fixtures import user_blocks as user

MESSAGES = "/v1/messages"


def everything_request(request_id: str) -> pb.GenerateRequest:
    """A request using every field of the contract that Anthropic takes."""
    return pb.GenerateRequest(
        model="claude-test",
        system=[
            text("Be brief."),
            text(
                "Long shared context.",
                cache_control=pb.CacheControl(ttl=duration_pb2.Duration(seconds=3600)),
            ),
        ],
        messages=[
            user(
                text("What is in these pictures?"),
                pb.ContentBlock(image=pb.ImageBlock(data=PNG, media_type="image/png")),
                pb.ContentBlock(image=pb.ImageBlock(url="https://example.com/cat.jpg")),
            ),
            assistant(text("A cat and a dog.")),
            user(text("Which is bigger?", cache_control=pb.CacheControl())),
        ],
        max_tokens=500,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END"],
        metadata=pb.CallerMetadata(end_user_id="user-42", tags={"team": "search"}),
        request_id=request_id,
    )


EXPECTED_BODY = {
    "model": "claude-upstream-1",
    "max_tokens": 500,
    "stream": True,
    "system": [
        {"type": "text", "text": "Be brief."},
        {
            "type": "text",
            "text": "Long shared context.",
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        },
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": "image/png",
                        "data": base64.b64encode(PNG).decode(),
                    },
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat and a dog."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Which is bigger?", "cache_control": {"type": "ephemeral"}}
            ],
        },
    ],
    "stop_sequences": ["END"],
    "metadata": {"user_id": "user-42"},
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
}


async def test_every_field_round_trips_unary(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("The dog.")], stop_reason="end_turn", request_id="req_u1"))
    response, trailers = await generate(upstream_stub, everything_request("rt-a-1"))

    received = fake.last(MESSAGES)
    # Generate makes one non-streaming call (replayed through the stream decoder).
    assert received.body == {k: v for k, v in EXPECTED_BODY.items() if k != "stream"}
    assert received.headers["x-request-id"] == "rt-a-1"
    assert received.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert "x-stainless-retry-count" in received.headers

    assert [b.text for b in response.content] == ["The dog."]
    assert (response.model, response.provider) == ("claude-test", "anthropic")
    assert response.stop_reason == pb.STOP_REASON_END_TURN
    assert (response.request_id, response.upstream_request_id) == ("rt-a-1", "req_u1")
    assert response.id == "msg_fake0001"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (12, 7)
    # 12 input tokens at $3/M and 7 output tokens at $15/M, in nano-dollars.
    assert (response.cost.input_nanos, response.cost.output_nanos) == (36_000, 105_000)
    assert trailers["x-request-id"] == "rt-a-1"
    assert trailers["x-upstream-request-id"] == "req_u1"


async def test_every_field_round_trips_streaming(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("The big dog.")], request_id="req_s1"))
    events, trailers = await stream_all(upstream_stub, everything_request("rt-a-2"))
    check_event_stream(events)

    assert fake.last(MESSAGES).body == EXPECTED_BODY
    assert kinds(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [e.content_block_delta.text for e in events[2:5]] == ["The ", "big ", "dog."]
    start = events[0].message_start
    assert (start.upstream_request_id, start.request_id) == ("req_s1", "rt-a-2")
    # message_start reports output_tokens 1; message_delta's total replaces it.
    assert (start.usage.input_tokens, start.usage.output_tokens) == (12, 1)
    assert events[6].message_delta.usage.output_tokens == 7
    assert trailers["x-upstream-request-id"] == "req_s1"

    fake.enqueue(Reply(blocks=[Text("The big dog.")], request_id="req_s1"))
    # Another request id: the same one would be a repeat, answered by the first
    # call's answer (server/cache/idempotency.py), not by an upstream call.
    unary, _ = await generate(upstream_stub, everything_request("rt-a-3"))
    folded = fold_stream(events)
    folded.request_id = unary.request_id
    assert folded == unary


async def test_tool_use_conversation_over_two_turns(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    tools = [
        pb.Tool(
            name="get_weather",
            description="Weather by city",
            input_schema=json_format.ParseDict(
                {"type": "object", "properties": {"city": {"type": "string"}}},
                pb.Tool().input_schema,
            ),
        ),
        pb.Tool(name="get_time"),
    ]
    choice = pb.ToolChoice(mode=pb.ToolChoice.MODE_ANY, disable_parallel_tool_use=False)
    fake.enqueue(
        Reply(
            blocks=[
                Text("Checking both."),
                ToolCall("toolu_01", "get_weather", {"city": "Paris", "days": 2}, fragments=3),
                ToolCall("toolu_02", "get_time", {"zone": "CET"}),
            ]
        )
    )
    first_request = ask(
        "claude-test", "Weather and time in Paris?", tools=tools, tool_choice=choice
    )
    events, _ = await stream_all(upstream_stub, first_request)
    check_event_stream(events)
    first = fold_stream(events)
    body = fake.last(MESSAGES).body
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather by city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == {"type": "any"}
    assert first.stop_reason == pb.STOP_REASON_TOOL_USE
    uses = [b.tool_use for b in first.content[1:]]
    assert [(u.id, u.name, json_format.MessageToDict(u.input)) for u in uses] == [
        ("toolu_01", "get_weather", {"city": "Paris", "days": 2}),
        ("toolu_02", "get_time", {"zone": "CET"}),
    ]
    fragments = [
        e.content_block_delta.tool_input_json
        for e in events
        if e.HasField("content_block_delta") and e.content_block_delta.index == 1
    ]
    assert len(fragments) == 3

    fake.enqueue(Reply(blocks=[Text("Sunny, and 14:00.")]))
    second_request = pb.GenerateRequest(
        model="claude-test",
        tools=tools,
        messages=[
            *first_request.messages,
            assistant(*first.content),
            user(
                pb.ContentBlock(
                    tool_result=pb.ToolResultBlock(
                        tool_use_id="toolu_01", content=[text("18 C, sunny")]
                    )
                ),
                pb.ContentBlock(
                    tool_result=pb.ToolResultBlock(
                        tool_use_id="toolu_02", content=[text("clock broken")], is_error=True
                    )
                ),
            ),
        ],
    )
    second, _ = await generate(upstream_stub, second_request)
    sent = fake.last(MESSAGES).body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking both."},
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "get_weather",
                "input": {"city": "Paris", "days": 2},
            },
            {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {"zone": "CET"}},
        ],
    }
    assert sent[2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01",
                "content": [{"type": "text", "text": "18 C, sunny"}],
            },
            {
                "type": "tool_result",
                "tool_use_id": "toolu_02",
                "content": [{"type": "text", "text": "clock broken"}],
                "is_error": True,
            },
        ],
    }
    assert second.content[0].text == "Sunny, and 14:00."
    assert second.stop_reason == pb.STOP_REASON_END_TURN


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO), {"type": "auto"}),
        (
            pb.ToolChoice(mode=pb.ToolChoice.MODE_ANY, disable_parallel_tool_use=True),
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        (pb.ToolChoice(mode=pb.ToolChoice.MODE_NONE), {"type": "none"}),
        (
            pb.ToolChoice(
                mode=pb.ToolChoice.MODE_TOOL, tool_name="lookup", disable_parallel_tool_use=True
            ),
            {"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
        ),
    ],
    ids=["auto", "any-single", "none", "named"],
)
async def test_tool_choice_modes(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    choice: pb.ToolChoice,
    expected: dict[str, object],
) -> None:
    req = ask("claude-test", "hi", tools=[pb.Tool(name="lookup")], tool_choice=choice)
    await upstream_stub.Generate(req)
    assert fake.last(MESSAGES).body["tool_choice"] == expected


async def test_thinking_streams_and_goes_back_upstream(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    reply = Reply(
        blocks=[
            Thinking("Let me think.", signature="sig-42"),
            RedactedThinking("ENCRYPTED=="),
            Text("42."),
        ]
    )
    fake.enqueue(reply)
    req = ask(
        "claude-test", "Answer?", max_tokens=4096, thinking=pb.ThinkingConfig(budget_tokens=2048)
    )
    events, _ = await stream_all(upstream_stub, req)
    check_event_stream(events)
    assert fake.last(MESSAGES).body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    deltas = [
        e.content_block_delta.WhichOneof("delta")
        for e in events
        if e.HasField("content_block_delta")
    ]
    assert deltas[:2] == ["thinking", "thinking_signature"]
    folded = fold_stream(events)
    assert folded.content[0].thinking == pb.ThinkingBlock(text="Let me think.", signature="sig-42")
    assert folded.content[1].thinking == pb.ThinkingBlock(redacted_data="ENCRYPTED==")
    assert folded.content[2].text == "42."

    fake.enqueue(reply)
    unary, _ = await generate(upstream_stub, req)
    assert unary.content == folded.content

    follow_up = pb.GenerateRequest(
        model="claude-test",
        messages=[*req.messages, assistant(*folded.content), user(text("Why?"))],
    )
    await upstream_stub.Generate(follow_up)
    assert fake.last(MESSAGES).body["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig-42"},
        {"type": "redacted_thinking", "data": "ENCRYPTED=="},
        {"type": "text", "text": "42."},
    ]


async def test_adaptive_thinking_model_gets_adaptive_thinking(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    req = ask(
        "claude-sonnet-5-5", "Hi", max_tokens=8000, thinking=pb.ThinkingConfig(budget_tokens=4000)
    )
    await upstream_stub.Generate(req)
    body = fake.last(MESSAGES).body
    assert body["model"] == "claude-sonnet-5-5"
    assert body["thinking"] == {"type": "adaptive"}


async def test_unsupported_parameters_are_refused_before_any_upstream_call(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask("claude-sonnet-5-5", "Hi", temperature=0.2, top_k=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert set(violations) == {"temperature", "top_k"}
    assert "claude-sonnet-5-5" in violations["temperature"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(
            ask("claude-test", "Hi", max_tokens=4096, thinking=pb.ThinkingConfig(budget_tokens=512))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1024" in field_violations(caught.value)["thinking.budget_tokens"]
    assert fake.requests == []


async def test_usage_with_cache_tokens_is_replaced_not_added(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    usage = Usage(
        input_tokens=100,
        output_tokens=50,
        cache_read_input_tokens=1_000,
        cache_creation_input_tokens=200,
    )
    fake.enqueue(Reply(usage=usage))
    events, _ = await stream_all(upstream_stub, ask("claude-test", "Hi"))
    check_event_stream(events)
    start = events[0].message_start.usage
    final = events[-2].message_delta
    assert (start.input_tokens, start.output_tokens) == (100, 1)
    expected = pb.Usage(
        input_tokens=100,
        output_tokens=50,
        cache_read_input_tokens=1_000,
        cache_creation_input_tokens=200,
    )
    assert final.usage == expected
    # Each bucket at its own price: $3, $15, $0.30 and $3.75 per million.
    assert final.cost == pb.Cost(
        currency_code="USD",
        input_nanos=300_000,
        output_nanos=750_000,
        cache_read_nanos=300_000,
        cache_creation_nanos=750_000,
        total_nanos=2_100_000,
    )
    fake.enqueue(Reply(usage=usage))
    assert (await upstream_stub.Generate(ask("claude-test", "Hi"))).usage == expected


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("end_turn", pb.STOP_REASON_END_TURN),
        ("max_tokens", pb.STOP_REASON_MAX_TOKENS),
        ("stop_sequence", pb.STOP_REASON_STOP_SEQUENCE),
        ("tool_use", pb.STOP_REASON_TOOL_USE),
        ("pause_turn", pb.STOP_REASON_PAUSE_TURN),
        ("refusal", pb.STOP_REASON_REFUSAL),
        ("model_context_window_exceeded", pb.STOP_REASON_CONTEXT_WINDOW_EXCEEDED),
    ],
)
async def test_stop_reasons(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, upstream: str, ours: int
) -> None:
    stop_sequence = "END" if upstream == "stop_sequence" else None
    fake.enqueue(Reply(stop_reason=upstream, stop_sequence=stop_sequence))
    response = await upstream_stub.Generate(ask("claude-test", "Hi"))
    assert response.stop_reason == ours
    assert response.stop_sequence == (stop_sequence or "")


async def test_provider_options_merge_into_the_sdk_call(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    req = ask("claude-test", "Hi")
    req.provider_options.update(
        {
            "betas": ["context-1m-2025-08-07", "fast-mode-2026-02-01"],
            "output_config": {"effort": "low"},
            "service_tier": "standard_only",
            "extra_headers": {"x-team": "search"},
            "future_knob": {"depth": 3},
        }
    )
    await upstream_stub.Generate(req)
    received = fake.last(MESSAGES)
    assert received.headers["anthropic-beta"] == "context-1m-2025-08-07,fast-mode-2026-02-01"
    assert received.headers["x-team"] == "search"
    assert received.body["output_config"] == {"effort": "low"}
    assert received.body["service_tier"] == "standard_only"
    # Struct numbers are doubles; integral ones go upstream as integers.
    assert received.body["future_knob"] == {"depth": 3}
    assert isinstance(received.body["future_knob"]["depth"], int)

    bad = ask("claude-test", "Hi")
    bad.provider_options.update({"stream": False, "extra_headers": {"Authorization": "Bearer x"}})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "provider_options.stream",
        "provider_options.extra_headers.Authorization",
    }


async def test_count_tokens_uses_the_count_tokens_endpoint(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(count_tokens=1234))
    counted = await upstream_stub.CountTokens(
        pb.CountTokensRequest(
            model="claude-test-latest",
            system=[text("Be brief.")],
            messages=[user(text("Hello"))],
            tools=[pb.Tool(name="lookup", description="Looks up")],
        )
    )
    assert (counted.input_tokens, counted.estimated) == (1234, False)
    received = fake.last("/v1/messages/count_tokens")
    assert received.body == {
        "model": "claude-upstream-1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "system": [{"type": "text", "text": "Be brief."}],
        "tools": [
            {
                "name": "lookup",
                "description": "Looks up",
                "input_schema": {"type": "object", "properties": {}},
            }
        ],
    }


async def test_list_models_shows_configured_and_catalog_values(
    upstream_stub: pb_grpc.GenerationServiceStub,
) -> None:
    listed = await upstream_stub.ListModels(pb.ListModelsRequest(provider="anthropic"))
    by_id = {m.id: m for m in listed.models}
    assert set(by_id) == {"claude-test", "claude-sonnet-5-5"}
    test = by_id["claude-test"]
    assert (test.display_name, list(test.aliases)) == ("Claude (test)", ["claude-test-latest"])
    assert (test.context_window, test.max_output_tokens) == (200_000, 16_000)
    assert test.pricing == pb.Pricing(
        input_per_mtok=3.0,
        output_per_mtok=15.0,
        cache_read_per_mtok=0.3,
        cache_creation_per_mtok=3.75,
    )
    assert test.capabilities == pb.Capabilities(
        streaming=True, tools=True, images=True, thinking=True
    )
    sonnet = by_id["claude-sonnet-5-5"]
    assert (sonnet.display_name, sonnet.context_window, sonnet.max_output_tokens) == (
        "Claude Sonnet 5.5",
        1_000_000,
        128_000,
    )
    assert (sonnet.pricing.input_per_mtok, sonnet.pricing.output_per_mtok) == (2.0, 10.0)
    assert sonnet.capabilities.thinking


async def test_an_unlisted_claude_id_routes_by_prefix_with_conservative_limits(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    response = await upstream_stub.Generate(ask("claude-brand-new-9", "Hi"))
    assert (response.provider, response.model) == ("anthropic", "claude-brand-new-9")
    body = fake.last(MESSAGES).body
    assert (body["model"], body["max_tokens"]) == ("claude-brand-new-9", 4_096)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask("claude-brand-new-9", "Hi", max_tokens=9_000))
    assert "max_tokens" in field_violations(caught.value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask("mystery-model", "Hi"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
