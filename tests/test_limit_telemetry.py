"""Rate-limit refusals and budget alerts reach the metrics endpoint and the audit trail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from tests.conftest import request
from tests.redis_fixtures import NANOS_PER_OUTPUT_TOKEN, limited_gateway
from tests.test_metrics import samples, scrape, value

PROMPT = "one two three four five six seven eight nine ten"
CALL_NANOS = 10 * NANOS_PER_OUTPUT_TOKEN


async def test_refusals_and_budget_alerts_are_counted_and_audited(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    overrides = {
        "metrics.enabled": True,
        "metrics.port": 0,
        "audit.path": str(audit),
        "limits.default.requests_per_minute": 4,
        # Four calls spend 80% of the day's budget: the 50% and 80% alerts fire.
        "budgets.default.daily_usd": 5 * CALL_NANOS / 1e9,
    }
    async with limited_gateway(tmp_path, **overrides) as gw:
        for _ in range(4):
            await gw.stub.Generate(request(PROMPT, max_tokens=10))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.Generate(request(PROMPT, max_tokens=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(0.1)  # budget settlement runs when each call's record closes
        found = samples(await scrape(gw.gateway.telemetry.metrics_port))
        await gw.gateway.accounting.ledger.flush()
        rows = await gw.gateway.accounting.ledger.rows()

    # The refused call is recorded once, like every other call.
    assert [(r["status"], r["error_reason"]) for r in rows].count(
        ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
    ) == 1
    assert len(rows) == 5

    assert value(found, "llmgw_refusals_total", reason="RATE_LIMIT_EXCEEDED") == 1
    assert value(found, "llmgw_budget_alerts_total", period="daily", threshold="0.5") == 1
    assert value(found, "llmgw_budget_alerts_total", period="daily", threshold="0.8") == 1
    assert value(found, "llmgw_budget_alerts_total", period="daily", threshold="0.95") == 0
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    alerts = [e for e in events if e.get("event") == "budget.alert"]
    assert sorted(a["threshold"] for a in alerts) == [0.5, 0.8]
    assert {a["period"] for a in alerts} == {"daily"}


def test_quota_backend_failures_are_read_at_each_scrape() -> None:
    from prometheus_client import generate_latest

    from server.telemetry.metrics import GatewayMetrics

    class Backend:
        failures = 0

    backend = Backend()
    metrics = GatewayMetrics(process_metrics=False)
    metrics.watch_quota_backend_failures(lambda: float(backend.failures))
    backend.failures = 3
    found = samples(generate_latest(metrics.registry).decode())
    assert value(found, "llmgw_quota_backend_failures_total") == 3
