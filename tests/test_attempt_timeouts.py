"""A silent upstream leaves time for the fallback (server/routing/attempt_timeouts.py).

Before content an attempt is bounded (first token for a stream, the whole
answer for a unary call, and the share of the caller's deadline the fallback
keeps); a timed-out attempt falls back and counts against the breaker.
After content only the silence between events is bounded, and it ends the
stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from server.config import RetryConfig
from server.routing.attempt_timeouts import UpstreamWatch, content_bound, deployment_budget_end
from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, kinds, stream_all

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
StatusCode = grpc.StatusCode


def claude_then_gpt(**retry: Any) -> dict[str, Any]:
    return {
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, **retry},
        "routes": {
            "resilient": [
                {"provider": "anthropic", "model": "claude-test"},
                {"provider": "openai", "model": "gpt-test"},
            ]
        },
    }


def reason(error: grpc.aio.AioRpcError) -> str:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info.reason


@pytest.mark.parametrize("streaming", [True, False])
async def test_a_hung_primary_reaches_the_fallback_inside_a_5s_deadline(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, streaming: bool
) -> None:
    # The default bounds: only the fallback's share of the deadline ends the wait.
    gw = await make_routed_gateway(claude_then_gpt())
    fake.enqueue(Reply(delay_s=30))  # accepts the call and says nothing
    loop = asyncio.get_running_loop()
    started = loop.time()
    if streaming:
        events = [e async for e in gw.stub.StreamGenerate(ask("resilient", "Hi"), timeout=5)]
        assert events[0].message_start.provider == "openai"
        assert kinds(events)[-1] == "message_stop"
    else:
        response = await gw.stub.Generate(ask("resilient", "Hi"), timeout=5)
        assert response.provider == "openai"
    elapsed = loop.time() - started
    # Half of the 5 s for Claude, the rest left for GPT.
    assert 2.0 < elapsed < 4.5
    assert [r.path for r in fake.requests][:2] == [ANTHROPIC, OPENAI]
    await asyncio.wait_for(fake.requests[0].finished.wait(), 2)
    assert fake.requests[0].disconnected


async def test_a_silent_primary_without_a_deadline_falls_back_after_its_first_token_bound(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    routing = {**claude_then_gpt(first_token_timeout_s=0.3), "breaker": {"failure_threshold": 1}}
    gw = await make_routed_gateway(routing)
    fake.enqueue(Reply(delay_s=5))
    events, _ = await stream_all(gw.stub, ask("resilient", "Hi"))
    assert events[0].message_start.provider == "openai"
    # No retry of the silent deployment: the fallback's time is not spent on it.
    assert [r.path for r in fake.requests] == [ANTHROPIC, OPENAI]
    # Counted against the deployment: its circuit opened.
    assert gw.gateway.router.breaker_state("anthropic/claude-test").value == "open"


async def test_a_unary_call_is_bounded_as_a_whole(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(claude_then_gpt(unary_timeout_s=0.3))
    fake.enqueue(Reply(delay_s=5))
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert [r.path for r in fake.requests] == [ANTHROPIC, OPENAI]


async def test_a_lone_silent_deployment_is_unavailable_with_upstream_timeout(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({"retry": {"max_attempts": 3, "first_token_timeout_s": 0.3}})
    fake.enqueue(Reply(delay_s=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream_all(gw.stub, ask("claude-test", "Hi"))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert reason(caught.value) == "UPSTREAM_TIMEOUT"
    assert "no content within 0.3s" in caught.value.details()
    assert len(fake.requests) == 1


async def test_silence_after_content_ends_the_stream_without_a_fallback(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(claude_then_gpt(stream_idle_timeout_s=0.3))
    fake.enqueue(Reply(blocks=[Text("one two three")], event_delay_s=1.0))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in gw.stub.StreamGenerate(ask("resilient", "Hi")):
            received.append(event)
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert reason(caught.value) == "UPSTREAM_TIMEOUT"
    assert "in the middle of the stream" in caught.value.details()
    assert [r.path for r in fake.requests] == [ANTHROPIC]


async def test_slow_events_within_the_idle_bound_are_not_cut(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(claude_then_gpt(stream_idle_timeout_s=0.5))
    fake.enqueue(Reply(blocks=[Text("one two three four")], event_delay_s=0.15))
    events, _ = await stream_all(gw.stub, ask("resilient", "Hi"))
    deltas = [e.content_block_delta.text for e in events if e.HasField("content_block_delta")]
    assert "".join(deltas) == "one two three four"


# -- the policy alone -------------------------------------------------------------


def test_the_bounds_of_an_attempt() -> None:
    config = RetryConfig()
    assert content_bound(config, True, 100.0, None) == 100.0 + 180.0
    assert content_bound(config, False, 100.0, None) == 100.0 + 600.0
    assert content_bound(config, True, 100.0, 110.0) == 110.0
    # A fallback may follow, and the caller has 10 s left: half of them.
    assert deployment_budget_end(config, 100.0, 110.0, further=True) == 105.0
    assert deployment_budget_end(config, 100.0, 110.0, further=False) is None
    assert deployment_budget_end(config, 100.0, None, further=True) is None
    off = RetryConfig(fallback_reserve=0, first_token_timeout_s=None)
    assert deployment_budget_end(off, 100.0, 110.0, further=True) is None
    assert content_bound(off, True, 100.0, None) is None


async def test_the_watch_tells_its_own_timeout_from_the_callers_cancel() -> None:
    loop = asyncio.get_running_loop()

    async def wait(watch: UpstreamWatch, bound: float) -> str:
        watch.expect(loop.time() + bound)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if watch.timed_out():
                return "timed out"
            raise
        finally:
            watch.close()
        return "done"

    assert await wait(UpstreamWatch(loop), 0.05) == "timed out"
    task = asyncio.ensure_future(wait(UpstreamWatch(loop), 5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
