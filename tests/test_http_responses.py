"""OpenAI's Responses API on the HTTP front door, driven by the official `openai` SDK.

Pass-through to OpenAI deployments whose upstream serves the Responses API
(the fake upstream's): the body the SDK sent reaches the upstream unchanged
but for an alias's model name, unknown fields included; the answer comes
back byte for byte (the JSON, every SSE event, error bodies with their
status, a mid-stream `error` or `response.failed`), and the ledger bills
the upstream's usage. Translation to an Anthropic deployment, to an
OpenAI-compatible server without the Responses API (Chat Completions) and
to the offline `echo` model: text, streamed function calls and their round
trip, instructions, limits, reasoning effort, a Codex-like request, the
stateless refusals, tools only OpenAI runs, answers cut short, and Claude's
signed thinking carried through a reasoning item's `encrypted_content`.
A client that leaves mid-stream. Every stream is checked by
tests/openai_responses_grammar.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx2
import openai
import pytest
from openai.types.responses import FunctionToolParam, Response

from server.http_edge.responses_encoding import SEALED_PREFIX
from tests.conftest import RunningGateway
from tests.fake_upstream import (
    FakeUpstream,
    Reply,
    Text,
    Thinking,
    ToolCall,
    Usage,
    responses_wire,
)
from tests.http_fixtures import SentLog, without_pings
from tests.openai_responses_grammar import Event, check_responses_stream
from tests.test_http_front_door import INPUT_NANOS, OUTPUT_NANOS, ledger_row, rid
from tests.upstream_fixtures import OPENAI_KEY

# gpt-test goes upstream as gpt-upstream-1; gpt-6-sol's upstream id is its own,
# so its bodies compare byte for byte.
ALIASED, UPSTREAM_NAME = "gpt-test", "gpt-upstream-1"
SAME_NAME = "gpt-6-sol"
RESPONSES_PATH = "/v1/responses"
MESSAGES_PATH = "/v1/messages"
CHAT_PATH = "/v1/chat/completions"
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}
# The fake's usage: OpenAI's input_tokens count the cached and cache-written ones too.
CACHED_USAGE = Usage(input_tokens=10, output_tokens=5, cache_read_input_tokens=30,
                     cache_creation_input_tokens=4)  # fmt: skip
CACHE_READ_NANOS, CACHE_WRITE_NANOS = 300, 3_750  # claude-test's and gpt-test's prices
STATELESS = "keeps no conversation state"


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
    url: str, sent: SentLog | None = None, received: Received | None = None
) -> openai.AsyncOpenAI:
    """The official SDK pointed at the front door (no retries: tests see each answer);
    `sent` records the requests' bytes, `received` the answers'."""
    hooks = {"request": [sent.hook]} if sent is not None else {}
    http = httpx2.AsyncClient(event_hooks=hooks, transport=received)
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http
    )


async def responses_post(url: str, body: dict[str, Any] | bytes, **headers: str) -> httpx2.Response:
    """A raw POST /v1/responses, as an OpenAI client sends it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx2.AsyncClient() as client:
        return await client.post(
            url + RESPONSES_PATH,
            content=content,
            headers={"content-type": "application/json", **headers},
            timeout=30,
        )


