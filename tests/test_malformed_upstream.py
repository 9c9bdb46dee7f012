"""An upstream answer the gateway cannot read is the deployment's failure (issue 18, item 2).

A 200 with a cut or non-JSON body, a first event that is not JSON (a proxy's
HTML page with status 200): before any content reached the caller, it is
retried, fallen back from and counted by the circuit breaker like a 5xx, and
when every attempt fails the caller gets UNAVAILABLE, reason
UPSTREAM_PROTOCOL_ERROR, with what was wrong in the ErrorInfo's
`protocol_error`. After content, a broken event ends the stream (no retry).
The HTTP front door's pass-through relay follows the same rule.
"""

from __future__ import annotations

import json

import grpc
import httpx2
import pytest
from google.rpc import error_details_pb2

from llmgateway.v1 import generation_pb2 as pb
from server.routing import BreakerState
from tests.conftest import RunningGateway, detail, rich_status
from tests.event_grammar import check_event_stream
from tests.fake_upstream import FakeUpstream, Reply
from tests.http_fixtures import base_url
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, kinds, stream_all

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
StatusCode = grpc.StatusCode

# Claude first, GPT when Claude cannot answer; two attempts each.
ROUTING = {
    "retry": {"max_attempts": 2, "initial_backoff_s": 0.01},
    "routes": {
        "resilient": [
            {"provider": "anthropic", "model": "claude-test"},
            {"provider": "openai", "model": "gpt-test"},
        ],
    },
}
HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"
# Per provider: a body cut short, and a stream whose first event is not JSON.
CUT_BODY = {
    "anthropic": b'{"id": "msg_1", "type": "mess',
    "openai": b'{"id": "chatcmpl-1", "choi',
}
JUNK_FIRST_EVENT = {
    "anthropic": b"event: message_start\ndata: <html>proxy error</html>\n\n",
    "openai": b"data: <html>proxy error</html>\n\n",
}
# Content first, then an event cut short.
CONTENT_THEN_JUNK = {
    "anthropic": (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","model":"claude-test","content":[],'
        b'"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":0}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_blo\n\n'
    ),
    "openai": (
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant",'
        b'"content":"Hello"}}]}\n\n'
        b'data: {"id":"c1","choi\n\n'
    ),
}
MODELS = {"anthropic": "claude-test", "openai": "gpt-test"}
SINGLE = {"retry": {"max_attempts": 1}}


def paths(fake: FakeUpstream) -> list[str]:
    return [r.path for r in fake.requests]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


@pytest.mark.parametrize(
    "broken",
    [
        Reply(raw_body=CUT_BODY["anthropic"]),
        Reply(raw_body=HTML, raw_content_type="text/html"),
        Reply(raw_body=b"[1, 2]"),
    ],
    ids=["cut", "html", "not-an-object"],
)
async def test_an_unreadable_body_is_retried_then_served_by_the_fallback(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, broken: Reply
) -> None:
    gw = await make_routed_gateway(ROUTING)
    fake.enqueue(broken, broken)
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC, OPENAI]


async def test_a_junk_first_event_is_retried_then_served_by_the_fallback(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(ROUTING)
    junk = Reply(raw_body=JUNK_FIRST_EVENT["anthropic"])
    fake.enqueue(junk, junk)
    events, _ = await stream_all(gw.stub, ask("resilient", "Hi"))
    check_event_stream(events)
    assert events[0].message_start.provider == "openai"
    assert kinds(events).count("message_start") == 1
    assert kinds(events)[-1] == "message_stop"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC, OPENAI]


async def test_an_html_page_to_a_stream_request_falls_back(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({**ROUTING, **SINGLE})
    fake.enqueue(Reply(raw_body=HTML, raw_content_type="text/html"))
    events, _ = await stream_all(gw.stub, ask("resilient", "Hi"))
    assert events[0].message_start.provider == "openai"
    assert paths(fake) == [ANTHROPIC, OPENAI]


async def test_unreadable_answers_open_the_breaker_after_five(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    # The default breaker: five consecutive failures open it.
    gw = await make_routed_gateway({**ROUTING, **SINGLE})
    router = gw.gateway.router
    for count in range(5):
        assert router.breaker_state("anthropic/claude-test") is BreakerState.CLOSED, count
        fake.enqueue(Reply(raw_body=CUT_BODY["anthropic"]))
        response, _ = await generate(gw.stub, ask("resilient", "Hi"))
        assert response.provider == "openai"
    assert router.breaker_state("anthropic/claude-test") is BreakerState.OPEN
    fake.reset()
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert paths(fake) == [OPENAI]  # Claude skipped, not called


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_every_attempt_unreadable_is_unavailable_with_the_protocol_error(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, provider: str, streaming: bool
) -> None:
    gw = await make_routed_gateway({"retry": {"max_attempts": 3, "initial_backoff_s": 0.01}})
    body = JUNK_FIRST_EVENT[provider] if streaming else CUT_BODY[provider]
    fake.enqueue(*[Reply(raw_body=body, request_id="req_bad")] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if streaming:
            await stream_all(gw.stub, ask(MODELS[provider], "Hi"))
        else:
            await gw.stub.Generate(ask(MODELS[provider], "Hi"))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_PROTOCOL_ERROR"
    assert info.metadata["provider"] == provider
    assert info.metadata["protocol_error"].startswith("not JSON: ")
    assert info.metadata["attempts"] == "3"
    assert len(fake.requests) == 3


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_broken_event_after_content_ends_the_stream_without_a_retry(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, provider: str
) -> None:
    gw = await make_routed_gateway({"retry": {"max_attempts": 3, "initial_backoff_s": 0.01}})
    fake.enqueue(Reply(raw_body=CONTENT_THEN_JUNK[provider]))
    call = gw.stub.StreamGenerate(ask(MODELS[provider], "Hi"))
    received: list[pb.StreamGenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            received.append(event)
    texts = [e.content_block_delta.text for e in received if e.HasField("content_block_delta")]
    assert texts == ["Hello"]
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_PROTOCOL_ERROR"
    assert len(fake.requests) == 1


# -- The HTTP front door's pass-through relay ------------------------------------------


async def _post_messages(gw: RunningGateway, **fields: object) -> httpx2.Response:
    body = {
        "model": "resilient",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}],
        **fields,
    }
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(
            base_url(gw) + "/v1/messages",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
        )


async def test_a_relayed_unreadable_body_falls_back(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({**ROUTING, **SINGLE})
    fake.enqueue(Reply(raw_body=HTML, raw_content_type="text/html"))
    response = await _post_messages(gw)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"
    assert paths(fake) == [ANTHROPIC, OPENAI]


async def test_a_relayed_junk_first_event_falls_back(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({**ROUTING, **SINGLE})
    fake.enqueue(Reply(raw_body=JUNK_FIRST_EVENT["anthropic"]))
    response = await _post_messages(gw, stream=True)
    assert response.status_code == 200
    assert b"event: message_stop" in response.content
    assert b"proxy error" not in response.content
    assert paths(fake) == [ANTHROPIC, OPENAI]


async def test_a_relayed_call_with_every_answer_unreadable_is_a_5xx_not_a_500(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(SINGLE)
    fake.enqueue(Reply(raw_body=CUT_BODY["anthropic"]))
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(
            base_url(gw) + "/v1/messages",
            json={
                "model": "claude-test",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "Hi"}],
            },
            headers={"anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "api_error"
    assert "not JSON" in error["message"]
