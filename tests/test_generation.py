"""Generate, StreamGenerate, CountTokens and ListModels on the offline provider.

All calls go through real channels to an in-process server on port 0.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import json_format

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import request, user
from tests.event_grammar import check_event_stream
from tests.upstream_fixtures import fold_stream


async def stream_events(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest
) -> list[pb.StreamGenerateResponse]:
    events = [event async for event in stub.StreamGenerate(req)]
    check_event_stream(events)
    return events


def without_ids(response: pb.GenerateResponse) -> pb.GenerateResponse:
    copy = pb.GenerateResponse()
    copy.CopyFrom(response)
    copy.ClearField("id")
    return copy


async def test_generate_echoes_the_last_user_message(stub: pb_grpc.GenerationServiceStub) -> None:
    response = await stub.Generate(request("Hello there, friend"))
    assert [b.text for b in response.content] == ["Hello there, friend"]
    assert response.model == "echo"
    assert response.provider == "offline"
    assert response.stop_reason == pb.STOP_REASON_END_TURN
    assert response.usage.output_tokens == 4  # Hello / there / , / friend
    assert response.usage.input_tokens > 0
    assert response.id.startswith("msg_")
    assert response.request_id


@pytest.mark.parametrize(
    "req",
    [
        request("The quick brown fox jumps over the lazy dog."),
        request("What is the weather like?"),  # scripted: text + two tool calls
        request("one two three four five six", max_tokens=3),
        request("alpha beta STOP gamma", stop_sequences=["STOP", "gamma"]),
        request("forbidden words"),  # scripted refusal with no text
        request("a b c", model="tiny-latest"),
    ],
    ids=["text", "tool-calls", "max-tokens", "stop-sequence", "refusal", "alias"],
)
async def test_stream_folds_to_the_generate_response(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest
) -> None:
    req.request_id = "fold-check"
    unary = await stub.Generate(req)
    events = await stream_events(stub, req)
    assert without_ids(fold_stream(events)) == without_ids(unary)


async def test_stream_arrives_in_several_chunks(stub: pb_grpc.GenerationServiceStub) -> None:
    events = await stream_events(stub, request("The quick brown fox jumps over the lazy dog."))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [e.content_block_delta.text for e in events if e.HasField("content_block_delta")]
    assert len(deltas) == 10
    assert "".join(deltas) == "The quick brown fox jumps over the lazy dog."


async def test_scripted_tool_calls_stream_their_input_in_fragments(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    req = request(
        "How is the weather?",
        tools=[pb.Tool(name="get_weather", description="Weather by city")],
    )
    response = await stub.Generate(req)
    assert response.stop_reason == pb.STOP_REASON_TOOL_USE
    assert response.content[0].text == "Let me check."
    uses = [b.tool_use for b in response.content[1:]]
    assert [(u.name, json_format.MessageToDict(u.input)) for u in uses] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo", "days": 2}),
    ]
    assert uses[0].id != uses[1].id
    # Deterministic: the same conversation gives the same tool-use ids.
    assert [b.tool_use.id for b in (await stub.Generate(req)).content[1:]] == [u.id for u in uses]

    events = await stream_events(stub, req)
    fragments = [
        e.content_block_delta.tool_input_json
        for e in events
        if e.HasField("content_block_delta") and e.content_block_delta.index == 1
    ]
    assert len(fragments) == 2
    assert json.loads("".join(fragments)) == {"city": "Paris"}


async def test_tool_use_conversation_over_two_turns(stub: pb_grpc.GenerationServiceStub) -> None:
    first = await stub.Generate(request("weather in Paris?"))
    tool_use = first.content[1].tool_use
    follow_up = pb.GenerateRequest(
        model="echo",
        messages=[
            user("weather in Paris?"),
            pb.Message(role=pb.ROLE_ASSISTANT, content=first.content),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    pb.ContentBlock(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id=tool_use.id, content=[pb.ContentBlock(text="18 C, sunny")]
                        )
                    ),
                    pb.ContentBlock(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id=first.content[2].tool_use.id,
                            content=[pb.ContentBlock(text="lookup failed")],
                            is_error=True,
                        )
                    ),
                ],
            ),
        ],
    )
    second = await stub.Generate(follow_up)
    assert second.content[0].text == "18 C, sunny\nlookup failed"
    assert second.stop_reason == pb.STOP_REASON_END_TURN


async def test_max_tokens_truncates_and_says_so(stub: pb_grpc.GenerationServiceStub) -> None:
    response = await stub.Generate(request("one two three four five six", max_tokens=3))
    assert response.content[0].text == "one two three"
    assert response.stop_reason == pb.STOP_REASON_MAX_TOKENS
    assert response.usage.output_tokens == 3


async def test_default_max_tokens_is_the_models(stub: pb_grpc.GenerationServiceStub) -> None:
    words = " ".join(f"w{i}" for i in range(30))
    response = await stub.Generate(request(words, model="tiny"))
    assert response.usage.output_tokens == 20  # tiny's default_max_tokens
    assert response.stop_reason == pb.STOP_REASON_MAX_TOKENS


async def test_stop_sequence_cuts_before_the_earliest_match(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    response = await stub.Generate(
        request("alpha beta STOP gamma END", stop_sequences=["END", "STOP"])
    )
    assert response.content[0].text == "alpha beta "
    assert response.stop_reason == pb.STOP_REASON_STOP_SEQUENCE
    assert response.stop_sequence == "STOP"


async def test_scripted_refusal(stub: pb_grpc.GenerationServiceStub) -> None:
    response = await stub.Generate(request("forbidden topic"))
    assert response.stop_reason == pb.STOP_REASON_REFUSAL
    assert list(response.content) == []


async def test_request_id_from_field_metadata_or_generated(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    call = stub.Generate(request(request_id="req-from-field"))
    response = await call
    assert response.request_id == "req-from-field"
    assert ("x-request-id", "req-from-field") in tuple(await call.trailing_metadata())

    call = stub.Generate(request(), metadata=(("x-request-id", "req-from-metadata"),))
    assert (await call).request_id == "req-from-metadata"

    first, second = await stub.Generate(request()), await stub.Generate(request())
    assert first.request_id and second.request_id and first.request_id != second.request_id

    events = stub.StreamGenerate(request(request_id="stream-req"))
    received = [e async for e in events]
    assert received[0].message_start.request_id == "stream-req"
    assert ("x-request-id", "stream-req") in tuple(await events.trailing_metadata())


async def test_chunk_delay_option_paces_the_stream(stub: pb_grpc.GenerationServiceStub) -> None:
    req = request("a b c d")
    req.provider_options.update({"chunk_delay_ms": 30})
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = await stream_events(stub, req)
    assert loop.time() - started >= 4 * 0.03
    assert sum(e.HasField("content_block_delta") for e in events) == 4


async def test_count_tokens(stub: pb_grpc.GenerationServiceStub) -> None:
    short = await stub.CountTokens(pb.CountTokensRequest(model="echo", messages=[user("Hello")]))
    longer = await stub.CountTokens(
        pb.CountTokensRequest(
            model="echo",
            system=[pb.ContentBlock(text="Be brief.")],
            messages=[user("Hello, how are you today?")],
            tools=[pb.Tool(name="lookup", description="Looks things up")],
        )
    )
    assert short.input_tokens > 0
    assert not short.estimated
    assert longer.input_tokens > short.input_tokens
    # The count is the one Generate reports as input usage.
    response = await stub.Generate(pb.GenerateRequest(model="echo", messages=[user("Hello")]))
    assert response.usage.input_tokens == short.input_tokens


async def test_count_tokens_unknown_model(stub: pb_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountTokens(pb.CountTokensRequest(model="nope", messages=[user("x")]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_models(stub: pb_grpc.GenerationServiceStub) -> None:
    listed = await stub.ListModels(pb.ListModelsRequest())
    by_id = {m.id: m for m in listed.models}
    assert set(by_id) == {"echo", "tiny"}
    tiny = by_id["tiny"]
    assert tiny.provider == "offline"
    assert list(tiny.aliases) == ["tiny-latest"]
    assert (tiny.context_window, tiny.max_output_tokens) == (1000, 50)
    assert tiny.capabilities.streaming and tiny.capabilities.tools
    assert not (await stub.ListModels(pb.ListModelsRequest(provider="elsewhere"))).models