def ask(model: str, text: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": model, "input": text, **fields}


def openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    """Checks an answer is the gateway's own error in OpenAI's shape; returns its `error`."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    assert set(document) == {"error"}, document
    error: dict[str, Any] = document["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def text_of(events: list[Event]) -> str:
    return "".join(d["delta"] for n, d in events if n == "response.output_text.delta")


def last_response(events: list[Event]) -> dict[str, Any]:
    """The Response the last event carries."""
    response: dict[str, Any] = events[-1][1]["response"]
    return response


def anthropic_request(fake: FakeUpstream) -> dict[str, Any]:
    body = fake.last(MESSAGES_PATH).body
    assert isinstance(body, dict)
    return body


def chat_request(fake: FakeUpstream) -> dict[str, Any]:
    body = fake.last(CHAT_PATH).body
    assert isinstance(body, dict)
    return body


def as_input(items: list[Any]) -> list[dict[str, Any]]:
    """Output items of a Response, as a client passes them back in the next input."""
    return [item.model_dump(exclude_none=True) for item in items]


# -- pass-through to OpenAI deployments -------------------------------------------------


async def test_pass_through_forwards_the_sdk_bytes_unchanged(url: str, fake: FakeUpstream) -> None:
    sent = SentLog()
    reply = Reply(blocks=[Text("Four.")], usage=Usage(11, 3))
    fake.enqueue(reply)
    response = await openai_client(url, sent).responses.create(
        model=SAME_NAME,
        instructions="Be terse.",
        input=[{"role": "user", "content": "What is 2 + 2?"}],
        tools=[WEATHER_TOOL, {"type": "web_search"}],
        store=False,
        prompt_cache_key="session-1",
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "low", "summary": "auto"},
        extra_headers={"openai-beta": "responses=v1"},
        extra_body={"some_future_field": {"nested": [1, 2, 3]}},
    )
    forwarded = fake.last(RESPONSES_PATH)
    assert forwarded.raw == sent.last.content  # byte for byte
    assert forwarded.body["some_future_field"] == {"nested": [1, 2, 3]}
    assert forwarded.headers["openai-beta"] == "responses=v1"
    # The gateway's credential goes upstream, never the client's.
    assert forwarded.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "unused" not in str(forwarded.headers)
    assert response.output_text == "Four."
    assert response.id == responses_wire.response_id(reply) and response.model == SAME_NAME


@pytest.mark.parametrize("stream", [False, True])
async def test_pass_through_of_an_alias_renames_only_the_model(
    url: str, fake: FakeUpstream, stream: bool
) -> None:
    sent, received = SentLog(), Received()
    fake.enqueue(Reply(blocks=[Text("Hi there.")]))
    client = openai_client(url, sent, received)
    fields: dict[str, Any] = {
        "model": ALIASED,
        "input": "hello",
        "max_output_tokens": 64,
        "prompt_cache_key": "session-1",
        "extra_body": {"unknown_field": True},
    }
    if stream:
        async with client.responses.stream(**fields) as events:
            final = await events.get_final_response()
        check_responses_stream(received.last)
    else:
        final = await client.responses.create(**fields)
    forwarded = fake.last(RESPONSES_PATH)
    assert json.loads(forwarded.raw) == {**json.loads(sent.last.content), "model": UPSTREAM_NAME}
    assert forwarded.body["unknown_field"] is True
    assert final.output_text == "Hi there."
    assert final.model == UPSTREAM_NAME  # the upstream's answer, as it came


async def test_pass_through_answer_is_the_upstreams_body_byte_for_byte(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(
        blocks=[Text("Checking."), ToolCall("call_1", "get_weather", {"city": "Oslo"})],
        usage=CACHED_USAGE,
    )
    fake.enqueue(reply)
    body = ask(SAME_NAME, tools=[WEATHER_TOOL], temperature=0.2)
    response = await responses_post(url, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.content == json.dumps(responses_wire.response_body(reply, body)).encode()


async def test_pass_through_stream_is_relayed_event_by_event_byte_for_byte(
    url: str, fake: FakeUpstream
) -> None:
    reply = Reply(
        blocks=[
            Text("It is sunny."),
            ToolCall("call_7", "get_weather", {"city": "Oslo"}, fragments=3),
        ],
        usage=CACHED_USAGE,
    )
    fake.enqueue(reply)
    body = ask(SAME_NAME, stream=True, tools=[WEATHER_TOOL])
    response = await responses_post(url, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert without_pings(response.content) == b"".join(responses_wire.stream_events(reply, body))
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.completed"


async def test_sdk_stream_through_the_pass_through(url: str, fake: FakeUpstream) -> None:
    received = Received()
    fake.enqueue(Reply(blocks=[Text("One two three.")], usage=Usage(21, 9)))
    async with openai_client(url, received=received).responses.stream(
        model=ALIASED, input="count"
    ) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    check_responses_stream(received.last)
    assert "".join(deltas) == "One two three." == final.output_text
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (21, 9)


@pytest.mark.parametrize(
    ("status", "error_class"), [(400, openai.BadRequestError), (429, openai.RateLimitError)]
)
async def test_pass_through_upstream_errors_reach_the_client_unchanged(
    url: str, fake: FakeUpstream, status: int, error_class: type[openai.APIStatusError]
) -> None:
    reply = Reply(
        status=status,
        error_message="Invalid value for 'input'." if status == 400 else "Rate limit reached.",
        error_param="input" if status == 400 else None,
        headers={"retry-after": "7"} if status == 429 else {},
    )
    fake.enqueue(reply)
    body = ask(SAME_NAME)
    response = await responses_post(url, body)
    assert response.status_code == status
    assert response.content == json.dumps(responses_wire.error_body(reply, status)).encode()
    if status == 429:
        assert response.headers["retry-after"] == "7"
    # The SDK raises its own class, streaming or not.
    client = openai_client(url)
    for stream in (False, True):
        fake.enqueue(reply)
        with pytest.raises(error_class) as raised:
            if stream:
                async with client.responses.stream(model=ALIASED, input="hi") as events:
                    [_ async for _ in events]
            else:
                await client.responses.create(model=ALIASED, input="hi")
        assert raised.value.status_code == status
        assert raised.value.body == responses_wire.error_body(reply, status)["error"]
        if status == 429:
            assert raised.value.response.headers["retry-after"] == "7"


async def test_pass_through_error_event_mid_stream_reaches_the_client(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    reply = Reply(blocks=[Text("one two three four")], error_after=5)
    fake.enqueue(reply)
    body = ask(SAME_NAME, stream=True)
    call_id = rid("responses-error-event")
    response = await responses_post(url, body, **{"x-request-id": call_id})
    assert response.status_code == 200
    events = responses_wire.stream_events(reply, body)
    error_event = responses_wire.stream_error_event(reply, body)
    assert without_pings(response.content) == b"".join(events[:5]) + error_event
    # The checker takes the SDK's ResponseErrorEvent (a top-level message); the
    # fake sends OpenAI's error envelope, which the SDK raises as an APIError.
    check_responses_stream(response.content[: -len(error_event)], partial=True)
    assert json.loads(error_event.split(b"data: ", 1)[1])["type"] == "error"
    fake.enqueue(reply)
    with pytest.raises(openai.APIError) as raised:
        async with openai_client(url).responses.stream(model=SAME_NAME, input="hi") as stream:
            [_ async for _ in stream]
    assert "The server had an error" in raised.value.message
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == (
        "http",
        "openai.responses",
        "UNAVAILABLE",
    )


async def test_pass_through_error_event_mid_stream_keeps_its_kind(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    """A rate limit met mid-stream is recorded as one (the envelope's code says so)."""
    fake.enqueue(
        Reply(
            blocks=[Text("one two three four")],
            error_after=5,
            stream_error_type="requests",
            error_code="rate_limit_exceeded",
        )
    )
    call_id = rid("responses-rate-limited-mid-stream")
    response = await responses_post(url, ask(SAME_NAME, stream=True), **{"x-request-id": call_id})
    assert response.status_code == 200
    assert b'"rate_limit_exceeded"' in response.content
    row = await ledger_row(front_door, call_id)
    assert (row["method"], row["status"]) == ("openai.responses", "RESOURCE_EXHAUSTED")


async def test_pass_through_response_failed_reaches_the_client(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    # Fails once the first item is done (nine events: created ... output_item.done).
    reply = Reply(
        blocks=[Text("one two"), ToolCall("call_1", "get_weather", {"city": "Oslo"})],
        error_after=9,
        responses_failure="response.failed",
    )
    fake.enqueue(reply)
    body = ask(SAME_NAME, stream=True, tools=[WEATHER_TOOL])
    call_id = rid("responses-failed")
    response = await responses_post(url, body, **{"x-request-id": call_id})
    assert response.status_code == 200
    expected = b"".join(responses_wire.stream_events(reply, body)[:9])
    assert without_pings(response.content) == expected + responses_wire.stream_error_event(
        reply, body
    )
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.failed"
    failed = last_response(events)
    assert failed["error"]["code"] == "server_error"
    assert [item["type"] for item in failed["output"]] == ["message"]
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"]) == ("http", "openai.responses")
    assert row["status"] not in ("OK", "CANCELLED")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pass_through_calls_ledger_row(
    front_door: RunningGateway, url: str, fake: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(Reply(usage=Usage(input_tokens=12, output_tokens=7)))
    call_id = rid("responses-relay")
    response = await responses_post(url, ask(ALIASED, stream=stream), **{"x-request-id": call_id})
    assert response.status_code == 200
    if stream:
        check_responses_stream(response.content)
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.responses", "OK")
    assert (row["model_requested"], row["provider"]) == (ALIASED, "openai")
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (0, 0)
    assert row["cost_nanos"] == 12 * INPUT_NANOS + 7 * OUTPUT_NANOS
    assert row["usage_estimated"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pass_through_bills_cached_and_written_tokens_apart(
    front_door: RunningGateway, url: str, fake: FakeUpstream, stream: bool
) -> None:
    """OpenAI's input_tokens (44) count the cached (30) and the cache-written (4)
    ones: the ledger's input is what is left (10), as for Chat Completions."""
    fake.enqueue(Reply(usage=CACHED_USAGE))
    call_id = rid("responses-relay-cached")
    response = await responses_post(url, ask(ALIASED, stream=stream), **{"x-request-id": call_id})
    assert response.status_code == 200
    if stream:
        assert last_response(check_responses_stream(response.content))["usage"] == (
            responses_wire.usage(Reply(usage=CACHED_USAGE))
        )
    row = await ledger_row(front_door, call_id)
    assert (row["input_tokens"], row["output_tokens"]) == (10, 5)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (30, 4)
    assert row["cost_nanos"] == (
        10 * INPUT_NANOS + 5 * OUTPUT_NANOS + 30 * CACHE_READ_NANOS + 4 * CACHE_WRITE_NANOS
    )


# -- translation: text ----------------------------------------------------------------


async def test_translation_to_claude_sends_a_messages_request(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("Bonjour.")], usage=CACHED_USAGE))
    response = await openai_client(url).responses.create(
        model="claude-test",
        instructions="You are terse.",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Say hello."},
        ],
        max_output_tokens=300,
        temperature=0.5,
        store=False,
    )
    sent = anthropic_request(fake)
    assert sent["model"] == "claude-upstream-1"
    assert sent["max_tokens"] == 300
    assert sent["temperature"] == 0.5
    assert [b["text"] for b in sent["system"]] == ["You are terse.", "Answer in French."]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}
    ]
    assert "thinking" not in sent
    assert response.object == "response" and response.id.startswith("resp_")
    assert (response.status, response.model, response.output_text) == (
        "completed",
        "claude-test",
        "Bonjour.",
    )
    assert response.instructions == "You are terse."
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (44, 30)
    assert (usage.output_tokens, usage.total_tokens) == (5, 49)


