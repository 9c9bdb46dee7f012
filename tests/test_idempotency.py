"""A repeated request_id gets the first call's answer (issue 18, item 10).

Two calls naming the same request id from the same key within the window
make one upstream call: the repeat replays the first answer (either RPC),
waits for it while it is being made, and costs nothing; a repeat after a
failure is a new attempt; an id reused for a different request, or given
only as x-request-id metadata, is not a repeat.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from clients import GatewayClient
from llmgateway.v1 import generation_pb2 as pb
from server.cache.idempotency import REPLAY, Idempotency
from server.calls import CallRecord
from server.config import IdempotencyConfig, RedisConfig, load_config
from server.routing import Router
from server.schema import GenerationRequest, Message, Role, TextBlock
from tests.conftest import TEST_CONFIG
from tests.fake_upstream import FakeUpstream, Reply, Text, Usage
from tests.upstream_fixtures import RoutedGatewayFactory, ask, fold_stream, generate, stream_all

MESSAGES = "/v1/messages"
CACHE_TRAILER = "x-llmgw-cache"


def upstream_calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path == MESSAGES)


def answer(text: str, **fields: object) -> Reply:
    return Reply(blocks=[Text(text)], usage=Usage(12, 4), **fields)  # type: ignore[arg-type]


async def test_a_repeat_gets_the_first_answer_without_an_upstream_call(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(answer("The first answer."))
    request = ask("claude-test", "Hello", request_id="order-42")
    first, trailers = await generate(gw.stub, request)
    assert trailers.get(CACHE_TRAILER) is None  # not a replay
    assert first.cost.total_nanos > 0
    again, trailers = await generate(gw.stub, request)
    assert upstream_calls(fake) == 1
    assert trailers[CACHE_TRAILER] == REPLAY
    assert again.content == first.content and again.stop_reason == first.stop_reason
    assert again.usage == first.usage
    assert again.cost.total_nanos == 0  # billed once
    # The same id as a stream: the same answer, event by event.
    events, trailers = await stream_all(gw.stub, request)
    assert trailers[CACHE_TRAILER] == REPLAY
    assert fold_stream(events).content == first.content
    assert upstream_calls(fake) == 1


async def test_a_repeat_while_the_first_runs_waits_for_its_answer(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(answer("Slowly made.", event_delay_s=0.05))
    request = ask("claude-test", "Hello", request_id="order-43")
    (one, _), (two, _) = await asyncio.gather(
        stream_all(gw.stub, request), stream_all(gw.stub, request)
    )
    assert upstream_calls(fake) == 1
    assert fold_stream(one).content == fold_stream(two).content


async def test_a_repeat_after_a_failure_is_a_new_attempt(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({"retry": {"max_attempts": 1}})
    fake.enqueue(Reply(status=529))
    request = ask("claude-test", "Hello", request_id="order-44")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await generate(gw.stub, request)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    fake.enqueue(answer("Second time lucky."))
    retried, trailers = await generate(gw.stub, request)
    assert retried.content[0].text == "Second time lucky."
    assert trailers.get(CACHE_TRAILER) is None
    assert upstream_calls(fake) == 2


async def test_what_is_not_a_repeat_runs_as_a_new_call(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    # The same id for another request (a correlation id reused): a new call.
    fake.enqueue(answer("One."))
    fake.enqueue(answer("Two."))
    one, _ = await generate(gw.stub, ask("claude-test", "First", request_id="flow-7"))
    two, trailers = await generate(gw.stub, ask("claude-test", "Second", request_id="flow-7"))
    assert (one.content[0].text, two.content[0].text) == ("One.", "Two.")
    assert trailers.get(CACHE_TRAILER) is None
    # An id in the x-request-id metadata only correlates: proxies set it on every call.
    fake.enqueue(answer("Three."))
    fake.enqueue(answer("Four."))
    request = ask("claude-test", "Third")
    for expected in ("Three.", "Four."):
        call = gw.stub.Generate(request, metadata=(("x-request-id", "proxy-1"),))
        assert (await call).content[0].text == expected
    assert upstream_calls(fake) == 4


async def test_request_ids_are_scoped_by_key() -> None:
    config = load_config(environ={}, overrides=TEST_CONFIG)
    router = Router.from_config(config)
    route = router.resolve("echo")
    assert route is not None
    store = Idempotency(IdempotencyConfig(), RedisConfig())
    request = GenerationRequest(
        model="echo",
        messages=[Message(Role.USER, [TextBlock("Hello")])],
        max_tokens=20,
        request_id="same-id",
    )

    async def call(key_id: str) -> str:
        record = CallRecord(method="Generate", request_id="same-id", key_id=key_id)
        opened = await store.open(record, request, route, protocol="grpc")
        assert opened is not None
        try:
            async for _ in opened.events(request, route, router.stream):
                pass
        finally:
            await opened.close()
        return record.cache

    assert await call("key-a") == ""
    assert await call("key-a") == REPLAY
    assert await call("key-b") == ""  # another key's id is not this one's
    await store.aclose()
    await router.aclose()


async def test_a_client_retry_after_a_lost_answer_gets_that_answer(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    # The client names every call it may retry, so a retry of a call whose
    # answer was lost on the way (here: dropped after it arrived) is a repeat.
    gw = await make_routed_gateway({})
    fake.enqueue(answer("Made once."))
    lost: list[str] = []
    async with GatewayClient(gw.address, max_retries=2) as client:
        real = client._stub.Generate

        async def loses_the_first_answer(request: pb.GenerateRequest, **kwargs: Any) -> Any:
            response = await real(request, **kwargs)
            if not lost:
                lost.append(request.request_id)
                empty = grpc.aio.Metadata()
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, empty, empty, "reset")
            return response

        client._stub.Generate = loses_the_first_answer  # type: ignore[method-assign]
        response = await client.generate("claude-test", "Hello")
        assert response.content[0].text == "Made once."
        assert upstream_calls(fake) == 1
        assert lost[0] and response.request_id == lost[0]
        # Two calls are two calls: each gets an id of its own.
        fake.enqueue(answer("Made twice."))
        second = await client.generate("claude-test", "Hello")
        assert second.content[0].text == "Made twice."
        assert second.request_id != lost[0]
