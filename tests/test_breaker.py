"""Circuit breakers per deployment (server/routing/breaker.py), alone and in a route."""

from __future__ import annotations

import logging

import pytest

from server.routing import BreakerState, CircuitBreaker
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
