"""The OpenAI provider, end to end: gRPC caller -> gateway -> SDK -> fake Chat Completions API.

Also an OpenAI-compatible server ("local", vLLM-like). Each test checks both
what the fake upstream received and what the caller got.
"""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.providers._openai_codec import ChatStreamDecoder
from tests.conftest import field_violations
from tests.event_grammar import check_event_stream
from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking, ToolCall, Usage
from tests.upstream_fixtures import (
    OPENAI_KEY,
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

CHAT = "/v1/chat/completions"


def everything_request(request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="gpt-test",
        system=[
            text("Be brief."),
            text(
                "Long shared context.",
                cache_control=pb.CacheControl(ttl=duration_pb2.Duration(seconds=7200)),
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
        stop_sequences=["END"],
        metadata=pb.CallerMetadata(end_user_id="user-42"),
        request_id=request_id,
    )


EXPECTED_BODY = {
    "model": "gpt-upstream-1",
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_completion_tokens": 500,
    "messages": [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Be brief."},
                {
                    "type": "text",
                    "text": "Long shared context.",
                    "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
                },
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {"role": "assistant", "content": "A cat and a dog."},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "Which is bigger?",
                    "prompt_cache_breakpoint": {"mode": "explicit"},
                }
            ],
        },
    ],
    "stop": ["END"],
    "safety_identifier": "user-42",
    "temperature": 0.7,
    "top_p": 0.9,
}

UNARY_BODY = {k: v for k, v in EXPECTED_BODY.items() if k not in ("stream", "stream_options")}


