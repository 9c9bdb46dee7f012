"""Upstream failures as the caller sees them, for both SDK-backed providers.

Every HTTP failure maps to one gRPC status with ErrorInfo (reason, provider,
upstream request id) and RetryInfo where the upstream said when to retry;
mid-stream failures end the stream after the content already sent;
deadlines and cancellation reach the upstream connection; and the
upstream API keys never reach a log line or a caller.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.rpc import error_details_pb2

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.errors import DeadlineExceededError
from server.schema import GenerationRequest, Message, Role, TextBlock
from tests.conftest import RunningGateway, detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.upstream_fixtures import ANTHROPIC_KEY, OPENAI_KEY, ask

MODELS = {"anthropic": "claude-test", "openai": "gpt-test"}
PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
STREAM_ERRORS = {"anthropic": "overloaded_error", "openai": "server_error"}
StatusCode = grpc.StatusCode

CASES = [
    (400, {}, StatusCode.INVALID_ARGUMENT, "UPSTREAM_INVALID_REQUEST"),
    (401, {}, StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED"),
    (403, {}, StatusCode.INTERNAL, "UPSTREAM_AUTH_FAILED"),
    (404, {}, StatusCode.NOT_FOUND, "UPSTREAM_MODEL_NOT_FOUND"),
    (413, {}, StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE"),
    (429, {"retry-after": "7"}, StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
    (500, {}, StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    (502, {}, StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    (503, {"retry-after": "2"}, StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    (529, {}, StatusCode.UNAVAILABLE, "UPSTREAM_OVERLOADED"),
]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    info = detail(rich_status(error), error_details_pb2.RetryInfo)
    if info is None:
        return None
    assert isinstance(info, error_details_pb2.RetryInfo)
    return float(info.retry_delay.ToTimedelta().total_seconds())


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in error.trailing_metadata() or () if isinstance(v, str)}


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize(("status", "headers", "code", "reason"), CASES)
async def test_http_failures_map_to_statuses_with_details(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    provider: str,
    status: int,
    headers: dict[str, str],
    code: grpc.StatusCode,
    reason: str,
) -> None:
    key = ANTHROPIC_KEY if provider == "anthropic" else OPENAI_KEY
    # Even an upstream that quotes the key back must not leak it.
    reply = Reply(
        status=status,
        headers=headers,
        request_id=f"req_{status}",
        error_message=f"failure {status} (key {key})",
        error_param="messages[0].content" if provider == "openai" else None,
    )
    fake.enqueue(reply, reply)
    caplog.set_level(logging.DEBUG)
    for call in (upstream_stub.Generate, upstream_stub.StreamGenerate):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            result = call(ask(MODELS[provider], "Hi", request_id=f"rid-{status}"))
            if call is upstream_stub.StreamGenerate:
                _ = [event async for event in result]  # type: ignore[union-attr]
            else:
                await result  # type: ignore[misc]
        error = caught.value
        assert error.code() == code
        info = error_info(error)
        assert info.reason == reason
        assert info.domain == "llmgateway"
        assert info.metadata["provider"] == provider
        assert info.metadata["upstream_request_id"] == f"req_{status}"
        assert info.metadata["upstream_status"] == str(status)
        assert info.metadata["request_id"] == f"rid-{status}"
        assert trailers(error)["x-upstream-request-id"] == f"req_{status}"
        assert retry_delay(error) == (float(headers["retry-after"]) if headers else None)
        assert key not in (error.details() or "")
        assert key.encode() not in bytes(rich_status(error).SerializeToString())
    assert len(fake.requests) == 2  # no SDK retries
    if status == 400 and provider == "openai":
        bad = detail(rich_status(error), error_details_pb2.BadRequest)
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert bad.field_violations[0].field == "messages[0].content"
    assert key not in caplog.text
    assert f"req_{status}" in caplog.text  # the failure is logged, with its upstream id


async def test_openai_quota_exhaustion_is_not_a_rate_limit(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(status=429, error_type="insufficient_quota", error_code="insufficient_quota")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask("gpt-test", "Hi"))
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "UPSTREAM_QUOTA_EXHAUSTED"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_error_event_mid_stream_ends_the_stream_after_the_content(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str
) -> None:
    # Anthropic: message_start, content_block_start, ping, 2 deltas, then the error.
    # OpenAI: the role chunk, 4 text chunks, then the error chunk.
    after = 5
    fake.enqueue(
        Reply(
            blocks=[Text("one two three four five six")],
            error_after=after,
            stream_error_type=STREAM_ERRORS[provider],
            request_id="req_mid",
        )
    )
    call = upstream_stub.StreamGenerate(ask(MODELS[provider], "Hi"))
    received: list[pb.StreamGenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            received.append(event)
    text = "".join(
        e.content_block_delta.text for e in received if e.HasField("content_block_delta")
    )
    assert text in ("one two ", "one two three four ")
    assert received[0].HasField("message_start")
    assert caught.value.code() == StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == (
        "UPSTREAM_OVERLOADED" if provider == "anthropic" else "UPSTREAM_UNAVAILABLE"
    )
    assert info.metadata["upstream_request_id"] == "req_mid"

    # Generate makes one non-streaming upstream call, so it has no mid-stream:
    # the same overload arrives as an HTTP error and maps to the same status.
    fake.enqueue(Reply(status=529 if provider == "anthropic" else 503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask(MODELS[provider], "Hi"))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert fake.last().body.get("stream") is not True


# A body cut short, and a stream whose first event's data is cut short.
UNREADABLE = {
    "anthropic": (
        b'{"id": "msg_1", "type": "mess',
        b'event: message_start\ndata: {"type": "mes\n\n',
    ),
    "openai": (b'{"id": "chatcmpl-1", "choi', b'data: {"id": "chatcmpl-1", "choi\n\n'),
}


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_an_unreadable_upstream_body_is_an_upstream_protocol_error(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str
) -> None:
    # UNAVAILABLE: the deployment's failure, retried and fallen back from like a
    # 5xx (tests/test_malformed_upstream.py), no longer INTERNAL.
    body, events = UNREADABLE[provider]
    fake.enqueue(Reply(raw_body=body, request_id="req_bad"), Reply(raw_body=events))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask(MODELS[provider], "Hi"))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_PROTOCOL_ERROR"
    assert info.metadata["provider"] == provider
    assert info.metadata["upstream_request_id"] == "req_bad"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [event async for event in upstream_stub.StreamGenerate(ask(MODELS[provider], "Hi"))]
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_PROTOCOL_ERROR"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_connection_reset_mid_stream_is_unavailable(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str
) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three four five six")], reset_after=4))
    call = upstream_stub.StreamGenerate(ask(MODELS[provider], "Hi"))
    received: list[pb.StreamGenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            received.append(event)
    assert any(e.HasField("content_block_delta") for e in received)
    assert caught.value.code() == StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_STREAM_INTERRUPTED"
    assert info.metadata["upstream_request_id"] == "req_fake0001"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_cancelling_the_call_closes_the_upstream_connection(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str
) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.02))
    call = upstream_stub.StreamGenerate(ask(MODELS[provider], "Hi"))
    seen = 0
    async for event in call:
        seen += event.HasField("content_block_delta")
        if seen == 3:
            break
    loop = asyncio.get_running_loop()
    cancelled_at = loop.time()
    call.cancel()
    upstream = fake.last(PATHS[provider])
    await asyncio.wait_for(upstream.finished.wait(), timeout=1.0)
    assert upstream.disconnected
    assert upstream.ended_at is not None and upstream.ended_at - cancelled_at < 1.0


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_deadline_shorter_than_the_upstream_gives_deadline_exceeded(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str
) -> None:
    fake.enqueue(Reply(delay_s=3.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(ask(MODELS[provider], "Hi"), timeout=0.4)
    assert caught.value.code() == StatusCode.DEADLINE_EXCEEDED
    upstream = fake.last(PATHS[provider])
    await asyncio.wait_for(upstream.finished.wait(), timeout=1.0)
    assert upstream.disconnected
    assert loop.time() - started < 1.5
    # The SDK was given the caller's remaining time, not its own default.
    assert 0 < float(upstream.headers["x-stainless-read-timeout"]) <= 0.5


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_the_upstream_timeout_is_the_remaining_deadline(
    upstream_gateway: RunningGateway, fake: FakeUpstream, provider: str
) -> None:
    """The provider maps its SDK's timeout to DeadlineExceededError (no gRPC deadline here)."""
    route = upstream_gateway.gateway.router.resolve(MODELS[provider])
    assert route is not None
    fake.enqueue(Reply(delay_s=2.0))
    loop = asyncio.get_running_loop()
    request = GenerationRequest(
        model=MODELS[provider],
        messages=[Message(Role.USER, [TextBlock("Hi")])],
        max_tokens=10,
        request_id="deadline-1",
        deadline=loop.time() + 0.3,
    )
    started = loop.time()
    with pytest.raises(DeadlineExceededError) as caught:
        async for _ in route.provider.stream(request):
            pass
    assert loop.time() - started < 1.0
    assert caught.value.metadata["provider"] == provider

    request.deadline = loop.time() - 1  # already over: no upstream call at all
    fake.reset()
    with pytest.raises(DeadlineExceededError):
        async for _ in route.provider.stream(request):
            pass
    assert fake.requests == []