async def test_translated_stream_to_claude(url: str, fake: FakeUpstream) -> None:
    received = Received()
    fake.enqueue(Reply(blocks=[Text("One two three.")], usage=Usage(21, 9)))
    async with openai_client(url, received=received).responses.stream(
        model="claude-test", input="count", max_output_tokens=100
    ) as stream:
        final = await stream.get_final_response()
    events = check_responses_stream(received.last)
    assert text_of(events) == "One two three." == final.output_text
    assert [n for n, _ in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1][0] == "response.completed"
    assert last_response(events)["usage"]["input_tokens"] == 21
    assert anthropic_request(fake)["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_translation_to_a_chat_completions_server(
    front_door: RunningGateway, url: str, fake: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(Reply(blocks=[Text("Hi from llama.")], usage=Usage(8, 4)))
    body = ask("llama-local", instructions="Be brief.", max_output_tokens=50, stream=stream)
    response = await responses_post(url, body)
    assert response.status_code == 200, response.text
    assert not any(r.path == RESPONSES_PATH for r in fake.requests)
    sent = chat_request(fake)
    assert sent["model"] == "llama-local"
    assert sent["max_tokens"] == 50  # the server's max_tokens_field
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    if stream:
        events = check_responses_stream(response.content)
        assert text_of(events) == "Hi from llama."
        usage = last_response(events)["usage"]
    else:
        document = Response.model_validate(response.json())
        assert document.output_text == "Hi from llama."
        assert document.model == "llama-local"
        usage = response.json()["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (8, 4)


async def test_translation_to_echo(url: str) -> None:
    received = Received()
    client = openai_client(url, received=received)
    response = await client.responses.create(model="echo", input="hi there")
    assert (response.output_text, response.status) == ("hi there", "completed")
    assert [item.type for item in response.output] == ["message"]
    async with client.responses.stream(model="echo", input="hello again") as stream:
        final = await stream.get_final_response()
    events = check_responses_stream(received.last)
    assert text_of(events) == "hello again" == final.output_text


# -- translation: function calls ----------------------------------------------------------


async def test_a_function_call_streamed_from_claude_and_its_round_trip(
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
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    async with client.responses.stream(
        model="claude-test",
        input=cast(Any, question),
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_output_tokens=500,
    ) as stream:
        first = await stream.get_final_response()
    events = check_responses_stream(received.last)
    fragments = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert fragments == ToolCall("x", "y", {"city": "Oslo"}, fragments=3).json_fragments()
    sent = anthropic_request(fake)
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city",
            "input_schema": WEATHER_TOOL["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "auto"}
    assert [item.type for item in first.output] == ["message", "function_call"]
    call = first.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == (
        "toolu_01",
        "get_weather",
        '{"city":"Oslo"}',
    )
    # The round trip: the call and its output go back in the next request's input.
    fake.enqueue(Reply(blocks=[Text("It is 5 C in Oslo.")]))
    second = await client.responses.create(
        model="claude-test",
        tools=[WEATHER_TOOL],
        input=cast(
            Any,
            [
                *question,
                *as_input(first.output),
                {"type": "function_call_output", "call_id": call.call_id, "output": "5 C"},
            ],
        ),
    )
    assert second.output_text == "It is 5 C in Oslo."
    assert anthropic_request(fake)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
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
                }
            ],
        },
    ]