async def test_every_field_round_trips_unary_and_streaming(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("The dog.")], message_id="chatcmpl-1", request_id="req_o1"))
    response, trailers = await generate(upstream_stub, everything_request("rt-o-1"))
    received = fake.last(CHAT)
    # Generate makes one non-streaming call (replayed through the stream decoder).
    assert received.body == UNARY_BODY
    assert received.headers["x-client-request-id"] == "rt-o-1"
    assert received.headers["x-request-id"] == "rt-o-1"
    assert received.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert [b.text for b in response.content] == ["The dog."]
    assert (response.id, response.model, response.provider) == ("chatcmpl-1", "gpt-test", "openai")
    assert response.stop_reason == pb.STOP_REASON_END_TURN
    assert response.upstream_request_id == "req_o1"
    assert trailers["x-upstream-request-id"] == "req_o1"

    fake.enqueue(Reply(blocks=[Text("The dog.")], message_id="chatcmpl-1", request_id="req_o1"))
    # Another request id: the same one would be a repeat, answered by the first
    # call's answer (server/cache/idempotency.py), not by an upstream call.
    events, trailers = await stream_all(upstream_stub, everything_request("rt-o-2"))
    check_event_stream(events)
    assert fake.last(CHAT).body == EXPECTED_BODY
    assert kinds(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    folded = fold_stream(events)
    assert folded.request_id == "rt-o-2"
    folded.request_id = response.request_id
    assert folded == response
    assert trailers["x-upstream-request-id"] == "req_o1"


async def test_parallel_tool_calls_stream_by_index(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(
            blocks=[
                Text("Checking."),
                ToolCall("call_a", "get_weather", {"city": "Paris"}, fragments=3),
                ToolCall("call_b", "get_weather", {"city": "Oslo", "days": 2}),
            ]
        )
    )
    tools = [pb.Tool(name="get_weather", description="Weather by city")]
    req = ask("gpt-test", "Paris and Oslo?", tools=tools)
    events, _ = await stream_all(upstream_stub, req)
    check_event_stream(events)
    body = fake.last(CHAT).body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    starts = [e.content_block_start for e in events if e.HasField("content_block_start")]
    assert [(s.index, s.content_block.WhichOneof("block")) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    assert (starts[1].content_block.tool_use.id, starts[2].content_block.tool_use.id) == (
        "call_a",
        "call_b",
    )
    fragments = [
        e.content_block_delta.tool_input_json
        for e in events
        if e.HasField("content_block_delta") and e.content_block_delta.index == 1
    ]
    assert len(fragments) == 3
    folded = fold_stream(events)
    assert folded.stop_reason == pb.STOP_REASON_TOOL_USE
    assert [json_format.MessageToDict(b.tool_use.input) for b in folded.content[1:]] == [
        {"city": "Paris"},
        {"city": "Oslo", "days": 2},
    ]


def _tool_chunk(position: int, arguments: str, call_id: str = "") -> dict[str, object]:
    call: dict[str, object] = {"index": position, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
        call["function"] = {"name": "get_weather", "arguments": arguments}
    return {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


def test_two_tool_calls_each_stop_before_the_next_starts() -> None:
    # Was start(0) d d start(1) d stop(0) stop(1): block 0 still open when 1 began.
    decoder = ChatStreamDecoder(
        provider="openai", model="m", request_id="r", upstream_request_id=""
    )
    chunks = [
        _tool_chunk(0, "", "call_a"),
        _tool_chunk(0, '{"city":'),
        _tool_chunk(0, '"Paris"}'),
        _tool_chunk(1, "", "call_b"),
        _tool_chunk(1, '{"city":"Oslo"}'),
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.finish()
    check_event_stream(events)
    steps = [type(e).__name__ + str(getattr(e, "index", "")) for e in events]
    assert steps == [
        "MessageStart",
        "ContentBlockStart0",
        "ToolInputDelta0",
        "ToolInputDelta0",
        "ContentBlockStop0",
        "ContentBlockStart1",
        "ToolInputDelta1",
        "ContentBlockStop1",
        "MessageDelta",
        "MessageStop",
    ]


def test_text_after_a_tool_call_is_a_new_block() -> None:
    decoder = ChatStreamDecoder(
        provider="openai", model="m", request_id="r", upstream_request_id=""
    )
    text_chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    chunks = [
        text_chunk,
        _tool_chunk(0, "{}", "call_a"),
        text_chunk,
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    events = [event for chunk in chunks for event in decoder.feed(chunk)] + decoder.finish()
    check_event_stream(events)
    starts = [e.index for e in events if type(e).__name__ == "ContentBlockStart"]
    assert starts == [0, 1, 2]


def test_a_tool_call_continued_after_the_next_began_is_unreadable() -> None:
    decoder = ChatStreamDecoder(
        provider="openai", model="m", request_id="r", upstream_request_id=""
    )
    decoder.feed(_tool_chunk(0, "{", "call_a"))
    decoder.feed(_tool_chunk(1, "{}", "call_b"))
    with pytest.raises(ValueError, match="continued after another block began"):
        decoder.feed(_tool_chunk(0, "}"))


async def test_tool_use_conversation_over_two_turns(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    tools = [pb.Tool(name="get_weather"), pb.Tool(name="get_time")]
    fake.enqueue(
        Reply(
            blocks=[
                ToolCall("call_a", "get_weather", {"city": "Paris"}),
                ToolCall("call_b", "get_time", {"zone": "CET"}),
            ]
        )
    )
    first_request = ask(
        "gpt-test",
        "Weather and time?",
        tools=tools,
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO),
    )
    first = await upstream_stub.Generate(first_request)
    assert first.stop_reason == pb.STOP_REASON_TOOL_USE

    fake.enqueue(Reply(blocks=[Text("Sunny; the clock is broken.")]))
    second = await upstream_stub.Generate(
        pb.GenerateRequest(
            model="gpt-test",
            tools=tools,
            messages=[
                *first_request.messages,
                assistant(*first.content),
                user(
                    pb.ContentBlock(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id="call_a", content=[text("18 C"), text("sunny")]
                        )
                    ),
                    pb.ContentBlock(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id="call_b", content=[text("clock broken")], is_error=True
                        )
                    ),
                    text("Thanks!"),
                ),
            ],
        )
    )
    assert fake.last(CHAT).body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": json.dumps({"zone": "CET"})},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C\nsunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "Error: clock broken"},
        {"role": "user", "content": "Thanks!"},
    ]
    assert second.content[0].text == "Sunny; the clock is broken."


@pytest.mark.parametrize(
    ("choice", "expected_choice", "parallel"),
    [
        (pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO), "auto", None),
        (
            pb.ToolChoice(mode=pb.ToolChoice.MODE_ANY, disable_parallel_tool_use=True),
            "required",
            False,
        ),
        (pb.ToolChoice(mode=pb.ToolChoice.MODE_NONE), "none", None),
        (
            pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, tool_name="lookup"),
            {"type": "function", "function": {"name": "lookup"}},
            None,
        ),
    ],
    ids=["auto", "any-single", "none", "named"],
)
async def test_tool_choice_modes(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    choice: pb.ToolChoice,
    expected_choice: object,
    parallel: bool | None,
) -> None:
    await upstream_stub.Generate(
        ask("gpt-test", "hi", tools=[pb.Tool(name="lookup")], tool_choice=choice)
    )
    body = fake.last(CHAT).body
    assert body["tool_choice"] == expected_choice
    assert body.get("parallel_tool_calls") == parallel


async def test_cached_tokens_are_taken_out_of_prompt_tokens(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(
            usage=Usage(
                input_tokens=100,
                output_tokens=20,
                cache_read_input_tokens=1_000,
                cache_creation_input_tokens=200,
            )
        )
    )
    events, _ = await stream_all(upstream_stub, ask("gpt-test", "Hi"))
    check_event_stream(events)
    final = events[-2].message_delta
    # The fake sent prompt_tokens 1300, of which 1000 cached and 200 cache writes.
    assert final.usage == pb.Usage(
        input_tokens=100,
        output_tokens=20,
        cache_read_input_tokens=1_000,
        cache_creation_input_tokens=200,
    )
    assert (final.cost.input_nanos, final.cost.cache_read_nanos) == (300_000, 300_000)


@pytest.mark.parametrize(
    ("finish", "ours"),
    [
        ("stop", pb.STOP_REASON_END_TURN),
        ("length", pb.STOP_REASON_MAX_TOKENS),
        ("tool_calls", pb.STOP_REASON_TOOL_USE),
        ("content_filter", pb.STOP_REASON_CONTENT_FILTER),
    ],
)
async def test_finish_reasons(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, finish: str, ours: int
) -> None:
    fake.enqueue(Reply(stop_reason=finish))
    assert (await upstream_stub.Generate(ask("gpt-test", "Hi"))).stop_reason == ours


@pytest.mark.parametrize(
    ("budget", "effort"), [(1024, "low"), (8000, "medium"), (20000, "high"), (70000, "xhigh")]
)
async def test_thinking_budget_becomes_reasoning_effort(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, budget: int, effort: str
) -> None:
    req = ask(
        "gpt-6-sol", "Hi", max_tokens=100_000, thinking=pb.ThinkingConfig(budget_tokens=budget)
    )
    await upstream_stub.Generate(req)
    body = fake.last(CHAT).body
    assert body["reasoning_effort"] == effort
    assert body["model"] == "gpt-6-sol"


async def test_parameters_openai_lacks_are_refused(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask("gpt-test", "Hi", top_k=40))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"top_k"}

    image_result = ask("gpt-test", "Hi")
    image_result.messages.extend(
        [
            assistant(pb.ContentBlock(tool_use=pb.ToolUseBlock(id="call_a", name="snap"))),
            user(
                pb.ContentBlock(
                    tool_result=pb.ToolResultBlock(
                        tool_use_id="call_a",
                        content=[
                            pb.ContentBlock(image=pb.ImageBlock(data=PNG, media_type="image/png"))
                        ],
                    )
                )
            ),
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(image_result)
    assert set(field_violations(caught.value)) == {"messages[2].content[0].tool_result.content[0]"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the catalog's GPT-6: no sampling
        await upstream_stub.Generate(ask("gpt-6-sol", "Hi", temperature=0.5))
    assert set(field_violations(caught.value)) == {"temperature"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # not a reasoning model
        await upstream_stub.Generate(
            ask("llama-local", "Hi", thinking=pb.ThinkingConfig(budget_tokens=100))
        )
    assert set(field_violations(caught.value)) == {"thinking"}
    assert fake.requests == []


async def test_openai_compatible_server(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Thinking("First, the sum."), Text("4")]))
    req = ask("llama-local", "2+2?", max_tokens=64, top_k=40, temperature=0.2)
    events, _ = await stream_all(upstream_stub, req)
    check_event_stream(events)
    body = fake.last(CHAT).body
    assert body["top_k"] == 40
    assert body["max_tokens"] == 64
    assert "max_completion_tokens" not in body
    assert body["temperature"] == 0.2
    assert fake.last(CHAT).headers["authorization"] == "Bearer unused"
    folded = fold_stream(events)
    assert folded.provider == "local"
    assert folded.content[0].thinking.text == "First, the sum."
    assert folded.content[1].text == "4"


async def test_count_tokens_is_an_estimate(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    counted = await upstream_stub.CountTokens(
        pb.CountTokensRequest(model="gpt-test", messages=[user(text("Hello there, friend"))])
    )
    assert counted.estimated
    assert counted.input_tokens > 0
    assert fake.requests == []


async def test_unlisted_ids_route_by_prefix(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    for model in ("gpt-7-nova", "o4-deep", "chatgpt-6o-latest"):
        response = await upstream_stub.Generate(ask(model, "Hi"))
        assert (response.provider, response.model) == ("openai", model)
        assert fake.last(CHAT).body["model"] == model
        assert fake.last(CHAT).body["max_completion_tokens"] == 4_096
    listed = await upstream_stub.ListModels(pb.ListModelsRequest(provider="openai"))
    assert [m.id for m in listed.models] == ["gpt-test", "gpt-6-sol"]
    sol = listed.models[1]
    assert (sol.context_window, sol.max_output_tokens) == (1_050_000, 128_000)
    assert sol.pricing == pb.Pricing(
        input_per_mtok=2.0,
        output_per_mtok=10.0,
        cache_read_per_mtok=0.2,
        cache_creation_per_mtok=2.5,
    )


# A stream as a server may send it: a comment (keep-alive), the chunks, `[DONE]`,
# then bytes that are no chunk at all.
AFTER_DONE = (
    b": keep-alive\n\n"
    b'data: {"id":"c9","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n'
    b'data: {"id":"c9","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}'
    b"\n\n"
    b'data: {"id":"c9","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
    b"data: <html>not a chunk</html>\n\n"
)


async def test_a_stream_ends_at_done_as_the_sdk_stream_ends_it(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    # The stream is read from its bytes: a comment is skipped, and nothing after
    # `[DONE]` is read (as the SDK's stream reads it), so what follows is no error.
    fake.enqueue(Reply(raw_body=AFTER_DONE))
    events, _ = await stream_all(upstream_stub, ask("gpt-test", "Hi"))
    check_event_stream(events)
    texts = [e.content_block_delta.text for e in events if e.HasField("content_block_delta")]
    assert texts == ["Hel", "lo"]
    stop = [e.message_delta for e in events if e.HasField("message_delta")]
    assert stop[-1].usage.output_tokens == 2
    assert stop[-1].stop_reason == pb.STOP_REASON_END_TURN
