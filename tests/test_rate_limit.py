"""Per-key limits in one process: requests and tokens per minute, concurrent calls.

The per-minute windows themselves, over minutes of traffic, are tested on
the backends in tests/test_quota_window.py.

Each refusal is RESOURCE_EXHAUSTED before any upstream call, with a
QuotaFailure naming the limit, RetryInfo and a `retry-after` trailer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from interceptors.rate_limit import RateLimitInterceptor
from server.accounting import QuotaPolicy
from server.config import BudgetsConfig, LimitsConfig
from server.identity import Identity, KeyLimits
from tests.conftest import detail, request, rich_status
from tests.redis_fixtures import limited_gateway

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def quota_refusal(error: grpc.aio.AioRpcError) -> tuple[str, str, float, str]:
    """(reason, QuotaFailure subject, RetryInfo seconds, retry-after trailer) of a refusal."""
    assert error.code() == RESOURCE_EXHAUSTED, error.details()
    status = rich_status(error)
    info = detail(status, error_details_pb2.ErrorInfo)
    failure = detail(status, error_details_pb2.QuotaFailure)
    retry = detail(status, error_details_pb2.RetryInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(failure, error_details_pb2.QuotaFailure)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    trailers = dict(error.trailing_metadata() or ())
    return (
        info.reason,
        failure.violations[0].subject,
        retry.retry_delay.ToNanoseconds() / 1e9,
        str(trailers.get("retry-after", "")),
    )


async def test_requests_per_minute(tmp_path: Path) -> None:
    async with limited_gateway(tmp_path, **{"limits.default.requests_per_minute": 3}) as gw:
        for _ in range(3):
            await gw.stub.Generate(request())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.Generate(request())
        reason, subject, retry_s, retry_after = quota_refusal(refused.value)
        assert (reason, subject) == ("RATE_LIMIT_EXCEEDED", "key::requests_per_minute")
        # The minute's three calls were at once: room again when the first is
        # a minute old (counted to the end of its second).
        assert 59 < retry_s <= 61
        assert retry_after in ("60", "61")
        # Streams count too, and are refused the same way.
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            [_ async for _ in gw.stub.StreamGenerate(request())]
        assert quota_refusal(streamed.value)[1] == "key::requests_per_minute"


async def test_tokens_per_minute_reserve_then_correct(tmp_path: Path) -> None:
    prompt = "one two three four five"  # 5 tokens + 3 of message overhead: 8 estimated
    async with limited_gateway(tmp_path, **{"limits.default.tokens_per_minute": 100}) as gw:
        # Reserves 8 + 90 = 98 of 100; corrected to 8 + 5 used afterwards.
        await gw.stub.Generate(request(prompt, max_tokens=90))
        await asyncio.sleep(0.05)  # the correction runs just after the call
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.Generate(request(prompt, max_tokens=90))
        reason, subject, retry_s, retry_after = quota_refusal(refused.value)
        assert (reason, subject) == ("RATE_LIMIT_EXCEEDED", "key::tokens_per_minute")
        assert 59 < retry_s <= 61 and retry_after in ("60", "61")
        # Without the correction, 98 would still be held and this would fail.
        await gw.stub.Generate(request(prompt, max_tokens=60))
        # A request that could never fit is refused too, not queued.
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await gw.stub.Generate(request(prompt, max_tokens=200))
        # FAILED_PRECONDITION: no wait would let it through (tests/test_reservations.py).
        assert too_big.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_a_burst_gets_the_minute_and_no_more(tmp_path: Path) -> None:
    """600 calls at once against 300 RPM: exactly 300 (a bucket refilling
    5 a second let more through while the burst ran)."""
    async with limited_gateway(tmp_path, **{"limits.default.requests_per_minute": 300}) as gw:
        codes = await asyncio.gather(*(outcome(gw.stub.Generate(request())) for _ in range(600)))
    assert codes.count(grpc.StatusCode.OK) == 300
    assert codes.count(RESOURCE_EXHAUSTED) == 300


async def outcome(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_concurrency_cap(tmp_path: Path) -> None:
    async with limited_gateway(tmp_path, **{"limits.default.max_concurrent": 2}) as gw:
        # Streams slow enough (2 s) that both still hold their slots when the
        # third call comes, however loaded the machine.
        slow = request("a b c d e f g h", provider_options={"chunk_delay_ms": 250})
        first = gw.stub.StreamGenerate(slow)
        second = gw.stub.StreamGenerate(slow)
        await first.read()
        await second.read()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.Generate(request())
        reason, subject, _, retry_after = quota_refusal(refused.value)
        assert (reason, subject) == ("RATE_LIMIT_EXCEEDED", "key::max_concurrent")
        assert retry_after == "1"
        # A cancelled call gives its slot back, as does one that finishes.
        first.cancel()
        while await second.read() is not grpc.aio.EOF:
            pass
        await asyncio.sleep(0.05)
        await asyncio.gather(gw.stub.Generate(request()), gw.stub.Generate(request()))


def test_no_limits_leave_the_handler_untouched() -> None:
    """The hot path: a key without limits costs one comparison, no wrapper."""
    policy = QuotaPolicy(LimitsConfig(), BudgetsConfig())
    assert policy.limits_for(None) is None
    assert policy.limits_for(Identity("k1", frozenset({"generate"}))) is None
    limited = Identity("k2", frozenset({"generate"}), limits=KeyLimits(requests_per_minute=5))
    resolved = policy.limits_for(limited)
    assert resolved is not None and resolved.requests_per_minute == 5
    assert RateLimitInterceptor.__doc__


def test_limits_precedence() -> None:
    """Config per key, then the key store, then the default; budgets in nano-dollars."""
    policy = QuotaPolicy(
        LimitsConfig.model_validate(
            {"default": {"requests_per_minute": 10}, "keys": {"k1": {"tokens_per_minute": 500}}}
        ),
        BudgetsConfig.model_validate({"default": {"daily_usd": 1.5}}),
    )
    stored = KeyLimits(requests_per_minute=7, tokens_per_minute=900, budget_nanos=3_000_000_000)
    own = policy.limits_for(Identity("k1", frozenset(), limits=stored))
    assert own is not None
    assert (own.requests_per_minute, own.tokens_per_minute) == (7, 500)
    assert (own.daily_nanos, own.monthly_nanos) == (1_500_000_000, 3_000_000_000)
    other = policy.limits_for(Identity("k3", frozenset()))
    assert other is not None and other.requests_per_minute == 10
