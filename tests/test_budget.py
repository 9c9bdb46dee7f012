"""Budgets under concurrency: reserve before, settle after, release on every exit path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from llmgateway.v1 import usage_pb2
from server.accounting import BudgetAlert
from tests.conftest import request
from tests.redis_fixtures import NANOS_PER_OUTPUT_TOKEN, limited_gateway
from tests.test_rate_limit import quota_refusal

# Ten words, echoed back: with max_tokens=10 a call costs exactly its reservation.
PROMPT = "one two three four five six seven eight nine ten"
CALL_NANOS = 10 * NANOS_PER_OUTPUT_TOKEN
FITS_TEN = {"budgets.default.daily_usd": 10 * CALL_NANOS / 1e9}


async def outcome(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert quota_refusal(err)[:2] == ("BUDGET_EXCEEDED", "key::budget:daily")
        return err.code()
    return grpc.StatusCode.OK


async def test_hundred_concurrent_calls_against_a_budget_for_ten(tmp_path: Path) -> None:
    alerts: list[BudgetAlert] = []
    async with limited_gateway(tmp_path, **FITS_TEN) as gw:
        gw.gateway.accounting.admission.alert_hooks.append(alerts.append)
        calls = [gw.stub.Generate(request(PROMPT, max_tokens=10)) for _ in range(100)]
        codes = await asyncio.gather(*(outcome(c) for c in calls))
        assert codes.count(grpc.StatusCode.OK) == 10
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 90
        await asyncio.sleep(0.05)
        budget = await gw.usage.GetBudget(usage_pb2.GetBudgetRequest(key_id=""))
        [daily] = budget.budgets
        assert (daily.period, daily.limit_nanos) == ("daily", 10 * CALL_NANOS)
        assert (daily.spent_nanos, daily.reserved_nanos) == (10 * CALL_NANOS, 0)
        # A call that costs nothing still fits; one that may cost something does not.
        assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    # Each threshold fired once in the period (also logged as a structured line).
    assert sorted(a.threshold for a in alerts) == [0.5, 0.8, 0.95]
    assert {(a.key_id, a.period, a.limit_nanos) for a in alerts} == {("", "daily", 10 * CALL_NANOS)}


async def test_reservations_are_released_on_error_cancel_and_crash(tmp_path: Path) -> None:
    # Room for two calls plus the one output token each cancelled stream pays for.
    fits_two = {"budgets.default.daily_usd": (2 * CALL_NANOS + 3 * NANOS_PER_OUTPUT_TOKEN) / 1e9}
    async with limited_gateway(tmp_path, **fits_two) as gw:
        # An invalid provider option fails inside the provider, after admission.
        bad = request(PROMPT, max_tokens=10, provider_options={"chunk_delay_ms": -1})
        for _ in range(3):
            assert await outcome(gw.stub.Generate(bad)) is grpc.StatusCode.INVALID_ARGUMENT
        crash = request("crash " + PROMPT, max_tokens=10)
        for _ in range(3):
            assert await outcome(gw.stub.Generate(crash)) is grpc.StatusCode.INTERNAL
        # Cancelled after the first token: that token is paid for, the rest released.
        slow = request(PROMPT, max_tokens=10, provider_options={"chunk_delay_ms": 300})
        for _ in range(3):
            stream = gw.stub.StreamGenerate(slow)
            # The first text delta follows message_start at once (both held for
            # the first content); cancelling before it reached us would pay nothing.
            while not (await stream.read()).HasField("content_block_delta"):
                pass
            stream.cancel()
            await asyncio.sleep(0.05)
        # Deadline passing before any output: costs nothing, released too.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await gw.stub.Generate(slow, timeout=0.2)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.1)
        budget = await gw.usage.GetBudget(usage_pb2.GetBudgetRequest(key_id=""))
        assert budget.budgets[0].spent_nanos == 3 * NANOS_PER_OUTPUT_TOKEN
        assert budget.budgets[0].reserved_nanos == 0
        # No false refusals: what is left still fits two calls.
        first, second = await asyncio.gather(
            outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))),
            outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))),
        )
        assert (first, second) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
        await asyncio.sleep(0.05)
        assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) is (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )


async def test_spend_survives_a_restart_through_the_ledger(tmp_path: Path) -> None:
    ledger = str(tmp_path / "usage.sqlite3")
    config = {**FITS_TEN, "ledger.path": ledger}
    async with limited_gateway(tmp_path, **config) as gw:
        await asyncio.gather(*(gw.stub.Generate(request(PROMPT, max_tokens=10)) for _ in range(9)))
    async with limited_gateway(tmp_path, **config) as gw:
        budget = await gw.usage.GetBudget(usage_pb2.GetBudgetRequest(key_id=""))
        assert budget.budgets[0].spent_nanos == 9 * CALL_NANOS
        await gw.stub.Generate(request(PROMPT, max_tokens=10))
        await asyncio.sleep(0.05)
        assert await outcome(gw.stub.Generate(request(PROMPT, max_tokens=10))) is (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
