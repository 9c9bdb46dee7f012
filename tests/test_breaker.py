"""Circuit breakers per deployment (server/routing/breaker.py), alone and in a route."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2

from server.routing import BreakerState, CircuitBreaker
from server.routing.breaker import HALF_OPEN_RETRY_S
from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply
from tests.upstream_fixtures import ManualClock, RoutedGatewayFactory, ask, generate

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"


def test_opens_after_n_consecutive_failures_and_half_opens_after_recovery() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("p/m", failure_threshold=3, recovery_s=60, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.allow()
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.advance(59)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.record_failure()  # the probe failed: open again, for a full recovery time
    assert breaker.state is BreakerState.OPEN
    clock.advance(60)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_calls_that_say_nothing_about_the_deployment_free_the_probe() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("p/m", failure_threshold=1, recovery_s=1, clock=clock)
    assert breaker.allow()
    breaker.record_failure()
    clock.advance(1)
    assert breaker.allow()
    breaker.release()  # e.g. the caller's 400, or a cancel
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()


async def test_a_route_skips_an_open_deployment_then_probes_it(
    make_routed_gateway: RoutedGatewayFactory,
    fake: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.routing.breaker")
    clock = ManualClock()
    routing = {
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": 2, "recovery_s": 30},
        "routes": {
            "resilient": [
                {"provider": "anthropic", "model": "claude-test"},
                {"provider": "openai", "model": "gpt-test"},
            ]
        },
    }
    gw = await make_routed_gateway(routing, clock=clock)
    router = gw.gateway.router

    # A client error does not count.
    fake.enqueue(Reply(status=400))
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        await generate(gw.stub, ask("resilient", "Hi"))
    for _ in range(2):
        fake.enqueue(Reply(status=500))
        response, _ = await generate(gw.stub, ask("resilient", "Hi"))
        assert response.provider == "openai"
    assert router.breaker_state("anthropic/claude-test") is BreakerState.OPEN
    assert "anthropic/claude-test: closed -> open" in caplog.text

    fake.reset()
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "openai"
    assert [r.path for r in fake.requests] == [OPENAI]  # Claude skipped, not called

    clock.advance(30)
    fake.reset()
    response, _ = await generate(gw.stub, ask("resilient", "Hi"))
    assert response.provider == "anthropic"  # the probe, and it succeeded
    assert [r.path for r in fake.requests] == [ANTHROPIC]
    assert router.breaker_state("anthropic/claude-test") is BreakerState.CLOSED
    assert "anthropic/claude-test: half_open -> closed" in caplog.text


async def test_every_deployment_open_is_unavailable_circuit_open(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    import grpc

    routing = {"retry": {"max_attempts": 1}, "breaker": {"failure_threshold": 1}}
    gw = await make_routed_gateway(routing, clock=ManualClock())
    fake.enqueue(Reply(status=503))
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(ask("gpt-test", "Hi"))
    fake.reset()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("gpt-test", "Hi"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "is failing" in (caught.value.details() or "")
    assert fake.requests == []


def test_next_probe_in_counts_down_the_open_time() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("p/m", failure_threshold=1, recovery_s=30, clock=clock)
    assert breaker.next_probe_in() is None  # closed: no wait
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.next_probe_in() == 30
    clock.advance(20)
    assert breaker.next_probe_in() == 10
    clock.advance(10)
    assert breaker.allow()  # the probe
    assert breaker.next_probe_in() == HALF_OPEN_RETRY_S  # its outcome decides


async def test_circuit_open_says_when_the_next_probe_is(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    clock = ManualClock()
    routing = {
        "retry": {"max_attempts": 1},
        "breaker": {"failure_threshold": 1, "recovery_s": 30},
        "routes": {
            "resilient": [
                {"provider": "anthropic", "model": "claude-test"},
                {"provider": "openai", "model": "gpt-test"},
            ]
        },
    }
    gw = await make_routed_gateway(routing, clock=clock)
    fake.enqueue(Reply(status=500), Reply(status=503))
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(ask("resilient", "Hi"))
    clock.advance(12)
    fake.reset()
    for call in (gw.stub.Generate, gw.stub.StreamGenerate):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(call(ask("resilient", "Hi")))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rich_status(caught.value)
        info = detail(status, error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert info.reason == "CIRCUIT_OPEN"
        retry = detail(status, error_details_pb2.RetryInfo)
        assert isinstance(retry, error_details_pb2.RetryInfo)
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 30
        assert delay == pytest.approx(18)  # both opened at the same time, 12 s ago
        trailers = dict(caught.value.trailing_metadata() or ())
        assert trailers["retry-after"] == "18"
    assert fake.requests == []


async def _drain(call: object) -> None:
    if hasattr(call, "__aiter__"):
        _ = [event async for event in call]  # type: ignore[attr-defined]
    else:
        await call  # type: ignore[misc]
