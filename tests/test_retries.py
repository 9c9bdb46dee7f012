"""Retries against the fault-injecting fake upstream (server/routing/router.py, retry.py).

Retryable failures (429, 5xx, 529, connection resets, an attempt's own
timeout) are retried with backoff within the caller's deadline; the caller
sees one clean response, and the fake upstream counts the attempts.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from google.rpc import error_details_pb2

from server.config import RetryConfig
from server.errors import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    QuotaExhaustedError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamModelNotFoundError,
    UpstreamOverloadedError,
    UpstreamStreamInterruptedError,
)
from server.routing.attempt_timeouts import AttemptTimeoutError
from server.routing.retry import Backoff, Remedy, meaningfulness, remedy_for
from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, kinds, stream_all

PATHS = {"claude-test": "/v1/messages", "gpt-test": "/v1/chat/completions"}
StatusCode = grpc.StatusCode


def attempts_of(error: grpc.aio.AioRpcError) -> list[str]:
    info = detail(rich_status(error), error_details_pb2.DebugInfo)
    assert isinstance(info, error_details_pb2.DebugInfo)
    return list(info.stack_entries)


def reason_of(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info.reason, dict(info.metadata)


def count(fake: FakeUpstream, model: str) -> int:
    return sum(1 for r in fake.requests if r.path == PATHS[model])


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
async def test_429_with_retry_after_then_success(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, model: str
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(status=429, headers={"retry-after": "0.3"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    events, _ = await stream_all(gw.stub, ask(model, "Hi"))
    assert kinds(events)[0] == "message_start" and kinds(events)[-1] == "message_stop"
    assert kinds(events).count("message_start") == 1
    assert count(fake, model) == 2
    # The retry-after was honoured, not a shorter backoff.
    assert loop.time() - started >= 0.3


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
async def test_500_twice_then_success(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, model: str
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(status=500), Reply(status=500))
    response, _ = await generate(gw.stub, ask(model, "Hi"))
    assert response.content[0].text == "Hello from the fake upstream."
    assert count(fake, model) == 3


async def test_529_overloaded_then_success(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(status=529))
    events, _ = await stream_all(gw.stub, ask("claude-test", "Hi"))
    assert kinds(events)[-1] == "message_stop"
    assert count(fake, "claude-test") == 2


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
async def test_connection_reset_before_content_is_retried_invisibly(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream, model: str
) -> None:
    # One event (message_start, or OpenAI's role chunk) is sent before the reset:
    # it was held back, so the caller sees one message_start, not two.
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(reset_after=1))
    events, _ = await stream_all(gw.stub, ask(model, "Hi"))
    assert kinds(events).count("message_start") == 1
    text = "".join(e.content_block_delta.text for e in events if e.HasField("content_block_delta"))
    assert text == "Hello from the fake upstream."
    assert count(fake, model) == 2


async def test_exhausted_retries_report_the_most_meaningful_error_with_attempts(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(
        Reply(status=503),
        Reply(status=429, headers={"retry-after": "0.01"}),
        Reply(status=503),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"))
    # The 429 says more (when to come back) than the 503s around it.
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    reason, metadata = reason_of(caught.value)
    assert reason == "UPSTREAM_RATE_LIMITED"
    assert metadata["attempts"] == "3"
    attempts = attempts_of(caught.value)
    assert [a.split(": ")[1].split(" ")[0] for a in attempts] == [
        "UPSTREAM_UNAVAILABLE",
        "UPSTREAM_RATE_LIMITED",
        "UPSTREAM_UNAVAILABLE",
    ]
    assert all(a.startswith("anthropic/claude-test: ") for a in attempts)
    assert count(fake, "claude-test") == 3


async def test_a_400_is_not_retried(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(status=400))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("gpt-test", "Hi"))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    assert count(fake, "gpt-test") == 1


async def test_hang_beyond_the_deadline_is_deadline_exceeded_in_time(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(delay_s=3.0), Reply(delay_s=3.0), Reply(delay_s=3.0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"), timeout=0.5)
    assert caught.value.code() == StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 0.5 + 0.4
    first = fake.requests[0]
    await asyncio.wait_for(first.finished.wait(), timeout=1.0)
    assert first.disconnected
    # No retry may start once the caller's budget is spent.
    await asyncio.sleep(0.2)
    assert count(fake, "claude-test") == 1


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway({})
    fake.enqueue(Reply(status=429, headers={"retry-after": "5"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"), timeout=2.0)
    # The 429 itself, at once, with its RetryInfo: not a sleep into DEADLINE_EXCEEDED.
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    assert loop.time() - started < 1.0
    assert count(fake, "claude-test") == 1


async def test_an_attempt_timeout_is_retried_within_the_deadline(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    retry = {"max_attempts": 2, "initial_backoff_s": 0.01, "attempt_timeout_s": 0.3}
    gw = await make_routed_gateway({"retry": retry})
    fake.enqueue(Reply(delay_s=2.0))
    response, _ = await generate(gw.stub, ask("gpt-test", "Hi"))
    assert response.content[0].text == "Hello from the fake upstream."
    assert count(fake, "gpt-test") == 2
    # The SDK was given the attempt's budget, not the caller's or its own default.
    assert 0 < float(fake.requests[0].headers["x-stainless-read-timeout"]) <= 0.3


# -- the policy alone -------------------------------------------------------------


def test_what_each_failure_may_cure() -> None:
    assert remedy_for(RateLimitedError("x"), deadline_passed=False) is Remedy.RETRY
    assert remedy_for(UpstreamOverloadedError("x"), deadline_passed=False) is Remedy.RETRY
    interrupted = UpstreamStreamInterruptedError("x")
    assert remedy_for(interrupted, deadline_passed=False) is Remedy.RETRY
    assert remedy_for(DeadlineExceededError("x"), deadline_passed=False) is Remedy.RETRY
    assert remedy_for(DeadlineExceededError("x"), deadline_passed=True) is Remedy.NONE
    # Silent past its bound: the next deployment, not the same one again.
    assert remedy_for(AttemptTimeoutError("x"), deadline_passed=False) is Remedy.FALLBACK
    assert remedy_for(UpstreamAuthError("x"), deadline_passed=False) is Remedy.FALLBACK
    assert remedy_for(QuotaExhaustedError("x"), deadline_passed=False) is Remedy.FALLBACK
    bad = InvalidArgumentError([FieldViolation("messages", "bad")])
    assert remedy_for(bad, deadline_passed=False) is Remedy.NONE
    assert remedy_for(UpstreamModelNotFoundError("x"), deadline_passed=False) is Remedy.NONE
    assert remedy_for(ValueError("bug"), deadline_passed=False) is Remedy.NONE


def test_a_429_outranks_generic_unavailability() -> None:
    rate_limited = RateLimitedError("x")
    generic = UpstreamStreamInterruptedError("x")
    assert meaningfulness(rate_limited) > meaningfulness(generic)


def test_backoff_is_full_jitter_under_an_exponential_ceiling_and_honours_retry_after() -> None:
    backoff = Backoff(
        RetryConfig(initial_backoff_s=0.1, max_backoff_s=1.0, max_retry_after_s=10),
        random.Random(7),
    )
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 1.0)):
        delays = [backoff.delay(retry, None) for _ in range(200)]
        assert all(d is not None and 0 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) > ceiling * 0.8  # spread, not fixed
    assert backoff.delay(1, 2.5) == 2.5
    assert backoff.delay(1, 11.0) is None  # too long: fall back instead
