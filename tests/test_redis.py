"""Limits shared through a real Redis: one global limit across gateway processes.

The suite starts its own redis-server (tests/redis_fixtures.py) for each test
and stops it; `make test` installs the binary.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from llmgateway.v1 import usage_pb2
from server.accounting import BudgetAlert
from server.accounting.quotas import budget_key
from tests.conftest import request, start_server_process
from tests.redis_fixtures import LimitedGateway, RedisServer, limited_gateway, redis_server
from tests.test_budget import CALL_NANOS, FITS_TEN, PROMPT, outcome

OK = grpc.StatusCode.OK


async def test_three_processes_hold_one_global_rpm(tmp_path: Path) -> None:
    rpm = 300
    async with redis_server(tmp_path) as redis:
        env = {
            "LLMGW_LIMITS__BACKEND": "redis",
            "LLMGW_REDIS__URL": redis.url,
            "LLMGW_LIMITS__DEFAULT__REQUESTS_PER_MINUTE": str(rpm),
            "LLMGW_LEDGER__ENABLED": "false",
            # On a loaded machine a Redis reply can take longer than the 0.25 s
            # default, and failing open would let that call through uncounted:
            # this test is about the window, not about Redis being slow.
            "LLMGW_REDIS__TIMEOUT_S": "5",
            "LLMGW_REDIS__FAILURE_MODE": "closed",
        }
        servers = await asyncio.gather(*(start_server_process(env=env) for _ in range(3)))
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
        try:
            stubs = [pb_grpc.GenerationServiceStub(c) for c in channels]
            started = time.monotonic()
            calls = [
                stub.Generate(request()) for stub, _ in zip(itertools.cycle(stubs), range(2 * rpm))
            ]
            codes = await asyncio.gather(*(outcome_of(c) for c in calls))
            elapsed = time.monotonic() - started
        finally:
            for channel in channels:
                await channel.close()
            for server in servers:
                server.process.terminate()
            await asyncio.gather(*(s.process.wait() for s in servers))
        # Exactly the minute's worth, however long the burst took (a bucket
        # refilling rpm/60 a second let more through meanwhile).
        assert codes.count(grpc.StatusCode.OK) == rpm, elapsed
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == rpm


async def outcome_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def shared_redis(redis: RedisServer) -> dict[str, object]:
    """Limits in `redis`, with time for a fresh Redis's first command on a loaded
    machine: at the 0.25 s default a timeout fails open and lets a call through
    uncounted, which these exact counts would catch as a bug that is not one."""
    return {"limits.backend": "redis", "redis.url": redis.url, "redis.timeout_s": 2.0}


async def test_budget_race_across_replicas(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as redis:
        shared = {**shared_redis(redis), **FITS_TEN}
        async with (
            limited_gateway(tmp_path, **shared) as one,
            limited_gateway(tmp_path, **shared) as two,
            limited_gateway(tmp_path, **shared) as three,
        ):
            stubs = itertools.cycle([one.stub, two.stub, three.stub])
            calls = [next(stubs).Generate(request(PROMPT, max_tokens=10)) for _ in range(100)]
            codes = await asyncio.gather(*(outcome(c) for c in calls))
            assert codes.count(grpc.StatusCode.OK) == 10
            await asyncio.sleep(0.1)
            [state] = await one.gateway.accounting.admission.budget_state(
                "", one.gateway.accounting.policy.limits_for_key("")
            )
            assert state[1:] == (10 * CALL_NANOS, 0)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_down_fails_as_configured(tmp_path: Path, mode: str) -> None:
    async with redis_server(tmp_path) as redis:
        settings = {
            "limits.backend": "redis",
            "redis.url": redis.url,
            "redis.failure_mode": mode,
            # Long enough for a fresh Redis's first command on a loaded machine
            # (at 0.2 s the first take timed out once in CI and, failing open,
            # went uncounted); a stopped Redis refuses connections at once.
            "redis.timeout_s": 1.0,
            "limits.default.requests_per_minute": 2,
        }
        async with limited_gateway(tmp_path, **settings) as gw:
            await gw.stub.Generate(request())
            await gw.stub.Generate(request())
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await gw.stub.Generate(request())
            assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            await redis.stop()
            for _ in range(3):
                started = time.monotonic()
                code = await outcome_of(gw.stub.Generate(request(), timeout=5))
                assert time.monotonic() - started < 2, "a call hung on the dead Redis"
                if mode == "open":
                    assert code is grpc.StatusCode.OK
                else:
                    assert code is grpc.StatusCode.UNAVAILABLE
            backend = gw.gateway.accounting.backend
            assert getattr(backend, "failures", 0) >= 3


async def spent(gw: LimitedGateway) -> int:
    budget = await gw.usage.GetBudget(usage_pb2.GetBudgetRequest(key_id=""))
    return budget.budgets[0].spent_nanos


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_an_exhausted_budget_stays_exhausted_when_redis_comes_back_empty(
    tmp_path: Path, loss: str
) -> None:
    alerts: list[BudgetAlert] = []
    async with redis_server(tmp_path) as redis:
        shared = {**shared_redis(redis), **FITS_TEN}
        async with limited_gateway(tmp_path, **shared) as gw:
            gw.gateway.accounting.admission.alert_hooks.append(alerts.append)
            for _ in range(10):
                assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) is OK
            await asyncio.sleep(0.1)  # settled, alerts fired
            assert sorted(a.threshold for a in alerts) == [0.5, 0.8, 0.95]
            if loss == "flushall":
                client = aioredis.Redis.from_url(redis.url)
                await client.flushall()
                await client.aclose()
            else:
                await redis.restart()
            # Rebuilt from the ledger: ten more calls are refused, not served.
            for _ in range(10):
                code = await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10)))
                assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await spent(gw) == 10 * CALL_NANOS
            await asyncio.sleep(0.1)
    # And no alert fired twice.
    assert sorted(a.threshold for a in alerts) == [0.5, 0.8, 0.95]


async def test_a_call_in_flight_when_redis_empties_counts_once(tmp_path: Path) -> None:
    """Reserved before the loss, settled after it: the ledger's nine calls
    and this one, not this one alone (nor twice); its own alert fires once."""
    alerts: list[BudgetAlert] = []
    async with redis_server(tmp_path) as redis:
        shared = {**shared_redis(redis), **FITS_TEN}
        async with limited_gateway(tmp_path, **shared) as gw:
            gw.gateway.accounting.admission.alert_hooks.append(alerts.append)
            for _ in range(9):
                assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) is OK
            await asyncio.sleep(0.1)
            assert sorted(a.threshold for a in alerts) == [0.5, 0.8]
            slow = request(PROMPT, max_tokens=10, provider_options={"chunk_delay_ms": 20})
            stream = gw.stub.StreamGenerate(slow)
            await stream.read()
            client = aioredis.Redis.from_url(redis.url)
            await client.flushall()
            await client.aclose()
            while await stream.read() is not grpc.aio.EOF:
                pass
            await asyncio.sleep(0.2)
            assert await spent(gw) == 10 * CALL_NANOS
            code = await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10)))
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(a.threshold for a in alerts) == [0.5, 0.8, 0.95]


async def test_reconcile_raises_a_spend_redis_lost(tmp_path: Path) -> None:
    """A settle that never reached Redis is caught up from the ledger."""
    async with redis_server(tmp_path) as redis:
        shared = {
            **shared_redis(redis),
            # Long enough that a reconcile rarely lands between losing the settles
            # and reading the loss back (at 0.2 s CI saw it, on a loaded machine).
            "budgets.reconcile_interval_s": 1.0,
            **FITS_TEN,
        }
        async with limited_gateway(tmp_path, **shared) as gw:
            for _ in range(4):
                assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) is OK
            await asyncio.sleep(0.1)
            client = aioredis.Redis.from_url(redis.url)
            today = budget_key("", "daily", datetime.now(UTC).strftime("%Y-%m-%d"))
            assert await client.hset(f"llmgw:{today}", "spent", CALL_NANOS) == 0
            await client.aclose()  # three settles lost
            assert await spent(gw) == 1 * CALL_NANOS
            await asyncio.sleep(1.5)
            assert await spent(gw) == 4 * CALL_NANOS
