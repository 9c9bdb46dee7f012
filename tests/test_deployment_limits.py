"""Rate limits per upstream deployment (server/routing/deployment_limits.py).

A deployment at the limit its provider gives us is queued for a moment or
skipped for the next one; when none can take the call, the caller gets
RESOURCE_EXHAUSTED and the fake upstream sees no request at all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from server.config import ConfigError
from server.routing.breaker import BreakerState
from server.routing.deployment_limits import RateLimits, limiters
from server.schema import Message, Role, TextBlock
from server.token_estimate import count_request
from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, provider_config

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
CLAUDE = "anthropic/claude-test"
StatusCode = grpc.StatusCode
# Claude's tokens per minute in the token tests: 100 a second come back.
TPM = 6_000
# What the gateway estimates "Hi" at (input tokens).
HI = count_request([], [Message(Role.USER, [TextBlock("Hi")])], [])


def limited_claude(fake: FakeUpstream, **limits: int) -> dict[str, Any]:
    """The test providers, with rate limits on Claude's model entry."""
    providers = provider_config(fake)
    providers["anthropic"]["models"][0].update(limits)
    return providers


def quota_failure(error: grpc.aio.AioRpcError) -> tuple[str, list[str], float]:
    """The error's reason, its QuotaFailure subjects and its RetryInfo delay (seconds)."""
    status = rich_status(error)
    info = detail(status, error_details_pb2.ErrorInfo)
    failure = detail(status, error_details_pb2.QuotaFailure)
    retry = detail(status, error_details_pb2.RetryInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(failure, error_details_pb2.QuotaFailure)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    subjects = [v.subject for v in failure.violations]
    return info.reason, subjects, retry.retry_delay.ToNanoseconds() / 1e9


async def test_a_third_call_within_the_minute_is_refused_before_the_upstream(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(
        {"breaker": {"failure_threshold": 1}},
        providers=limited_claude(fake, requests_per_minute=2),
    )
    for _ in range(2):
        await generate(gw.stub, ask("claude-test", "Hi"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"))
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    reason, subjects, retry_after = quota_failure(caught.value)
    assert reason == "DEPLOYMENT_RATE_LIMITED"
    assert subjects == [f"deployment:{CLAUDE}:rpm"]
    # Two a minute: one comes back every 30 s.
    assert 25 < retry_after <= 30
    assert ("retry-after", "30") in list(caught.value.trailing_metadata() or ())
    assert len(fake.requests) == 2
    # Our own limit says nothing about Claude's health.
    assert gw.gateway.router.breaker_state(CLAUDE) is BreakerState.CLOSED


async def test_the_overflow_of_a_limited_deployment_goes_to_the_next(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(
        {
            "breaker": {"failure_threshold": 1},
            "routes": {
                "limited": [
                    {"provider": "anthropic", "model": "claude-test", "requests_per_minute": 1},
                    {"provider": "openai", "model": "gpt-test"},
                ],
            },
        }
    )
    first, _ = await generate(gw.stub, ask("limited", "Hi"))
    second, _ = await generate(gw.stub, ask("limited", "Hi"))
    assert (first.provider, second.provider) == ("anthropic", "openai")
    assert [r.path for r in fake.requests] == [ANTHROPIC, OPENAI]
    assert gw.gateway.router.breaker_state(CLAUDE) is BreakerState.CLOSED


async def test_a_short_queue_wait_succeeds_when_capacity_frees_up_in_time(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(
        {"deployment_queue_s": 2}, providers=limited_claude(fake, tokens_per_minute=TPM)
    )
    # The first call leaves room for HI + 70 tokens; the second needs 30 more.
    await generate(gw.stub, ask("claude-test", "Hi", max_tokens=TPM - 2 * HI - 70))
    loop = asyncio.get_running_loop()
    started = loop.time()
    response, _ = await generate(gw.stub, ask("claude-test", "Hi", max_tokens=100))
    waited = loop.time() - started
    assert response.provider == "anthropic"
    assert 0.2 <= waited < 1.5  # 30 tokens at 100 a second, less the first call's time
    assert len(fake.requests) == 2


async def test_the_queue_never_outlives_the_callers_deadline(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(
        {"deployment_queue_s": 30}, providers=limited_claude(fake, tokens_per_minute=TPM)
    )
    await generate(gw.stub, ask("claude-test", "Hi", max_tokens=TPM - HI))
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Room for 200 tokens comes back in 2 s: more than the caller has.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi", max_tokens=200 - HI), timeout=0.5)
    assert loop.time() - started < 0.4  # refused at once, not after a vain wait
    assert caught.value.code() == StatusCode.RESOURCE_EXHAUSTED
    reason, subjects, retry_after = quota_failure(caught.value)
    assert (reason, subjects) == ("DEPLOYMENT_RATE_LIMITED", [f"deployment:{CLAUDE}:tpm"])
    assert 1.5 < retry_after <= 2
    assert len(fake.requests) == 1


def test_a_route_deployment_overrides_the_model_entry_field_by_field() -> None:
    table = limiters(
        {CLAUDE: RateLimits(10, 1_000)},
        [("routing.routes.a[0]", CLAUDE, RateLimits(requests_per_minute=5))],
    )
    assert table[CLAUDE].limits == RateLimits(5, 1_000)


def test_two_routes_may_not_give_one_deployment_different_limits() -> None:
    routed = [
        ("routing.routes.a[0]", CLAUDE, RateLimits(requests_per_minute=5)),
        ("routing.routes.b[1]", CLAUDE, RateLimits(requests_per_minute=6)),
    ]
    with pytest.raises(ConfigError, match=r"routing\.routes\.b\[1\].*routing\.routes\.a\[0\]"):
        limiters({}, routed)
