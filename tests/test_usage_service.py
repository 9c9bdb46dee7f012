"""UsageService with auth on: admin scope only; totals from the ledger; budget state.

Also the key store's limits (`keys create --rpm --budget-usd`) applied to a real key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from llmgateway.v1 import usage_pb2 as pb
from llmgateway.v1 import usage_pb2_grpc
from server.app import Gateway
from server.auth.cli import create_key
from server.config import LedgerConfig
from server.identity import KeyLimits
from tests.conftest import request
from tests.test_auth import auth_config, bearer
from tests.test_rate_limit import quota_refusal


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, grpc.aio.Channel]]:
    config = auth_config(tmp_path)
    ledger = LedgerConfig(path=tmp_path / "usage.sqlite3", flush_interval_s=0.05)
    config = config.model_copy(update={"ledger": ledger})
    create_key(config.auth, name="bootstrap")
    gateway = Gateway(config)
    port = await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield gateway, channel
    await channel.close()
    await gateway.stop(grace=1)


async def test_usage_totals_and_budget_for_admins_only(
    gateway: tuple[Gateway, grpc.aio.Channel],
) -> None:
    server, channel = gateway
    auth = server.config.auth
    limits = KeyLimits(requests_per_minute=2, budget_nanos=5_000_000_000)
    caller, caller_key = create_key(auth, name="app", scopes=("generate",), limits=limits)
    _, admin_key = create_key(auth, name="ops", scopes=("admin",))
    stub = pb_grpc.GenerationServiceStub(channel)
    usage = usage_pb2_grpc.UsageServiceStub(channel)

    await stub.Generate(request("one two three"), metadata=bearer(caller_key))
    [_ async for _ in stub.StreamGenerate(request("four five"), metadata=bearer(caller_key))]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Generate(request(), metadata=bearer(caller_key))
    assert quota_refusal(refused.value)[1] == f"key:{caller.id}:requests_per_minute"

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await usage.GetUsage(pb.GetUsageRequest(), metadata=bearer(caller_key))
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED

    by_key = await usage.GetUsage(
        pb.GetUsageRequest(group_by=pb.USAGE_GROUPING_KEY), metadata=bearer(admin_key)
    )
    [totals] = by_key.totals
    # Two served calls and the refused one: every call is recorded once.
    assert (totals.group, totals.requests, totals.errors) == (caller.id, 3, 1)
    assert totals.output_tokens == 5
    by_model = await usage.GetUsage(
        pb.GetUsageRequest(group_by=pb.USAGE_GROUPING_MODEL, key_id=caller.id),
        metadata=bearer(admin_key),
    )
    # The refused call was served by no model.
    assert sorted((t.group, t.requests) for t in by_model.totals) == [("", 1), ("echo", 2)]
    empty = await usage.GetUsage(
        pb.GetUsageRequest(key_id="someone-else"), metadata=bearer(admin_key)
    )
    assert list(empty.totals) == []

    budget = await usage.GetBudget(
        pb.GetBudgetRequest(key_id=caller.id), metadata=bearer(admin_key)
    )
    [monthly] = budget.budgets
    assert (monthly.period, monthly.limit_nanos, monthly.spent_nanos) == (
        "monthly",
        5_000_000_000,
        0,
    )