async def test_a_function_call_from_a_chat_completions_server_and_its_round_trip(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[ToolCall("call_9", "get_weather", {"city": "Rome"})]))
    body = ask("llama-local", "Weather in Rome?", stream=True, tools=[WEATHER_TOOL])
    events = check_responses_stream((await responses_post(url, body)).content)
    [call] = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert (call["type"], call["call_id"], call["arguments"]) == (
        "function_call",
        "call_9",
        '{"city":"Rome"}',
    )
    fake.enqueue(Reply(blocks=[Text("Sunny.")]))
    follow = ask(
        "llama-local",
        tools=[WEATHER_TOOL],
        input=[
            {"role": "user", "content": "Weather in Rome?"},
            call,
            {"type": "function_call_output", "call_id": "call_9", "output": "sunny"},
        ],
    )
    assert (await responses_post(url, follow)).status_code == 200
    messages = chat_request(fake)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_9"
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}


async def test_echo_streams_a_function_call(url: str) -> None:
    response = await responses_post(url, ask("echo", "what is the weather", stream=True))
    events = check_responses_stream(response.content)
    items = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert [item["type"] for item in items] == ["message", "function_call"]
    assert (items[1]["name"], json.loads(items[1]["arguments"])) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert last_response(events)["status"] == "completed"


