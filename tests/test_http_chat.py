"""OpenAI's Chat Completions on the HTTP front door, driven by the official `openai` SDK.

Pass-through to OpenAI deployments (the fake upstream's): the body the SDK
sent reaches the upstream unchanged but for the model's upstream name (and a
stream's `stream_options.include_usage`, which the gateway always asks
for), the answer and its chunks come back byte for byte, the usage chunk
only when the client asked for it, upstream error bodies with their status.
Translation to an Anthropic deployment and to the offline `echo` model: text,
streamed tool calls and their results, images, limits, thinking, finish
reasons, usage. The gateway's own errors in OpenAI's shape, `GET /v1/models`
through both SDKs, ledger rows and a client that leaves mid-stream. Every
stream is checked by tests/openai_chat_grammar.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)

from server.auth.cli import create_key
from server.auth.keys import KeyStore
from server.config import load_config
from tests.conftest import RunningGateway
from tests.fake_upstream import (
    FakeUpstream,
    Reply,
    Text,
    Thinking,
    ToolCall,
    Usage,
    anthropic_wire,
    openai_wire,
)
from tests.http_fixtures import SentLog, base_url, start_front_door, without_pings
from tests.openai_chat_grammar import check_chat_stream
from tests.test_http_front_door import (
    INPUT_NANOS,
    KEY_SPECS,
    OUTPUT_NANOS,
    AuthedDoor,
    issue_token,
    key_client,
    ledger_row,
    rid,
)
from tests.upstream_fixtures import OPENAI_KEY

# gpt-test goes upstream as gpt-upstream-1; gpt-6-sol's upstream id is its own,
# so its bodies compare byte for byte.
ALIASED, UPSTREAM_NAME = "gpt-test", "gpt-upstream-1"
SAME_NAME = "gpt-6-sol"
CHAT_PATH = "/v1/chat/completions"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# The fake's usage, and what OpenAI's shape makes of it.
CACHED_USAGE = Usage(
    input_tokens=10, output_tokens=5, cache_read_input_tokens=30, cache_creation_input_tokens=4
)
CACHE_READ_NANOS, CACHE_WRITE_NANOS = 300, 3_750  # claude-test's and gpt-test's prices
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR fake image bytes"


# -- clients ----------------------------------------------------------------------------


class _Tee(httpx2.AsyncByteStream):
    """A response body that keeps a copy of every byte it yields."""

    def __init__(self, inner: httpx2.AsyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._sink.extend(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class Received(httpx2.AsyncBaseTransport):
    """A transport that records the bytes of every answer, as the SDK read them."""

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self.bodies: list[bytearray] = []

    @property
    def last(self) -> bytes:
        return bytes(self.bodies[-1])

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        sink = bytearray()
        self.bodies.append(sink)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tee(response.stream, sink),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def openai_client(
    url: str,
    sent: SentLog | None = None,
    api_key: str = "unused",
    received: Received | None = None,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """The official SDK pointed at the front door (no retries: tests see each answer);
    `sent` records the requests' bytes, `received` the answers'."""
    hooks = {"request": [sent.hook]} if sent is not None else {}
    http = httpx2.AsyncClient(event_hooks=hooks, transport=received)
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=api_key, max_retries=0, http_client=http, **kwargs
    )


async def chat_post(url: str, body: dict[str, Any] | bytes, **headers: str) -> httpx2.Response:
    """A raw POST /v1/chat/completions, as an OpenAI client sends it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient() as client:
        return await client.post(
            url + CHAT_PATH,
            content=content,
            headers={"content-type": "application/json", **headers},
            timeout=30,
        )


def chat_body(model: str = "echo", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **fields}


def openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    """Checks an answer is an error in OpenAI's shape; returns its `error` object."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert set(document) == {"error"}, document
    error: dict[str, Any] = document["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def without_usage_chunk(events: list[bytes]) -> list[bytes]:
    """A fake stream rendered with include_usage, as a client that did not ask sees it."""
    return [e for e in events if b'"choices": []' not in e]


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def finish_of(chunks: list[dict[str, Any]]) -> str:
    [reason] = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c.get("choices") and c["choices"][0]["finish_reason"]
    ]
    return str(reason)


def usage_of(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    [usage] = [c["usage"] for c in chunks if "choices" in c and not c["choices"]]
    assert isinstance(usage, dict)
    return usage


def tool_deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        call
        for c in chunks
        if c.get("choices")
        for call in c["choices"][0]["delta"].get("tool_calls") or []
    ]


def anthropic_request(fake: FakeUpstream) -> dict[str, Any]:
    body = fake.last("/v1/messages").body
    assert isinstance(body, dict)
    return body


# -- pass-through to OpenAI deployments -------------------------------------------------


async def test_pass_through_forwards_the_sdk_body_renaming_only_the_model(
    url: str, fake: FakeUpstream
) -> None:
    sent = SentLog()
    reply = Reply(blocks=[Text("Four.")], usage=Usage(11, 3))
    fake.enqueue(reply)
    completion = await openai_client(url, sent).chat.completions.create(
        model=ALIASED,
        messages=[{"role": "developer", "content": "Be terse."}, *HELLO],
        max_completion_tokens=64,
        temperature=0.3,
        seed=7,
        logit_bias={"1234": -100},
        extra_body={"some_future_field": {"nested": [1, 2, 3]}, "top_k": 4},
    )
    forwarded = fake.last(CHAT_PATH)
    assert json.loads(forwarded.raw) == {**json.loads(sent.last.content), "model": UPSTREAM_NAME}
    assert forwarded.body["some_future_field"] == {"nested": [1, 2, 3]}
    # The gateway's credential goes upstream, never the client's.
    assert forwarded.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "unused" not in str(forwarded.headers)
    assert completion.choices[0].message.content == "Four."
    assert completion.id == reply.message_id and completion.model == UPSTREAM_NAME


async def test_pass_through_of_a_model_named_as_upstream_is_byte_for_byte(
    url: str, fake: FakeUpstream
) -> None:
    sent, received = SentLog(), Received()
    reply = Reply(
        blocks=[Text("Checking."), ToolCall("call_1", "get_weather", {"city": "Oslo"})],
        usage=CACHED_USAGE,
    )
    fake.enqueue(reply)
    client = openai_client(url, sent, received=received, organization="org-client")
    completion = await client.chat.completions.create(
        model=SAME_NAME,
        messages=HELLO,
        tools=[WEATHER_TOOL],
        response_format={"type": "json_object"},
        extra_headers={"openai-beta": "assistants=v2"},
        extra_body={"unknown_field": True},
    )
    forwarded = fake.last(CHAT_PATH)
    assert forwarded.raw == sent.last.content  # byte for byte
    assert forwarded.headers["openai-beta"] == "assistants=v2"
    # The organisation bills the call: the gateway's, not the client's.
    assert forwarded.headers.get("openai-organization") != "org-client"
    assert received.last == json.dumps(openai_wire.completion_body(reply, SAME_NAME)).encode()
    call = completion.choices[0].message.tool_calls
    assert call is not None and call[0].id == "call_1"
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 30
    # Bytes no re-encoding would give back (indents, escapes, key order) go up as they came.
    body = chat_body(
        SAME_NAME,
        messages=[{"role": "user", "content": "Caf\u00e9 \U0001f600?"}],
        stream=True,
        stream_options={"include_usage": True},
        extra={"b": 1, "a": [1.0, 2e3]},
    )
    raw = json.dumps(body, indent=2, ensure_ascii=True).encode() + b"\n"
    response = await chat_post(url, raw)
    assert response.status_code == 200, response.text
    check_chat_stream(response.content, include_usage=True)
    assert fake.last(CHAT_PATH).raw == raw


async def test_pass_through_sends_n_as_the_client_gave_it(url: str, fake: FakeUpstream) -> None:
    """`n` > 1 is refused only where it cannot be served: by translation."""
    sent = SentLog()
    await openai_client(url, sent).chat.completions.create(model=SAME_NAME, messages=HELLO, n=2)
    forwarded = fake.last(CHAT_PATH)
    assert forwarded.raw == sent.last.content
    assert forwarded.body["n"] == 2


async def test_pass_through_stream_asks_for_usage_but_the_client_gets_none_unasked(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    reply = Reply(
        blocks=[Text("One two three."), ToolCall("call_9", "get_weather", {"city": "Rome"})],
        usage=CACHED_USAGE,
    )
    fake.enqueue(reply)
    received, call_id = Received(), rid("relay-stream")
    stream = await openai_client(url, received=received).chat.completions.create(
        model=SAME_NAME,
        messages=HELLO,
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_obfuscation": False},
        extra_headers={"x-request-id": call_id},
    )
    chunks: list[ChatCompletionChunk] = [chunk async for chunk in stream]
    forwarded = fake.last(CHAT_PATH)
    assert forwarded.body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    check_chat_stream(received.last, include_usage=False)
    # Otherwise the upstream's chunks, byte for byte.
    events = openai_wire.stream_events(reply, SAME_NAME, include_usage=True)
    assert without_pings(received.last) == b"".join(without_usage_chunk(events))
    # The gateway billed from the usage chunk the client did not see.
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["method"], row["provider"]) == (
        "OK",
        "openai.chat_completions",
        "openai",
    )
    assert (row["input_tokens"], row["output_tokens"]) == (10, 5)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (30, 4)
    assert row["usage_estimated"] == 0


async def test_pass_through_stream_with_include_usage_relays_the_usage_chunk(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("Hi there.")], usage=CACHED_USAGE)
    fake.enqueue(reply)
    sent, received = SentLog(), Received()
    stream = await openai_client(url, sent, received=received).chat.completions.create(
        model=SAME_NAME, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert fake.last(CHAT_PATH).raw == sent.last.content  # nothing to change
    parsed = check_chat_stream(received.last, include_usage=True)
    events = openai_wire.stream_events(reply, SAME_NAME, include_usage=True)
    assert without_pings(received.last) == b"".join(events)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 44 and chunks[-1].usage.completion_tokens == 5
    assert usage_of(parsed)["prompt_tokens_details"]["cached_tokens"] == 30


async def test_pass_through_stream_of_an_alias_renames_the_model(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("Renamed.")])
    fake.enqueue(reply)
    sent, received = SentLog(), Received()
    async with openai_client(url, sent, received=received).chat.completions.stream(
        model=ALIASED, messages=HELLO
    ) as stream:
        final = await stream.get_final_completion()
    asked = json.loads(sent.last.content)
    assert fake.last(CHAT_PATH).body == {
        **asked,
        "model": UPSTREAM_NAME,
        "stream_options": {"include_usage": True},
    }
    check_chat_stream(received.last, include_usage=False)
    events = openai_wire.stream_events(reply, UPSTREAM_NAME, include_usage=True)
    assert without_pings(received.last) == b"".join(without_usage_chunk(events))
    assert final.choices[0].message.content == "Renamed."


async def test_pass_through_writes_what_it_sets_into_the_clients_bytes(
    url: str, fake: FakeUpstream
) -> None:
    """An alias's model and the usage the gateway asks for are written into the
    body as the client wrote it: its spacing, escapes and number forms kept."""
    fake.enqueue(Reply(blocks=[Text("Kept.")]))
    body = (
        b'{\n  "messages" : [{"role": "user",\n'
        b'   "content": "Gr\\u00fc\\u00dfe \xe6\x97\xa5 a\\/b"}],\n'
        b'  "temperature": 1E0, "model": "gpt-test",\t"stream": true,\n'
        b'  "metadata": {"model": "not this one"}\n}\n'
    )
    response = await chat_post(url, body)
    assert response.status_code == 200
    expected = b'{"stream_options":{"include_usage":true},' + body[1:].replace(
        b'"model": "gpt-test"', b'"model": "gpt-upstream-1"'
    )
    assert fake.last(CHAT_PATH).raw == expected


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_pass_through_upstream_errors_reach_the_client_unchanged(
    url: str,
    fake: FakeUpstream,
    status: int,
    error_class: type[openai.APIStatusError],
    streaming: bool,
) -> None:
    reply = Reply(
        status=status,
        error_message="This model's maximum context length is 128000 tokens.",
        error_param="messages" if status == 400 else None,
        error_code="context_length_exceeded" if status == 400 else None,
        headers={"retry-after": "7"} if status == 429 else {},
    )
    for _ in range(2):
        fake.enqueue(reply)
    response = await chat_post(url, chat_body(SAME_NAME, stream=streaming))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == json.dumps(openai_wire.error_body(reply, status)).encode()
    if status == 429:
        assert response.headers["retry-after"] == "7"
    with pytest.raises(error_class) as raised:
        if streaming:
            stream = await openai_client(url).chat.completions.create(
                model=SAME_NAME, messages=HELLO, stream=True
            )
            [_ async for _ in stream]
        else:
            await openai_client(url).chat.completions.create(model=SAME_NAME, messages=HELLO)
    assert raised.value.status_code == status
    assert raised.value.body == openai_wire.error_body(reply, status)["error"]
    if status == 400:
        assert (raised.value.code, raised.value.param) == ("context_length_exceeded", "messages")


async def test_pass_through_error_chunk_mid_stream_reaches_the_client(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("one two three four")], error_after=3)
    fake.enqueue(reply)
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model=SAME_NAME, messages=HELLO, stream=True
    )
    texts: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "one two "
    assert raised.value.message == "The server had an error while processing your request."
    events = openai_wire.stream_events(reply, SAME_NAME, include_usage=True)
    assert without_pings(received.last) == b"".join(events[:3]) + openai_wire.stream_error_event(
        reply
    )
    assert "error" in check_chat_stream(received.last, include_usage=False)[-1]


async def test_pings_keep_a_silent_pass_through_stream_alive(url: str, fake: FakeUpstream) -> None:
    reply = Reply(blocks=[Text("slow answer")], delay_s=0.7)
    fake.enqueue(reply)
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model=SAME_NAME, messages=HELLO, stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "slow answer"
    assert received.last.startswith(b": ping\n\n")  # an SSE comment, every parser skips it
    events = openai_wire.stream_events(reply, SAME_NAME, include_usage=True)
    assert without_pings(received.last) == b"".join(without_usage_chunk(events))
    check_chat_stream(received.last, include_usage=False)


# -- translation to an Anthropic deployment and to the offline model --------------------


async def test_translation_to_claude_sends_a_messages_request(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("Bonjour.")], usage=CACHED_USAGE))
    completion = await openai_client(url).chat.completions.create(
        model="claude-test",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello in French."},
        ],
        max_completion_tokens=300,
        temperature=0.5,
        stop=["\n\n"],
        user="end-user-7",
    )
    sent = anthropic_request(fake)
    assert sent["model"] == "claude-upstream-1"
    assert sent["max_tokens"] == 300
    assert sent["temperature"] == 0.5
    assert sent["stop_sequences"] == ["\n\n"]
    assert [b["text"] for b in sent["system"]] == ["You are terse."]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello in French."}]}
    ]
    assert "stream_options" not in sent and "user" not in sent
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "Bonjour.")
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    # OpenAI's prompt_tokens counts cached and cache-written tokens too.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (44, 5, 49)
    assert usage.prompt_tokens_details.cached_tokens == 30


async def test_translated_max_tokens_is_the_clients_or_the_models_default(
    url: str, fake: FakeUpstream
) -> None:
    client = openai_client(url)
    await client.chat.completions.create(model="claude-test", messages=HELLO, max_tokens=77)
    assert anthropic_request(fake)["max_tokens"] == 77
    await client.chat.completions.create(
        model="claude-test", messages=HELLO, max_tokens=77, max_completion_tokens=88
    )
    assert anthropic_request(fake)["max_tokens"] == 88
    await client.chat.completions.create(model="claude-test", messages=HELLO)
    assert anthropic_request(fake)["max_tokens"] == 1_024  # claude-test's default_max_tokens


async def test_translated_stream_with_usage(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("One two three.")], usage=CACHED_USAGE))
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model="claude-test",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    sdk_chunks = [chunk async for chunk in stream]
    chunks = check_chat_stream(received.last, include_usage=True)
    assert received.last.endswith(b"data: [DONE]\n\n")
    assert text_of(chunks) == "One two three."
    assert finish_of(chunks) == "stop"
    usage = usage_of(chunks)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        44,
        5,
        49,
    )
    assert usage["prompt_tokens_details"]["cached_tokens"] == 30
    assert sdk_chunks[0].id.startswith("chatcmpl-") and sdk_chunks[0].model == "claude-test"
    assert anthropic_request(fake)["stream"] is True


async def test_translated_stream_without_usage_has_no_usage_chunk(url: str) -> None:
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model="echo", messages=HELLO, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    parsed = check_chat_stream(received.last, include_usage=False)
    assert text_of(parsed) == "hello there"
    assert b'"usage"' not in received.last


async def test_translation_streams_a_tool_call_and_takes_its_result_to_claude(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(
            blocks=[
                Text("Checking."),
                ToolCall("toolu_01", "get_weather", {"city": "Oslo"}, fragments=3),
            ]
        )
    )
    received = Received()
    client = openai_client(url, received=received)
    question: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Oslo?"}]
    async with client.chat.completions.stream(
        model="claude-test", messages=question, tools=[WEATHER_TOOL], tool_choice="auto"
    ) as stream:
        first = await stream.get_final_completion()
    chunks = check_chat_stream(received.last, include_usage=False)
    deltas = tool_deltas(chunks)
    assert deltas[0] == {
        "index": 0,
        "id": "toolu_01",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert len(deltas) == 4  # the head, then three argument fragments
    assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city":"Oslo"}'
    assert finish_of(chunks) == "tool_calls"
    sent = anthropic_request(fake)
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "auto"}
    # The round trip: the assistant's call and the tool's result go back.
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.arguments == '{"city":"Oslo"}'
    fake.enqueue(Reply(blocks=[Text("It is 5 C in Oslo.")]))
    second = await client.chat.completions.create(
        model="claude-test",
        tools=[WEATHER_TOOL],
        messages=[
            *question,
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "5 C"},
            {"role": "user", "content": "And tomorrow?"},
        ],
    )
    assert second.choices[0].message.content == "It is 5 C in Oslo."
    assert anthropic_request(fake)["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "5 C"}],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


async def test_translation_to_echo_streams_a_tool_call_and_takes_its_result(url: str) -> None:
    received = Received()
    client = openai_client(url, received=received)
    question: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "what is the weather"}
    ]
    stream = await client.chat.completions.create(
        model="echo", messages=question, tools=[WEATHER_TOOL], stream=True
    )
    [_ async for _ in stream]
    chunks = check_chat_stream(received.last, include_usage=False)
    assert text_of(chunks) == "Let me check."
    [head, *fragments] = tool_deltas(chunks)
    assert (head["index"], head["type"], head["function"]["name"]) == (0, "function", "get_weather")
    assert head["id"].startswith("toolu_")
    arguments = head["function"]["arguments"] + "".join(
        f["function"]["arguments"] for f in fragments
    )
    assert json.loads(arguments) == {"city": "Paris"}
    assert finish_of(chunks) == "tool_calls"
    completion = await client.chat.completions.create(
        model="echo",
        messages=[
            *question,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": head["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": head["id"], "content": "sunny, 21 C"},
        ],
    )
    # echo answers with the last user turn's text: the tool's result.
    assert completion.choices[0].message.content == "sunny, 21 C"
    assert completion.choices[0].finish_reason == "stop"


async def test_translation_to_echo_of_a_whole_answer(url: str) -> None:
    completion = await openai_client(url).chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "what is the weather"}]
    )
    [choice] = completion.choices
    assert choice.message.content == "Let me check."
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and calls[0].type == "function"
    assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert completion.usage is not None and completion.usage.completion_tokens > 0


async def test_an_image_url_part_becomes_an_anthropic_image_block(
    url: str, fake: FakeUpstream
) -> None:
    data = base64.b64encode(PNG).decode()
    await openai_client(url).chat.completions.create(
        model="claude-test",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ],
    )
    assert anthropic_request(fake)["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_a_bad_image_url_is_a_400_naming_the_part(url: str, fake: FakeUpstream) -> None:
    body = chat_body(
        "claude-test",
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}],
            }
        ],
    )
    error = openai_error(await chat_post(url, body), 400)
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert not fake.requests


async def test_reasoning_effort_is_a_thinking_budget(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Thinking("Let me think."), Text("Four.")]))
    response = await chat_post(
        url,
        chat_body("claude-test", reasoning_effort="low", max_completion_tokens=4096),
    )
    assert response.status_code == 200, response.text
    sent = anthropic_request(fake)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent["max_tokens"] == 4096
    message = response.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Four.", "Let me think.")
    # "none" asks for no thinking.
    await openai_client(url).chat.completions.create(
        model="claude-test", messages=HELLO, reasoning_effort="none"
    )
    assert "thinking" not in anthropic_request(fake)


@pytest.mark.parametrize("model", ["claude-test", "echo"])
async def test_n_above_one_is_refused_by_translation(
    url: str, fake: FakeUpstream, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client(url).chat.completions.create(model=model, messages=HELLO, n=2)
    assert refused.value.param == "n"
    assert "n" in refused.value.message
    assert not fake.requests


@pytest.mark.parametrize("model", [SAME_NAME, "claude-test"])
async def test_priority_processing_is_refused_as_unpriced(
    url: str, fake: FakeUpstream, model: str
) -> None:
    # OpenAI bills it at its own, higher price, which the gateway would not
    # charge: relayed or translated, the call is refused before any upstream.
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client(url).chat.completions.create(
            model=model, messages=HELLO, service_tier="priority"
        )
    assert refused.value.param == "service_tier"
    assert not fake.requests
    fake.enqueue(Reply(blocks=[Text("Fine.")]))
    done = await openai_client(url).chat.completions.create(
        model=model, messages=HELLO, service_tier="default"
    )
    assert done.choices[0].message.content == "Fine."


@pytest.mark.parametrize(
    ("stop_reason", "blocks", "expected"),
    [
        ("end_turn", [Text("Done.")], "stop"),
        ("stop_sequence", [Text("Done")], "stop"),
        ("max_tokens", [Text("Cut sh")], "length"),
        (
            None,
            [Text("Calling."), ToolCall("toolu_7", "get_weather", {"city": "Rome"})],
            "tool_calls",
        ),
        ("refusal", [Text("I cannot.")], "content_filter"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_finish_reasons_of_a_translated_answer(
    url: str,
    fake: FakeUpstream,
    stop_reason: str | None,
    blocks: list[Text | ToolCall],
    expected: str,
    streaming: bool,
) -> None:
    fake.enqueue(Reply(blocks=list(blocks), stop_reason=stop_reason, stop_sequence="\n"))
    body = chat_body("claude-test", tools=[WEATHER_TOOL], stream=streaming)
    response = await chat_post(url, body)
    assert response.status_code == 200, response.text
    if streaming:
        assert finish_of(check_chat_stream(response.content, include_usage=False)) == expected
    else:
        assert response.json()["choices"][0]["finish_reason"] == expected


async def test_echo_cut_short_by_max_tokens_finishes_with_length(url: str) -> None:
    words = " ".join(f"word{i}" for i in range(40))
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": words}],
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    [_ async for _ in stream]
    chunks = check_chat_stream(received.last, include_usage=True)
    assert finish_of(chunks) == "length"
    assert usage_of(chunks)["completion_tokens"] <= 3


async def test_response_format_json_schema_is_refused_by_translation(
    url: str, fake: FakeUpstream
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client(url).chat.completions.create(
            model="claude-test", messages=HELLO, response_format=response_format
        )
    assert refused.value.param == "response_format"
    assert "response_format" in refused.value.message
    assert not fake.requests
    # An OpenAI deployment serves it: the body goes upstream as it came.
    await openai_client(url).chat.completions.create(
        model=ALIASED, messages=HELLO, response_format=response_format
    )
    assert fake.last(CHAT_PATH).body["response_format"] == response_format


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
async def test_tool_choice_is_translated(
    url: str, fake: FakeUpstream, tool_choice: Any, parallel: bool | None, expected: Any
) -> None:
    body = chat_body("claude-test", tools=[WEATHER_TOOL], tool_choice=tool_choice)
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    response = await chat_post(url, body)
    assert response.status_code == 200, response.text
    assert anthropic_request(fake)["tool_choice"] == expected


async def test_translation_refuses_what_it_would_lose_and_drops_mere_hints(
    url: str, fake: FakeUpstream
) -> None:
    body = chat_body("claude-test", logit_bias={"1234": -100}, top_k=4, frequency_penalty=0.5)
    error = openai_error(await chat_post(url, body), 400)
    for field in ("logit_bias", "top_k", "frequency_penalty"):
        assert field in error["message"]
    assert not fake.requests
    # Hints about how OpenAI stores or serves a call change nothing in the answer.
    hints = chat_body("claude-test", store=False, seed=3, metadata={"a": "b"}, frequency_penalty=0)
    response = await chat_post(url, hints)
    assert response.status_code == 200, response.text
    sent = anthropic_request(fake)
    assert not {"store", "seed", "frequency_penalty"} & set(sent)
    assert "metadata" not in sent or sent["metadata"] != {"a": "b"}


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (429, openai.RateLimitError, "rate_limit_error"),
        (529, openai.InternalServerError, "server_error"),
    ],
)
async def test_a_translated_upstreams_errors_are_in_openais_shape(
    url: str,
    fake: FakeUpstream,
    status: int,
    error_class: type[openai.APIStatusError],
    error_type: str,
) -> None:
    reply = Reply(status=status, headers={"retry-after": "7"})
    fake.enqueue(reply, reply)
    response = await chat_post(url, chat_body("claude-test", stream=True))
    # Not the Anthropic body: the client speaks OpenAI's format.
    error = openai_error(response, status)
    assert error["type"] == error_type
    if status in (429, 529):
        assert response.headers["retry-after"] == "7"
    with pytest.raises(error_class) as raised:
        await openai_client(url).chat.completions.create(model="claude-test", messages=HELLO)
    assert raised.value.status_code == status


async def test_a_translated_stream_failing_mid_way_ends_with_an_error_chunk(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("one two three four")], error_after=4)
    fake.enqueue(reply)
    received = Received()
    stream = await openai_client(url, received=received).chat.completions.create(
        model="claude-test", messages=HELLO, stream=True
    )
    texts: list[str] = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "one "  # the events before the upstream's error
    chunks = check_chat_stream(received.last, include_usage=False)
    error = chunks[-1]["error"]
    assert error["type"] == "server_error" and error["message"] == raised.value.message
    assert b"event:" not in received.last
    assert anthropic_wire.stream_error_event(reply) not in received.last


# -- the gateway's own errors, in OpenAI's shape ----------------------------------------


async def test_malformed_json_is_a_400(url: str) -> None:
    error = openai_error(await chat_post(url, b'{"model": "echo", "messages": '), 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    error = openai_error(await chat_post(url, b"[1, 2]"), 400)
    assert "object" in error["message"]


async def test_a_wrong_content_type_is_a_400(url: str) -> None:
    response = await chat_post(url, chat_body(), **{"content-type": "text/plain"})
    assert "content-type" in openai_error(response, 400)["message"]


async def test_missing_model_and_messages_are_one_400_naming_both(url: str) -> None:
    response = await chat_post(url, {"temperature": 9})
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    for field in ("model", "messages", "temperature"):
        assert field in error["message"]
    with pytest.raises(openai.BadRequestError):
        await openai_client(url).chat.completions.create(model="", messages=HELLO)


async def test_an_unknown_model_is_a_404_model_not_found(url: str, fake: FakeUpstream) -> None:
    error = openai_error(await chat_post(url, chat_body("no-such-model")), 404)
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert "no-such-model" in error["message"]
    with pytest.raises(openai.NotFoundError) as unknown:
        await openai_client(url).chat.completions.create(model="no-such-model", messages=HELLO)
    assert unknown.value.code == "model_not_found"
    assert not fake.requests


async def test_an_unknown_path_is_a_404_in_openais_shape(url: str) -> None:
    async with httpx2.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.post("/v1/completions", json={"model": "echo", "prompt": "x"})
    assert "/v1/completions" in openai_error(response, 404)["message"]


async def test_every_answer_carries_the_request_id_the_openai_sdk_reads(
    url: str, fake: FakeUpstream
) -> None:
    """The openai SDK reads `x-request-id` (`_request_id`, APIStatusError.request_id)."""
    client = openai_client(url)
    for model in ("echo", "claude-test", SAME_NAME):
        call_id = rid("chat-id")
        completion = await client.chat.completions.create(
            model=model, messages=HELLO, extra_headers={"x-request-id": call_id}
        )
        assert completion._request_id == call_id, model
    call_id = rid("chat-id")
    stream = await client.chat.completions.create(
        model="claude-test", messages=HELLO, stream=True, extra_headers={"x-request-id": call_id}
    )
    assert stream.response.headers.get("x-request-id") == call_id
    await stream.close()
    response = await chat_post(url, chat_body(), **{"content-type": "text/plain"})
    openai_error(response, 400)
    assert response.headers.get("x-request-id") == response.headers["request-id"]


@pytest.fixture(scope="module")
async def small_chat_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    """A 1 KiB body limit, and a daily budget of 1,000 nanodollars (echo is free)."""
    limits = {"http.max_body_bytes": 1024, "budgets.default.daily_usd": 1e-6}
    gateway = await start_front_door(fake_upstream, tmp_path_factory.mktemp("chat-small"), **limits)
    yield base_url(gateway)
    await gateway.aclose()


async def test_a_body_over_the_limit_is_a_413(small_chat_door: str) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
    error = openai_error(await chat_post(small_chat_door, big), 413)
    assert error["code"] == "request_too_large"
    assert (await chat_post(small_chat_door, chat_body())).status_code == 200


async def test_an_exhausted_budget_is_a_429_not_worth_retrying(
    small_chat_door: str, fake: FakeUpstream
) -> None:
    with pytest.raises(openai.RateLimitError) as refused:
        await openai_client(small_chat_door).chat.completions.create(
            model="claude-test", messages=HELLO, max_completion_tokens=100
        )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" in refused.value.response.headers
    assert refused.value.code == "insufficient_quota"
    assert "budget" in refused.value.message
    assert not fake.requests  # refused before any upstream call


# -- keys and tokens ----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def authed_chat_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AuthedDoor]:
    """The front door with authentication on and the keys of test_http_front_door.py."""
    directory = tmp_path_factory.mktemp("chat-auth")
    auth = {
        "auth.enabled": True,
        "auth.key_store": str(directory / "keys.sqlite3"),
        "auth.secret_file": str(directory / "key-secret"),
        "auth.signing_keys_dir": str(directory / "signing-keys"),
    }
    config = load_config(environ={}, overrides={"server.host": "127.0.0.1", **auth}).auth
    keys, key_ids = {}, {}
    for name, spec in KEY_SPECS.items():
        record, keys[name] = create_key(config, name=name, **spec)
        key_ids[name] = record.id
    assert KeyStore(config.key_store).revoke(key_ids["revoked"])
    gateway = await start_front_door(fake_upstream, directory, **auth)
    yield AuthedDoor(gateway, base_url(gateway), keys, key_ids)
    await gateway.aclose()


async def test_a_key_or_a_token_as_the_bearer(authed_chat_door: AuthedDoor) -> None:
    door = authed_chat_door
    sent = SentLog()
    key = door.keys["full"]
    completion = await openai_client(door.url, sent, api_key=key).chat.completions.create(
        model="echo", messages=HELLO
    )
    assert completion.choices[0].message.content == "hello there"
    assert sent.last.headers["authorization"] == f"Bearer {key}"
    token = await issue_token(door, key)
    stream = await openai_client(door.url, api_key=token).chat.completions.create(
        model="echo", messages=HELLO, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "hello there"


async def test_every_credential_failure_is_the_same_401(authed_chat_door: AuthedDoor) -> None:
    door = authed_chat_door
    full, echo_only = door.keys["full"], door.keys["echo_only"]
    token = await issue_token(door, full)
    failures: dict[str, dict[str, str]] = {
        "missing": {},
        "not a key": {"authorization": "Bearer not-a-gateway-key"},
        "wrong secret": {
            "authorization": "Bearer " + full[:-4] + ("0000" if full[-4:] != "0000" else "1111")
        },
        "revoked": {"authorization": f"Bearer {door.keys['revoked']}"},
        "not bearer": {"authorization": f"Basic {full}"},
        "two keys": {"x-api-key": full, "authorization": f"Bearer {echo_only}"},
        "forged token": {"authorization": f"Bearer {token[:-6]}AAAAAA"},
    }
    messages = set()
    for name, headers in failures.items():
        error = openai_error(await chat_post(door.url, chat_body(), **headers), 401)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key"), name
        messages.add(error["message"])
    assert len(messages) == 1, messages
    for credential in ("llmgw_000000000000_nope", door.keys["revoked"]):
        with pytest.raises(openai.AuthenticationError) as refused:
            await openai_client(door.url, api_key=credential).chat.completions.create(
                model="echo", messages=HELLO
            )
        assert refused.value.status_code == 401 and refused.value.message
        assert refused.value.code == "invalid_api_key"


async def test_a_model_outside_the_keys_allow_list_is_a_403(authed_chat_door: AuthedDoor) -> None:
    client = openai_client(authed_chat_door.url, api_key=authed_chat_door.keys["echo_only"])
    assert (await client.chat.completions.create(model="echo", messages=HELLO)).choices
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="claude-test", messages=HELLO)
    assert refused.value.type == "permission_error"
    assert "claude-test" in refused.value.message
    admin_only = openai_client(authed_chat_door.url, api_key=authed_chat_door.keys["admin_only"])
    with pytest.raises(openai.PermissionDeniedError):
        await admin_only.chat.completions.create(model="echo", messages=HELLO)


async def test_a_keys_requests_per_minute_limit_is_a_429_recorded_in_the_ledger(
    authed_chat_door: AuthedDoor,
) -> None:
    client = openai_client(authed_chat_door.url, api_key=authed_chat_door.keys["two_per_minute"])
    for _ in range(2):
        await client.chat.completions.create(model="echo", messages=HELLO)
    refused_id = rid("chat-rpm")
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model="echo", messages=HELLO, extra_headers={"x-request-id": refused_id}
        )
    headers = refused.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 61
    assert headers.get("x-should-retry") != "false"  # retrying later helps
    assert (refused.value.type, refused.value.code) == ("rate_limit_error", "rate_limit_exceeded")
    row = await ledger_row(authed_chat_door.gateway, refused_id)
    assert (row["status"], row["edge"], row["method"]) == (
        "RESOURCE_EXHAUSTED",
        "http",
        "openai.chat_completions",
    )
    assert row["key_id"] == authed_chat_door.key_ids["two_per_minute"]
    assert row["output_tokens"] == 0 and row["cost_nanos"] == 0


# -- GET /v1/models: one endpoint, both SDKs ----------------------------------------------


async def test_models_list_through_both_sdks_is_filtered_by_the_key(
    authed_chat_door: AuthedDoor,
) -> None:
    door = authed_chat_door
    full = openai_client(door.url, api_key=door.keys["full"])
    listed = [model async for model in full.models.list()]
    ids = [m.id for m in listed]
    assert {"echo", "claude-test", ALIASED, SAME_NAME, "llama-local"} <= set(ids)
    assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by for m in listed)
    assert next(m for m in listed if m.id == "claude-test").owned_by == "anthropic"
    echo = await full.models.retrieve("echo")
    assert (echo.id, echo.object) == ("echo", "model")
    # The anthropic SDK reads the same answer from the same path.
    anthropic_listed = await key_client(door.url, door.keys["full"]).models.list()
    assert [m.id for m in anthropic_listed.data] == ids
    assert all(m.type == "model" and m.display_name for m in anthropic_listed.data)
    # A key with an allow-list sees only its models, whichever SDK asks.
    echo_only = openai_client(door.url, api_key=door.keys["echo_only"])
    assert [m.id async for m in echo_only.models.list()] == ["echo"]
    anthropic_echo_only = key_client(door.url, door.keys["echo_only"])
    assert [m.id for m in (await anthropic_echo_only.models.list()).data] == ["echo"]
    with pytest.raises(openai.NotFoundError):
        await echo_only.models.retrieve("claude-test")
    with pytest.raises(openai.AuthenticationError):
        await openai_client(door.url, api_key="wrong").models.list()


# -- the usage ledger -------------------------------------------------------------------


async def test_a_pass_through_calls_ledger_row(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(usage=Usage(input_tokens=12, output_tokens=7)))
    call_id = rid("chat-relay")
    await openai_client(url).chat.completions.create(
        model=ALIASED, messages=HELLO, extra_headers={"x-request-id": call_id}
    )
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.chat_completions", "OK")
    assert (row["model_requested"], row["provider"]) == (ALIASED, "openai")
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)
    assert row["cost_nanos"] == 12 * INPUT_NANOS + 7 * OUTPUT_NANOS
    assert row["usage_estimated"] == 0


async def test_a_translated_calls_ledger_row(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(usage=CACHED_USAGE))
    call_id = rid("chat-translated")
    stream = await openai_client(url).chat.completions.create(
        model="claude-test",
        messages=HELLO,
        stream=True,
        user="end-user-42",
        extra_headers={"x-request-id": call_id},
    )
    [_ async for _ in stream]
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.chat_completions", "OK")
    assert (row["model_requested"], row["provider"]) == ("claude-test", "anthropic")
    assert (row["input_tokens"], row["output_tokens"]) == (10, 5)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (30, 4)
    assert row["cost_nanos"] == (
        10 * INPUT_NANOS + 5 * OUTPUT_NANOS + 30 * CACHE_READ_NANOS + 4 * CACHE_WRITE_NANOS
    )
    assert row["end_user"] == "end-user-42"


async def test_a_refused_calls_ledger_row(front_door: RunningGateway, url: str) -> None:
    call_id = rid("chat-refused")
    response = await chat_post(url, chat_body("echo", n=3), **{"x-request-id": call_id})
    assert openai_error(response, 400)["param"] == "n"
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"], row["method"]) == (
        "INVALID_ARGUMENT",
        "http",
        "openai.chat_completions",
    )
    assert row["model_requested"] == "echo" and row["output_tokens"] == 0


# -- a client that leaves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "upstream_path"), [("claude-test", "/v1/messages"), (ALIASED, CHAT_PATH)]
)
async def test_a_client_leaving_mid_stream_closes_the_upstream(
    front_door: RunningGateway, url: str, fake: FakeUpstream, model: str, upstream_path: str
) -> None:
    words = " ".join(f"word{i}" for i in range(60))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.1))
    call_id = rid("chat-gone")
    received = b""
    async with httpx2.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            url + CHAT_PATH,
            content=json.dumps(chat_body(model, stream=True)).encode(),
            headers={"content-type": "application/json", "x-request-id": call_id},
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += chunk
                if received.count(b"word") >= 3:
                    break
        left_at = time.monotonic()
    chunks = check_chat_stream(received, include_usage=False, partial=True)
    assert text_of(chunks).startswith("word0 word1 ")
    upstream = fake.last(upstream_path)
    await asyncio.wait_for(upstream.finished.wait(), 1.0)
    assert upstream.disconnected
    assert time.monotonic() - left_at < 1.0
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"], row["method"]) == (
        "CANCELLED",
        "http",
        "openai.chat_completions",
    )
    assert row["output_tokens"] >= 3
    assert row["cost_nanos"] >= row["output_tokens"] * OUTPUT_NANOS
