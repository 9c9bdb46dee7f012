"""The Anthropic Messages front door, driven by the official `anthropic` SDK.

Pass-through to an Anthropic deployment (the fake upstream's): the body and
`anthropic-*` headers the SDK sent reach the upstream unchanged, the
upstream's answer (JSON, SSE events, error bodies) reaches the SDK byte for
byte. Translation to the offline `echo` model and to an OpenAI deployment:
answers in Anthropic's exact grammar, tool calls and their results
included. Pings while an upstream is silent. Every stream is checked by
tests/anthropic_grammar.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest

from tests.anthropic_grammar import check_anthropic_stream
from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking, ToolCall, Usage, anthropic_wire
from tests.http_fixtures import SentLog, base_url, sdk_client, start_front_door
from tests.upstream_fixtures import ANTHROPIC_KEY

# A model whose upstream id is its own: the body goes upstream byte for byte.
SAME_NAME = "claude-sonnet-5-5"
SYSTEM = [
    {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
    {
        "type": "text",
        "text": "Answer in English.",
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
    },
]
BETAS = "interleaved-thinking-2025-05-14,context-management-2025-06-27"


def conversation(text: str = "Hello") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}},
            ],
        }
    ]


async def raw_post(url: str, body: dict[str, Any] | bytes, **headers: str) -> httpx2.Response:
    async with httpx2.AsyncClient() as client:
        return await client.post(
            f"{url}/v1/messages",
            content=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
                **headers,
            },
            timeout=30,
        )


# -- pass-through ----------------------------------------------------------------------


async def test_pass_through_forwards_the_sdk_bytes_and_headers_unchanged(
    url: str, fake: FakeUpstream
) -> None:
    sent = SentLog()
    client = sdk_client(url, sent)
    message = await client.messages.create(
        model=SAME_NAME,
        max_tokens=300,
        system=SYSTEM,
        messages=conversation(),
        extra_headers={"anthropic-beta": BETAS, "anthropic-future-header": "yes"},
        extra_body={
            "some_future_field": {"nested": [1, 2, 3]},
            "context_management": {"edits": []},
        },
    )
    received = fake.last("/v1/messages")
    assert received.raw == sent.last.content  # byte for byte
    assert received.headers["anthropic-beta"] == BETAS
    assert received.headers["anthropic-version"] == sent.last.headers["anthropic-version"]
    assert received.headers["anthropic-future-header"] == "yes"
    # The gateway's credential goes upstream, never the client's.
    assert received.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert "unused" not in str(received.headers)
    assert message.content[0].text == "Hello from the fake upstream."  # type: ignore[union-attr]


async def test_pass_through_renames_only_the_model_of_an_alias(
    url: str, fake: FakeUpstream
) -> None:
    sent = SentLog()
    await sdk_client(url, sent).messages.create(
        model="claude-test-latest", max_tokens=100, system=SYSTEM, messages=conversation()
    )
    forwarded = json.loads(fake.last("/v1/messages").raw)
    assert forwarded == {**json.loads(sent.last.content), "model": "claude-upstream-1"}
    # Written into the body as the client wrote it (no re-encoding of the rest).
    body = (
        b'{ "max_tokens" : 100,\n "messages": [{"role": "user",'
        b' "content": "caf\\u00e9 \xe2\x94\x80"}],'
        b'\n "temperature": 5e-1,\r\n "model":"claude-test-latest" }'
    )
    # A large body's members are found as it is parsed (FIND_MEMBERS_ABOVE_BYTES).
    large = body.replace(b"caf\\u00e9", b"caf\\u00e9 " * 20_000)
    for sent_body in (body, large):
        response = await raw_post(url, sent_body)
        assert response.status_code == 200
        renamed = sent_body.replace(b'"claude-test-latest"', b'"claude-upstream-1"')
        assert fake.last("/v1/messages").raw == renamed


async def test_pass_through_answer_is_the_upstreams_body_byte_for_byte(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Thinking("Let me think."), Text("Four.")], usage=Usage(10, 5, 3, 2))
    fake.enqueue(reply)
    response = await raw_post(
        url, {"model": SAME_NAME, "max_tokens": 50, "messages": conversation()}
    )
    assert response.status_code == 200
    assert response.content == json.dumps(anthropic_wire.message_body(reply, SAME_NAME)).encode()
    assert response.headers["request-id"]


async def test_pass_through_stream_is_relayed_event_by_event_byte_for_byte(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(
        blocks=[
            Thinking("Hmm."),
            Text("It is sunny."),
            ToolCall("toolu_1", "get_weather", {"city": "Oslo"}),
        ]
    )
    fake.enqueue(reply)
    body = {"model": SAME_NAME, "max_tokens": 50, "stream": True, "messages": conversation()}
    response = await raw_post(url, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b"".join(anthropic_wire.stream_events(reply, SAME_NAME))
    check_anthropic_stream(response.content)


async def test_sdk_stream_through_the_pass_through(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("One two three.")], usage=Usage(21, 9)))
    async with sdk_client(url).messages.stream(
        model=SAME_NAME, max_tokens=50, messages=conversation()
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "One two three."
    assert (final.usage.input_tokens, final.usage.output_tokens) == (21, 9)


@pytest.mark.parametrize("status", [400, 413, 429, 529])
async def test_pass_through_upstream_errors_reach_the_client_unchanged(
    url: str, fake: FakeUpstream, status: int
) -> None:
    reply = Reply(
        status=status,
        error_message="prompt is too long: 210000 tokens > 200000 maximum",
        headers={"retry-after": "7"},
    )
    fake.enqueue(reply)
    response = await raw_post(
        url, {"model": SAME_NAME, "max_tokens": 5, "messages": conversation()}
    )
    assert response.status_code == status
    assert response.content == json.dumps(anthropic_wire.error_body(reply, status)).encode()
    if status in (429, 529):
        assert response.headers["retry-after"] == "7"


async def test_pass_through_error_event_mid_stream_reaches_the_client(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("one two three four")], error_after=4)
    fake.enqueue(reply)
    body = {"model": SAME_NAME, "max_tokens": 50, "stream": True, "messages": conversation()}
    response = await raw_post(url, body)
    events = anthropic_wire.stream_events(reply, SAME_NAME)
    assert response.content == b"".join(events[:4]) + anthropic_wire.stream_error_event(reply)
    parsed = check_anthropic_stream(response.content)
    assert parsed[-1][0] == "error"


async def test_sdk_raises_its_own_error_classes(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(status=429, headers={"retry-after": "3"}))
    with pytest.raises(anthropic.RateLimitError) as raised:
        await sdk_client(url).messages.create(
            model=SAME_NAME, max_tokens=5, messages=conversation()
        )
    assert raised.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert raised.value.request_id


# -- translation -----------------------------------------------------------------------


async def test_translation_to_echo_streams_the_exact_grammar(url: str) -> None:
    body = {
        "model": "echo",
        "max_tokens": 50,
        "stream": True,
        "messages": conversation("what is the weather"),
    }
    response = await raw_post(url, body)
    events = check_anthropic_stream(response.content)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    delta = next(data for name, data in events if name == "message_delta")
    # A turn with a tool call ends tool_use, whatever the upstream said.
    assert delta["delta"]["stop_reason"] == "tool_use"
    tool = next(
        d["content_block"]
        for n, d in events
        if n == "content_block_start" and d["content_block"]["type"] == "tool_use"
    )
    assert tool["name"] == "get_weather"


async def test_translation_to_echo_with_the_sdk(url: str) -> None:
    client = sdk_client(url)
    message = await client.messages.create(
        model="echo", max_tokens=50, messages=conversation("hi there")
    )
    assert message.content[0].text == "hi there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    async with client.messages.stream(
        model="echo", max_tokens=50, messages=conversation("what weather")
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]


async def test_translation_to_openai_streams_a_tool_call_and_takes_its_result(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(
            blocks=[
                Text("Checking."),
                ToolCall("call_1", "get_weather", {"city": "Oslo"}, fragments=3),
            ]
        )
    )
    tools = [
        {
            "name": "get_weather",
            "description": "Weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    client = sdk_client(url)
    async with client.messages.stream(
        model="gpt-test", max_tokens=100, tools=tools, messages=conversation("weather in Oslo?")
    ) as stream:
        first = await stream.get_final_message()
    assert first.stop_reason == "tool_use"
    tool_use = first.content[-1]
    assert tool_use.type == "tool_use" and tool_use.input == {"city": "Oslo"}
    # The round trip: the tool's result goes back, translated for OpenAI.
    fake.enqueue(Reply(blocks=[Text("It is 5 C in Oslo.")]))
    second = await client.messages.create(
        model="gpt-test",
        max_tokens=100,
        tools=tools,
        messages=[
            *conversation("weather in Oslo?"),
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in first.content],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "5 C"}],
            },
        ],
    )
    assert second.content[0].text == "It is 5 C in Oslo."  # type: ignore[union-attr]
    sent = fake.last("/v1/chat/completions").body
    tool_message = next(m for m in sent["messages"] if m["role"] == "tool")
    assert tool_message["tool_call_id"] == tool_use.id
    assert sent["model"] == "gpt-upstream-1"


async def test_translation_refuses_fields_it_cannot_carry_naming_them(url: str) -> None:
    body = {
        "model": "echo",
        "max_tokens": 50,
        "messages": conversation(),
        "mcp_servers": [{"type": "url", "url": "https://example.com", "name": "x"}],
    }
    response = await raw_post(url, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "mcp_servers" in error["message"]


# -- pings -----------------------------------------------------------------------------


async def test_pings_keep_a_silent_pass_through_stream_alive(url: str, fake: FakeUpstream) -> None:
    reply = Reply(blocks=[Text("slow answer here")], event_delay_s=0.5)
    fake.enqueue(reply)
    body = {"model": SAME_NAME, "max_tokens": 50, "stream": True, "messages": conversation()}
    response = await raw_post(url, body)
    events = check_anthropic_stream(response.content)
    ours = response.content.count(b"event: ping") - 1  # the upstream sent one
    assert ours >= 3
    assert [n for n, _ in events if n != "ping"] == [
        n
        for n, _ in check_anthropic_stream(b"".join(anthropic_wire.stream_events(reply, SAME_NAME)))
        if n != "ping"
    ]


async def test_pings_before_a_translated_upstream_answers(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("finally")], delay_s=1.0))
    body = {"model": "gpt-test", "max_tokens": 50, "stream": True, "messages": conversation()}
    response = await raw_post(url, body)
    events = check_anthropic_stream(response.content)
    assert events[0][0] == "ping"
    assert sum(1 for n, _ in events if n == "ping") >= 3
    assert (
        "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
        == "finally"
    )


# -- fallbacks across wire formats -----------------------------------------------------

MIXED_ROUTE = {
    "retry": {"max_attempts": 1},
    "breaker": {"enabled": False},
    "routes": {
        "mixed": [
            {"provider": "anthropic", "model": SAME_NAME, "priority": 0},
            {"provider": "openai", "model": "gpt-test", "priority": 1},
        ]
    },
}


@pytest.mark.usefixtures("_openai_key_in_environment")
async def test_a_fallback_translates_when_nothing_would_be_lost(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gateway = await start_front_door(fake, tmp_path, routing=MIXED_ROUTE)
    try:
        fake.enqueue(Reply(status=529), Reply(blocks=[Text("from the fallback")]))
        body = {"model": "mixed", "max_tokens": 20, "stream": True, "messages": conversation()}
        response = await raw_post(base_url(gateway), body)
        events = check_anthropic_stream(response.content)
        text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
        assert text == "from the fallback"
        assert [r.path for r in fake.requests] == ["/v1/messages", "/v1/chat/completions"]
    finally:
        await gateway.aclose()


@pytest.mark.usefixtures("_openai_key_in_environment")
async def test_a_fallback_never_translates_what_it_would_lose(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gateway = await start_front_door(fake, tmp_path, routing=MIXED_ROUTE)
    try:
        reply = Reply(status=529)
        fake.enqueue(reply)
        body = {
            "model": "mixed",
            "max_tokens": 20,
            "messages": conversation(),
            "mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "x"}],
        }
        response = await raw_post(base_url(gateway), body)
        # Only the Anthropic deployment may serve it: its failure is the answer.
        assert response.status_code == 529
        assert response.content == json.dumps(anthropic_wire.error_body(reply, 529)).encode()
        assert [r.path for r in fake.requests] == ["/v1/messages"]
    finally:
        await gateway.aclose()