# -- translation: settings ----------------------------------------------------------------


async def test_no_max_output_tokens_is_the_models_largest_output(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(), Reply())
    assert (await responses_post(url, ask("claude-test"))).status_code == 200
    assert anthropic_request(fake)["max_tokens"] == 16_000  # claude-test's max_output_tokens
    assert (await responses_post(url, ask("llama-local"))).status_code == 200
    route = front_door.gateway.router.resolve("llama-local")
    assert route is not None
    assert chat_request(fake)["max_tokens"] == route.model.max_output_tokens


@pytest.mark.parametrize(
    ("fields", "thinking", "max_tokens"),
    [
        ({"reasoning": {"effort": "low"}, "max_output_tokens": 8000}, 2048, 8000),
        ({"reasoning": {"effort": "medium"}}, 8192, 16_000),
        # Kept below max_tokens.
        ({"reasoning": {"effort": "high"}, "max_output_tokens": 4096}, 4095, 4096),
        ({"reasoning": {"effort": "none"}, "max_output_tokens": 4096}, None, 4096),
    ],
)
async def test_reasoning_effort_is_a_thinking_budget_for_claude(
    url: str, fake: FakeUpstream, fields: dict[str, Any], thinking: int | None, max_tokens: int
) -> None:
    fake.enqueue(Reply(blocks=[Thinking("Let me think."), Text("Four.")]))
    response = await responses_post(url, ask("claude-test", **fields))
    assert response.status_code == 200, response.text
    sent = anthropic_request(fake)
    assert sent["max_tokens"] == max_tokens
    if thinking is None:
        assert "thinking" not in sent
    else:
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": thinking}
    assert response.json()["reasoning"]["effort"] == fields["reasoning"]["effort"]


