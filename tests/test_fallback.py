"""Fallbacks between deployments, and the streaming rule (server/routing/router.py).

A route tries its deployments in order; a failure before any content
reaches the caller moves on to the next one, unseen. After content, a
failure ends the stream with its status: no retry, no fallback, no replay.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, kinds, stream_all

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
StatusCode = grpc.StatusCode

# Claude first, GPT when Claude cannot answer; two attempts each.
ROUTING = {
    "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_retry_after_s": 1},
    "routes": {
        "resilient": [
            {"provider": "anthropic", "model": "claude-test"},
            {"provider": "openai", "model": "gpt-test"},
        ],
    },
}


def paths(fake: FakeUpstream) -> list[str]:
    return [r.path for r in fake.requests]


async def test_unary_falls_back_to_the_other_provider(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    fake.enqueue(Reply(status=500), Reply(status=503))
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert response.model == "gpt-test"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC, OPENAI]


async def test_streaming_falls_back_before_any_content(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    # The second Claude attempt sends message_start and a block start, then
    # dies: both were held back, so the caller sees only GPT's stream.
    fake.enqueue(Reply(status=529), Reply(reset_after=2))
    events, _ = await stream_all(gw.stub, ask("resilient", "Hi"))
    assert kinds(events).count("message_start") == 1
    assert events[0].message_start.provider == "openai"
    assert kinds(events)[-1] == "message_stop"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC, OPENAI]


async def test_no_fallback_for_a_400(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    fake.enqueue(Reply(status=400, error_message="messages: bad"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("resilient", "Hi"))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    assert paths(fake) == [ANTHROPIC]


async def test_refused_credentials_fall_back_without_a_retry(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    fake.enqueue(Reply(status=401))
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert paths(fake) == [ANTHROPIC, OPENAI]


@pytest.mark.parametrize(("model", "after"), [("claude-test", 5), ("gpt-test", 3)])
async def test_a_stream_failing_after_two_chunks_gives_them_then_the_error(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, model: str, after: int
) -> None:
    # Anthropic: message_start, block start, ping, 2 deltas; OpenAI: role chunk, 2 chunks.
    routing = {
        **ROUTING,
        "routes": {
            "first": [
                {"provider": "anthropic" if model == "claude-test" else "openai", "model": model},
                {"provider": "openai", "model": "gpt-test"},
            ]
        },
    }
    gw = await make_routed_gateway(routing)
    fake.enqueue(Reply(blocks=[Text("one two three four")], error_after=after))
    call = gw.stub.StreamGenerate(ask("first", "Hi"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            received.append(event)
    deltas = [e.content_block_delta.text for e in received if e.HasField("content_block_delta")]
    assert deltas == ["one ", "two "]
    assert kinds(received).count("message_start") == 1
    assert caught.value.code() == StatusCode.UNAVAILABLE
    # Neither a retry nor a fallback: content had reached the caller.
    assert len(fake.requests) == 1


async def test_every_deployment_failing_reports_the_most_meaningful_error(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    fake.enqueue(
        # Longer than max_retry_after_s: Claude is abandoned at once.
        Reply(status=429, headers={"retry-after": "30"}),
        Reply(status=503),
        Reply(status=503),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("resilient", "Hi"))
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(caught.value)
    info = detail(status, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "UPSTREAM_RATE_LIMITED"
    assert info.metadata["provider"] == "anthropic"
    assert info.metadata["attempts"] == "3"
    debug = detail(status, error_details_pb2.DebugInfo)
    assert isinstance(debug, error_details_pb2.DebugInfo)
    assert [entry.split(":")[0] for entry in debug.stack_entries] == [
        "anthropic/claude-test",
        "openai/gpt-test",
        "openai/gpt-test",
    ]
    assert paths(fake) == [ANTHROPIC, OPENAI, OPENAI]


async def test_cancel_mid_stream_closes_the_upstream_within_a_second(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    words = " ".join(f"w{i}" for i in range(200))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.02))
    call = gw.stub.StreamGenerate(ask("resilient", "Hi"))
    seen = 0
    async for event in call:
        seen += event.HasField("content_block_delta")
        if seen == 3:
            break
    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    call.cancel()
    upstream = fake.last(ANTHROPIC)
    await asyncio.wait_for(upstream.finished.wait(), timeout=1.0)
    assert upstream.disconnected
    assert upstream.ended_at is not None and upstream.ended_at - cancelled_at < 1.0
    # And nothing was started after it.
    await asyncio.sleep(0.1)
    assert len(fake.requests) == 1