async def test_upstream_keys_never_reach_the_logs(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for model in ("claude-test", "gpt-test"):
        await upstream_stub.Generate(ask(model, "Hi"))
        fake.enqueue(Reply(status=401, error_message="invalid x-api-key"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upstream_stub.Generate(ask(model, "Hi"))
        assert caught.value.code() == StatusCode.INTERNAL
        assert "misconfigured" in (caught.value.details() or "")
    assert caplog.records  # the SDKs did log at DEBUG
    assert ANTHROPIC_KEY not in caplog.text
    assert OPENAI_KEY not in caplog.text


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_closing_the_provider_stream_closes_the_upstream_response(
    upstream_gateway: RunningGateway, fake: FakeUpstream, provider: str
) -> None:
    """What the router does when its consumer stops: aclose() between two events."""
    route = upstream_gateway.gateway.router.resolve(MODELS[provider])
    assert route is not None
    words = " ".join(f"w{i}" for i in range(200))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.02))
    request = GenerationRequest(
        model=MODELS[provider],
        messages=[Message(Role.USER, [TextBlock("Hi")])],
        max_tokens=10,
        request_id="close-1",
    )
    events = route.provider.stream(request)
    for _ in range(4):
        await anext(events)
    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    await events.aclose()  # type: ignore[attr-defined]
    upstream = fake.last(PATHS[provider])
    await asyncio.wait_for(upstream.finished.wait(), timeout=1.0)
    assert upstream.disconnected
    assert upstream.ended_at is not None and upstream.ended_at - closed_at < 1.0