async def test_reasoning_effort_to_a_model_that_does_not_think_is_ignored(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply())
    response = await responses_post(url, ask("llama-local", reasoning={"effort": "high"}))
    assert response.status_code == 200, response.text
    assert "reasoning_effort" not in chat_request(fake)


def codex_request(model: str) -> dict[str, Any]:
    """What Codex CLI sends (wire_api = "responses")."""
    return {
        "model": model,
        "instructions": "You are Codex, a coding agent.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "<permissions>read-only</permissions>"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "what is the weather in Paris"}],
            },
        ],
        "tools": [
            {
                "type": "function",
                "name": "shell",
                "description": "Runs a shell command",
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                    "required": ["command"],
                    "additionalProperties": False,
                },
            },
            WEATHER_TOOL,
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a7c1-codex-session",
        "text": {"verbosity": "low"},
    }


@pytest.mark.parametrize("model", ["claude-test", "echo", "llama-local"])
async def test_a_codex_like_request_is_accepted(url: str, fake: FakeUpstream, model: str) -> None:
    fake.enqueue(Reply(blocks=[Thinking("Need the weather."), ToolCall("c1", "get_weather", {})]))
    response = await responses_post(url, codex_request(model))
    assert response.status_code == 200, response.text
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.completed"
    final = last_response(events)
    assert final["store"] is False and final["parallel_tool_calls"] is False
    assert final["prompt_cache_key"] == "0199a7c1-codex-session"
    assert any(item["type"] == "function_call" for item in final["output"])
    if model == "claude-test":
        sent = anthropic_request(fake)
        assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
        assert [t["name"] for t in sent["tools"]] == ["shell", "get_weather"]
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 8192}
        assert "prompt_cache_key" not in sent and "text" not in sent


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_abc123"}, "previous_response_id"),
        ({"store": True}, "store"),
    ],
)
@pytest.mark.parametrize("model", ["claude-test", "echo"])
async def test_state_the_gateway_does_not_keep_is_a_400_that_says_so(
    url: str, fake: FakeUpstream, fields: dict[str, Any], param: str, model: str
) -> None:
    response = await responses_post(url, ask(model, stream=True, **fields))
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert STATELESS in error["message"] and param in error["message"]
    assert response.headers["x-request-id"]
    assert not fake.requests
    with pytest.raises(openai.BadRequestError) as raised:
        await openai_client(url).responses.create(model=model, input="hi", **fields)
    assert STATELESS in raised.value.message


@pytest.mark.parametrize("model", ["claude-test", "echo", "llama-local"])
async def test_a_tool_only_openai_runs_is_a_400_naming_it(
    url: str, fake: FakeUpstream, model: str
) -> None:
    body = ask(model, tools=[WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}])
    error = openai_error(await responses_post(url, body), 400)
    assert error["param"] == "tools[1]"
    assert "file_search" in error["message"] and "tools[1]" in error["message"]
    assert not fake.requests


async def test_a_tool_only_openai_runs_passes_through_to_openai(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply())
    response = await responses_post(url, ask(ALIASED, tools=[{"type": "web_search"}]))
    assert response.status_code == 200, response.text
    assert fake.last(RESPONSES_PATH).body["tools"] == [{"type": "web_search"}]


async def test_claude_cut_short_by_max_tokens_is_incomplete(url: str, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three")], stop_reason="max_tokens"))
    response = await responses_post(url, ask("claude-test", max_output_tokens=3, stream=True))
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.incomplete"
    final = last_response(events)
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][-1]["status"] == "incomplete"
    fake.enqueue(Reply(blocks=[Text("one two three")], stop_reason="max_tokens"))
    whole = await openai_client(url).responses.create(
        model="claude-test", input="hi", max_output_tokens=3
    )
    assert whole.status == "incomplete"
    assert whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"


async def test_echo_cut_short_by_max_tokens_is_incomplete(url: str) -> None:
    words = " ".join(f"word{i}" for i in range(40))
    response = await responses_post(url, ask("echo", words, max_output_tokens=3, stream=True))
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.incomplete"
    final = last_response(events)
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] <= 3


