"""The fake upstream's Responses API, checked with the official openai SDK.

The gateway relays `POST /v1/responses` verbatim to OpenAI deployments, so
the fake must answer exactly as OpenAI does: these tests hold it to what
the SDK parses and to the wire's own rules (event names, sequence numbers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseStreamEvent

from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking, ToolCall, Usage

RESPONSES = "/v1/responses"
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=fake.openai_url, api_key="x", max_retries=0) as sdk:
        yield sdk


def everything() -> Reply:
    return Reply(
        blocks=[
            Thinking("Weather needs a tool.", signature="enc-blob-1"),
            Text("Let me check the weather."),
            ToolCall("call_abc", "get_weather", {"city": "Paris"}, fragments=3),
        ],
        usage=Usage(input_tokens=10, output_tokens=25, cache_read_input_tokens=90),
        message_id="msg_fake42",
    )


ASK: dict[str, Any] = {
    "model": "gpt-upstream-1",
    "input": "Weather in Paris?",
    "tools": [WEATHER_TOOL],
    "reasoning": {"effort": "low", "summary": "auto"},
    "include": ["reasoning.encrypted_content"],
}


def check_everything(response: Response) -> None:
    assert response.id == "resp_fake42"
    assert response.object == "response"
    assert response.status == "completed"
    assert response.error is None
    assert response.incomplete_details is None
    assert response.model == "gpt-upstream-1"
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = response.output
    assert reasoning.type == "reasoning"
    assert [s.text for s in reasoning.summary] == ["Weather needs a tool."]
    assert reasoning.encrypted_content == "enc-blob-1"
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.status == "completed"
    assert response.output_text == "Let me check the weather."
    assert call.type == "function_call"
    assert call.id is not None
    assert call.id.startswith("fc_")
    assert (call.call_id, call.name, call.status) == ("call_abc", "get_weather", "completed")
    assert json.loads(call.arguments) == {"city": "Paris"}
    usage = response.usage
    assert usage is not None
    # OpenAI's input_tokens include the cached ones.
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (100, 90)
    assert (usage.output_tokens, usage.total_tokens) == (25, 125)
    assert usage.output_tokens_details.reasoning_tokens == 0
    # The request's settings, echoed.
    assert response.reasoning is not None
    assert (response.reasoning.effort, response.reasoning.summary) == ("low", "auto")
    assert [t.type for t in response.tools] == ["function"]
    assert response.tool_choice == "auto"
    assert response.parallel_tool_calls is True


async def test_create_parses_into_a_response(fake: FakeUpstream, client: AsyncOpenAI) -> None:
    fake.enqueue(everything())
    response = await client.responses.create(**ASK)

    assert isinstance(response, Response)
    check_everything(response)
    assert response.completed_at is not None
    # Every field OpenAI sends is there, even when null.
    raw = response.model_dump(exclude_unset=True)
    for key in ("instructions", "metadata", "temperature", "top_p", "store", "truncation", "text"):
        assert key in raw, key
    received = fake.last(RESPONSES)
    assert received.method == "POST"
    assert received.headers["authorization"] == "Bearer x"
    assert received.body == ASK
    assert "stream" not in received.body
    assert not received.disconnected


async def test_reasoning_is_summarised_and_encrypted_only_on_request(
    fake: FakeUpstream, client: AsyncOpenAI
) -> None:
    fake.enqueue(everything())
    response = await client.responses.create(
        model="gpt-upstream-1", input="Weather in Paris?", tools=[WEATHER_TOOL]
    )
    reasoning = response.output[0]
    assert reasoning.type == "reasoning"
    assert reasoning.summary == []
    assert reasoning.encrypted_content is None
    assert response.reasoning is not None
    assert response.reasoning.summary is None


async def test_stream_yields_every_event_and_the_same_response(
    fake: FakeUpstream, client: AsyncOpenAI
) -> None:
    fake.enqueue(everything(), everything())
    events: list[ResponseStreamEvent] = []
    async with client.responses.stream(**ASK) as stream:
        events.extend([event async for event in stream])
        final = await stream.get_final_response()

    summary = ["response.reasoning_summary_text.delta"] * 4
    text = ["response.output_text.delta"] * 5
    arguments = ["response.function_call_arguments.delta"] * 3
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        *summary,
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *text,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *arguments,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == Text("Let me check the weather.").chunks()
    check_everything(final)
    assert fake.last(RESPONSES).body == {**ASK, "stream": True}

    # What the SDK folds from the stream is what a non-streaming call returns
    # (ParsedResponse's own `parsed` fields are None here).
    whole = await client.responses.create(**ASK)
    assert final.model_dump(exclude_none=True) == whole.model_dump(exclude_none=True)


async def test_the_wire_names_each_event_by_its_type(fake: FakeUpstream) -> None:
    fake.enqueue(everything())
    async with (
        httpx2.AsyncClient() as http,
        http.stream("POST", f"{fake.openai_url}/responses", json={**ASK, "stream": True}) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "req_fake0001"
        body = (await r.aread()).decode()

    frames = [f for f in body.split("\n\n") if f]
    for number, frame in enumerate(frames):
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        assert event["sequence_number"] == number
    assert "[DONE]" not in body
    delta = json.loads(frames[6].split("\n")[1].removeprefix("data: "))
    assert delta["type"] == "response.reasoning_summary_text.delta"
    assert delta["obfuscation"]


async def test_a_token_limit_leaves_the_response_incomplete(
    fake: FakeUpstream, client: AsyncOpenAI
) -> None:
    cut = Reply(blocks=[Text("It is sunny and")], stop_reason="length")
    fake.enqueue(cut, cut)
    response = await client.responses.create(model="gpt-upstream-1", input="Weather?")
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    message = response.output[0]
    assert message.type == "message"
    assert message.status == "incomplete"
    assert response.completed_at is None

    stream = await client.responses.create(model="gpt-upstream-1", input="Weather?", stream=True)
    events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.output_text == "It is sunny and"


async def test_http_429_raises_rate_limit_error(fake: FakeUpstream, client: AsyncOpenAI) -> None:
    fake.enqueue(
        Reply(status=429, error_message="Rate limit reached", headers={"retry-after": "3"})
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await client.responses.create(model="gpt-upstream-1", input="hi")
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.request_id == "req_fake0001"
    assert "Rate limit reached" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "3"


async def test_an_error_event_mid_stream_raises(fake: FakeUpstream, client: AsyncOpenAI) -> None:
    fake.enqueue(Reply(error_after=4, stream_error_type="server_error"))
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async with client.responses.stream(model="gpt-upstream-1", input="hi") as stream:
            async for event in stream:
                seen.append(event.type)
    assert len(seen) == 4
    assert caught.value.message == "The server had an error while processing your request."
    assert caught.value.type == "server_error"
    received = fake.last(RESPONSES)
    await received.finished.wait()
    assert not received.disconnected


async def test_response_failed_mid_stream(fake: FakeUpstream, client: AsyncOpenAI) -> None:
    fake.enqueue(Reply(error_after=5, responses_failure="response.failed"))
    stream = await client.responses.create(model="gpt-upstream-1", input="hi", stream=True)
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(6))
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "server_error"
    assert "req_fake0001" in failed.response.error.message
    # The message had begun: it is in the failed response, still in progress.
    [message] = failed.response.output
    assert message.type == "message"
    assert message.status == "in_progress"


async def test_a_cut_connection_raises_a_connection_error(
    fake: FakeUpstream, client: AsyncOpenAI
) -> None:
    fake.enqueue(Reply(reset_after=3))
    with pytest.raises(openai.APIConnectionError):
        async with client.responses.stream(model="gpt-upstream-1", input="hi") as stream:
            await stream.get_final_response()


async def test_a_client_that_leaves_is_recorded_as_disconnected(
    fake: FakeUpstream, client: AsyncOpenAI
) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three four five six")], event_delay_s=0.05))
    async with client.responses.stream(model="gpt-upstream-1", input="hi") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
    received = fake.last(RESPONSES)
    await received.finished.wait()
    assert received.disconnected


async def test_raw_body_is_sent_as_is(fake: FakeUpstream, client: AsyncOpenAI) -> None:
    raw = {"id": "resp_raw", "object": "response", "created_at": 1, "model": "m", "output": []}
    fake.enqueue(Reply(raw_body=json.dumps(raw).encode()))
    response = await client.responses.create(model="gpt-upstream-1", input="hi")
    assert response.id == "resp_raw"
    assert response.output_text == ""
