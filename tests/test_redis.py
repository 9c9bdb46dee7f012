"""Limits shared through a real Redis: one global limit across gateway processes.

The suite starts its own redis-server (tests/redis_fixtures.py) for each test
and stops it; `make test` installs the binary.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import request, start_server_process
from tests.redis_fixtures import limited_gateway, redis_server
from tests.test_budget import CALL_NANOS, FITS_TEN, PROMPT, outcome


async def test_three_processes_hold_one_global_rpm(tmp_path: Path) -> None:
    rpm = 60
    async with redis_server(tmp_path) as redis:
        env = {
            "LLMGW_LIMITS__BACKEND": "redis",
            "LLMGW_REDIS__URL": redis.url,
            "LLMGW_LIMITS__DEFAULT__REQUESTS_PER_MINUTE": str(rpm),
            "LLMGW_LEDGER__ENABLED": "false",
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
        allowed = codes.count(grpc.StatusCode.OK)
        # The bucket refills rpm/60 per second while the burst runs.
        ceiling = rpm + rpm / 60 * elapsed
        assert rpm * 0.95 <= allowed <= ceiling * 1.05, (allowed, elapsed)
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2 * rpm - allowed


async def outcome_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_budget_race_across_replicas(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as redis:
        shared = {"limits.backend": "redis", "redis.url": redis.url, **FITS_TEN}
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
            "redis.timeout_s": 0.2,
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