async def test_a_translated_stream_failing_mid_way_ends_with_response_failed(
    url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three four")], error_after=4))
    response = await responses_post(url, ask("claude-test", stream=True))
    assert response.status_code == 200
    events = check_responses_stream(response.content)
    assert events[-1][0] == "response.failed"
    assert text_of(events) == "one "
    assert last_response(events)["error"]["code"] == "server_error"


# -- thinking round trip through Claude ---------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_claudes_signed_thinking_goes_back_before_its_tool_use(
    url: str, fake: FakeUpstream, stream: bool
) -> None:
    fake.enqueue(
        Reply(
            blocks=[
                Thinking("The user wants Oslo's weather.", signature="sig-Oslo-42"),
                ToolCall("toolu_07", "get_weather", {"city": "Oslo"}),
            ]
        )
    )
    received = Received()
    client = openai_client(url, received=received)
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    fields: dict[str, Any] = {
        "model": "claude-test",
        "input": question,
        "tools": [WEATHER_TOOL],
        "reasoning": {"effort": "low"},
        "include": ["reasoning.encrypted_content"],
        "store": False,
    }
    if stream:
        async with client.responses.stream(**fields) as events:
            first = await events.get_final_response()
        check_responses_stream(received.last)
    else:
        first = await client.responses.create(**fields)
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    reasoning = first.output[0]
    assert reasoning.type == "reasoning"
    assert [s.text for s in reasoning.summary] == ["The user wants Oslo's weather."]
    assert reasoning.encrypted_content is not None
    assert reasoning.encrypted_content.startswith(SEALED_PREFIX)
    fake.enqueue(Reply(blocks=[Text("5 C.")]))
    second = await client.responses.create(
        **{
            **fields,
            "input": [
                *question,
                *as_input(first.output),
                {"type": "function_call_output", "call_id": "toolu_07", "output": "5 C"},
            ],
        }
    )
    assert second.output_text == "5 C."
    assistant = anthropic_request(fake)["messages"][1]
    assert assistant == {
        "role": "assistant",
        "content": [
            {
                "type": "thinking",
                "thinking": "The user wants Oslo's weather.",
                "signature": "sig-Oslo-42",
            },
            {
                "type": "tool_use",
                "id": "toolu_07",
                "name": "get_weather",
                "input": {"city": "Oslo"},
            },
        ],
    }


async def test_claudes_sealed_thinking_is_left_out_of_a_pass_through_to_openai(
    url: str, fake: FakeUpstream
) -> None:
    # A conversation begun on a Claude model and carried on on an OpenAI one
    # (Codex switching models): OpenAI cannot read the reasoning the gateway
    # sealed, and refuses a request carrying it, so the relayed body goes
    # without it. OpenAI's own reasoning items pass untouched.
    fake.enqueue(
        Reply(
            blocks=[
                Thinking("The user wants Oslo's weather.", signature="sig-Oslo-42"),
                ToolCall("toolu_07", "get_weather", {"city": "Oslo"}),
            ]
        )
    )
    client = openai_client(url)
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    fields: dict[str, Any] = {
        "tools": [WEATHER_TOOL],
        "reasoning": {"effort": "low"},
        "include": ["reasoning.encrypted_content"],
        "store": False,
    }
    first = await client.responses.create(model="claude-test", input=question, **fields)
    assert first.output[0].type == "reasoning"
    openais_own = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "encrypted_content": "gAAAAB-openai-own",
    }
    later = [
        *question,
        *as_input(first.output),
        {"type": "function_call_output", "call_id": "toolu_07", "output": "5 C"},
        openais_own,
    ]
    fake.enqueue(Reply(blocks=[Text("5 C.")]))
    second = await client.responses.create(model=SAME_NAME, input=later, **fields)
    assert second.output_text == "5 C."
    relayed = fake.last(RESPONSES_PATH).body["input"]
    assert [item.get("type") for item in relayed] == [
        None,  # the user's message (an easy input message: no type)
        "function_call",
        "function_call_output",
        "reasoning",
    ]
    assert relayed[-1] == openais_own
    assert not any(SEALED_PREFIX in json.dumps(item) for item in relayed)


@pytest.mark.parametrize("padding", [0, 1_200_000])
async def test_leaving_out_sealed_thinking_keeps_every_other_byte(
    url: str, fake: FakeUpstream, padding: int
) -> None:
    """Only the sealed items leave the body: the other members keep their bytes
    (spacing, escapes, number spellings), and the input's other items theirs.
    A body over a MiB (a long Codex session) is written in steps."""
    fake.enqueue(
        Reply(blocks=[Thinking("Oslo, then.", signature="sig-1"), ToolCall("toolu_1", "f", {})])
    )
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await openai_client(url).responses.create(
        model="claude-test",
        input=question,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],
        reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"],
        store=False,
    )
    earlier = [{"role": "user", "content": "Some context: " + "x" * padding}] if padding else []
    items = [*earlier, *question, *as_input(first.output)]
    items.append({"type": "function_call_output", "call_id": "toolu_1", "output": "5 °C"})
    kept = [item for item in items if item.get("type") != "reasoning"]
    assert len(kept) == len(items) - 1

    def compact(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    head = '{ "model" : "gpt-6-sol",\n  "instructions": "Be terse \\/ brief \\u00e9",'
    tail = ', "x_future": 1E0, "store": false }'
    sent = f'{head} "input":  {compact(items)}{tail}'.encode()
    fake.enqueue(Reply(blocks=[Text("5 C.")]))
    response = await responses_post(url, sent)
    assert response.status_code == 200, response.text
    assert fake.last(RESPONSES_PATH).raw == f'{head} "input":  {compact(kept)}{tail}'.encode()


async def test_priority_processing_is_refused_as_unpriced(url: str, fake: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client(url).responses.create(
            model=SAME_NAME, input="Hi", service_tier="priority"
        )
    assert refused.value.param == "service_tier"
    assert not fake.requests


# -- translated calls in the ledger -------------------------------------------------------


async def test_a_translated_calls_ledger_row(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(usage=CACHED_USAGE))
    call_id = rid("responses-translated")
    response = await responses_post(
        url,
        ask("claude-test", stream=True, safety_identifier="end-user-42"),
        **{"x-request-id": call_id},
    )
    usage = last_response(check_responses_stream(response.content))["usage"]
    assert usage["input_tokens"] == 44
    assert usage["input_tokens_details"] == {"cached_tokens": 30, "cache_write_tokens": 4}
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.responses", "OK")
    assert (row["model_requested"], row["provider"]) == ("claude-test", "anthropic")
    assert (row["input_tokens"], row["output_tokens"]) == (10, 5)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (30, 4)
    assert row["end_user"] == "end-user-42"


async def test_a_refused_calls_ledger_row(front_door: RunningGateway, url: str) -> None:
    call_id = rid("responses-refused")
    response = await responses_post(url, ask("echo", store=True), **{"x-request-id": call_id})
    openai_error(response, 400)
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"], row["method"]) == (
        "INVALID_ARGUMENT",
        "http",
        "openai.responses",
    )
    assert row["model_requested"] == "echo" and row["output_tokens"] == 0


# -- a client that leaves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "upstream_path"),
    [("claude-test", MESSAGES_PATH), (ALIASED, RESPONSES_PATH), ("llama-local", CHAT_PATH)],
)
async def test_a_client_leaving_mid_stream_closes_the_upstream(
    front_door: RunningGateway, url: str, fake: FakeUpstream, model: str, upstream_path: str
) -> None:
    words = " ".join(f"word{i}" for i in range(60))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.1))
    call_id = rid("responses-gone")
    received = b""
    async with httpx2.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            url + RESPONSES_PATH,
            content=json.dumps(ask(model, stream=True)).encode(),
            headers={"content-type": "application/json", "x-request-id": call_id},
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += chunk
                if received.count(b"event: response.output_text.delta") >= 3:
                    break
        left_at = time.monotonic()
    events = check_responses_stream(received, partial=True)
    assert text_of(events).startswith("word0 word1 ")
    upstream = fake.last(upstream_path)
    await asyncio.wait_for(upstream.finished.wait(), 1.0)
    assert upstream.disconnected
    assert time.monotonic() - left_at < 1.0
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"], row["method"]) == ("CANCELLED", "http", "openai.responses")
    assert row["model_requested"] == model
