"""Metrics end to end: a few real calls, then a scrape of the Prometheus endpoint (port 0)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.accounting.ledger import SqliteLedger
from server.app import Gateway
from server.calls import CallRecord
from server.config import ConfigError, load_config
from server.routing.attempts import Attempt, RoutedCall
from server.schema import Usage
from server.telemetry.metrics import MAX_LABEL_VALUES, OTHER, BoundedLabel, GatewayMetrics
from tests.conftest import RunningGateway, started
from tests.fake_upstream import FakeUpstream, Reply
from tests.test_tracing import upstream_overrides
from tests.upstream_fixtures import ask, generate, stream_all

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "llm-gateway.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
# Every label our own metrics may carry: bounded sets only.
ALLOWED_LABELS = {
    "edge",
    "method",
    "code",
    "model",
    "provider",
    "type",
    "outcome",
    "reason",
    "deployment",
}
ALLOWED_LABELS |= {"state", "budget", "le", "period", "threshold"}
# Stored provider keys' names: as many as the configuration names.
ALLOWED_LABELS |= {"stored_key"}


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def metered(
    fake: FakeUpstream, _openai_key_in_environment: None
) -> AsyncIterator[RunningGateway]:
    overrides = upstream_overrides(fake, **{"metrics.enabled": True, "metrics.port": 0})
    overrides["routing"] = {"retry": {"max_attempts": 2, "initial_backoff_s": 0.01}}
    gw = await started(Gateway(load_config(environ={}, overrides=overrides)))
    yield gw
    await gw.aclose()


async def test_scrape_after_calls_shows_counters_and_histograms(
    metered: RunningGateway, fake: FakeUpstream
) -> None:
    gw = metered
    port = gw.gateway.telemetry.metrics_port
    assert port > 0
    first, _ = await generate(gw.stub, ask("claude-test", "Hi"))
    fake.enqueue(Reply(status=503))  # one failed attempt, then a retry that works
    second, _ = await generate(gw.stub, ask("claude-test", "Hi again"))
    events, _ = await stream_all(gw.stub, ask("gpt-test", "Hi"))
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(ask("no-such-model", "Hi"))

    found = samples(await scrape(port))
    assert value(found, "llmgw_rpcs_total", edge="grpc", method="Generate", code="OK") == 2
    assert value(found, "llmgw_rpcs_total", edge="grpc", method="StreamGenerate", code="OK") == 1
    assert value(found, "llmgw_rpcs_total", edge="grpc", method="Generate", code="NOT_FOUND") == 1

    claude = {"model": first.model, "provider": "anthropic"}
    count = value(
        found, "llmgw_request_duration_seconds_count", edge="grpc", method="Generate", **claude
    )
    assert count == 2
    assert (
        value(found, "llmgw_request_duration_seconds_sum", edge="grpc", method="Generate", **claude)
        > 0
    )
    assert value(found, "llmgw_time_to_first_token_seconds_count", **claude) == 2
    inf = value(found, "llmgw_time_to_first_token_seconds_bucket", le="+Inf", **claude)
    assert inf == 2
    inputs = first.usage.input_tokens + second.usage.input_tokens
    outputs = first.usage.output_tokens + second.usage.output_tokens
    assert value(found, "llmgw_tokens_total", type="input", **claude) == inputs
    assert value(found, "llmgw_tokens_total", type="output", **claude) == outputs
    nanos = sum(
        r.cost.input_nanos + r.cost.output_nanos + r.cost.cache_read_nanos for r in (first, second)
    )
    assert value(found, "llmgw_cost_usd_total", **claude) == pytest.approx(nanos / 1e9)
    gpt_model = events[0].message_start.model
    gpt = {"model": gpt_model, "provider": "openai"}
    assert value(found, "llmgw_time_to_first_token_seconds_count", **gpt) == 1
    assert (
        value(
            found,
            "llmgw_request_duration_seconds_count",
            edge="grpc",
            method="StreamGenerate",
            **gpt,
        )
        == 1
    )

    anthropic = {"provider": "anthropic", "model": "claude-test"}
    assert value(found, "llmgw_upstream_attempts_total", outcome="OK", **anthropic) == 2
    assert (
        value(found, "llmgw_upstream_attempts_total", outcome="UPSTREAM_UNAVAILABLE", **anthropic)
        == 1
    )
    assert (
        value(found, "llmgw_upstream_errors_total", reason="UPSTREAM_UNAVAILABLE", **anthropic) == 1
    )
    breaker = {"deployment": "anthropic/claude-test"}
    assert value(found, "llmgw_circuit_breaker_state", state="closed", **breaker) == 1
    assert value(found, "llmgw_circuit_breaker_state", state="open", **breaker) == 0
    assert value(found, "llmgw_calls_in_flight") == 0

    # Bounded labels only: never a request id or the prompt.
    for (name, labels), _ in found.items():
        if name.startswith("llmgw_"):
            assert {key for key, _ in labels} <= ALLOWED_LABELS, name
            for _, label in labels:
                assert label not in (first.request_id, second.request_id, "Hi")


async def test_a_stream_in_flight_is_counted(metered: RunningGateway, fake: FakeUpstream) -> None:
    gw = metered
    fake.enqueue(Reply(event_delay_s=0.3))
    call = gw.stub.StreamGenerate(
        ask("claude-test", "Hi"), metadata=(("x-request-id", "in-flight-1"),)
    )
    await call.read()  # the first event: the call is being served
    found = samples(await scrape(gw.gateway.telemetry.metrics_port))
    assert value(found, "llmgw_calls_in_flight") == 1
    call.cancel()


async def test_an_http_stream_in_flight_is_counted(
    metered: RunningGateway, fake: FakeUpstream
) -> None:
    gw = metered
    fake.enqueue(Reply(event_delay_s=0.3))
    body = (
        b'{"model": "claude-test", "max_tokens": 64, "stream": true,'
        b' "messages": [{"role": "user", "content": "Hi"}]}'
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.http_port)
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        await reader.readuntil(b"event: message_start")  # being served
        found = samples(await scrape(gw.gateway.telemetry.metrics_port))
        assert value(found, "llmgw_calls_in_flight") == 1
    finally:
        writer.close()


async def test_ledger_failures_and_dropped_rows_are_read_at_each_scrape(
    metered: RunningGateway,
) -> None:
    ledger = metered.gateway.accounting.ledger
    assert isinstance(ledger, SqliteLedger)
    port = metered.gateway.telemetry.metrics_port
    found = samples(await scrape(port))
    assert value(found, "llmgw_ledger_write_failures_total") == 0
    ledger.failures, ledger.rows_dropped = 4, 7  # as a failing disk would leave them
    found = samples(await scrape(port))
    assert value(found, "llmgw_ledger_write_failures_total") == 4
    assert value(found, "llmgw_ledger_rows_dropped_total") == 7


async def test_counts_read_at_scrape_time_are_counters(metered: RunningGateway) -> None:
    text = await scrape(metered.gateway.telemetry.metrics_port)
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name in (
        "llmgw_ledger_write_failures",
        "llmgw_ledger_rows_dropped",
        "llmgw_quota_backend_failures",
    ):
        assert types.get(name) == "counter", name
        assert f"# TYPE {name}_total counter" in text
        assert f"\n{name}_total 0.0\n" in text
    # Every llmgw_ family is a counter, a histogram or one of the two real gauges.
    gauges = {name for name, kind in types.items() if name.startswith("llmgw_") and kind == "gauge"}
    assert gauges == {"llmgw_calls_in_flight", "llmgw_circuit_breaker_state"}
    # The dashboard queries only names the endpoint exports.
    exported = set(re.findall(r"^# TYPE (llmgw_\w+) ", text, re.MULTILINE))
    queried = set(re.findall(r"llmgw_\w+", DASHBOARD.read_text()))
    assert {name.removesuffix("_bucket") for name in queried} <= exported
    assert "llmgw_ledger_rows_dropped_total" in queried


async def test_metrics_are_off_by_default_and_need_one_worker() -> None:
    config = load_config(environ={}, overrides={"auth.enabled": False})
    assert not config.metrics.enabled
    assert Gateway(config).telemetry.metrics_port == 0
    with pytest.raises(ConfigError, match=r"metrics\.enabled needs server\.workers: 1"):
        load_config(environ={}, overrides={"metrics.enabled": True, "server.workers": 2})


def test_label_values_are_bounded_and_refusals_counted() -> None:
    label = BoundedLabel(2)
    assert [label(v) for v in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    metrics = GatewayMetrics(process_metrics=False)
    record = CallRecord(method="Generate", request_id="r1")
    record.status = grpc.StatusCode.RESOURCE_EXHAUSTED
    record.error_reason = "RATE_LIMIT_EXCEEDED"
    record.ended_at = record.started_at + 0.01
    metrics.observe_call(record)
    record.error_reason = "UPSTREAM_RATE_LIMITED"  # the upstream's limit: not a refusal of ours
    metrics.observe_call(record)
    record.status = grpc.StatusCode.UNAVAILABLE  # shed at the overload gate: a refusal
    record.error_reason = "GATEWAY_OVERLOADED"
    metrics.observe_call(record)
    record.error_reason = "UPSTREAM_UNAVAILABLE"  # an upstream's failure: not one
    metrics.observe_call(record)
    metrics.record_refusal("BUDGET_EXCEEDED")
    metrics.observe_routed(
        RoutedCall("r1", "m", [Attempt("p/m", "OK"), Attempt("p/m", "SKIPPED_CIRCUIT_OPEN")])
    )
    registry = metrics.registry
    get = registry.get_sample_value
    assert get("llmgw_refusals_total", {"reason": "RATE_LIMIT_EXCEEDED"}) == 1
    assert get("llmgw_refusals_total", {"reason": "BUDGET_EXCEEDED"}) == 1
    assert get("llmgw_refusals_total", {"reason": "UPSTREAM_RATE_LIMITED"}) is None
    assert get("llmgw_refusals_total", {"reason": "GATEWAY_OVERLOADED"}) == 1
    assert get("llmgw_refusals_total", {"reason": "UPSTREAM_UNAVAILABLE"}) is None
    errors = {"provider": "p", "model": "m", "reason": "SKIPPED_CIRCUIT_OPEN"}
    assert get("llmgw_upstream_errors_total", errors) is None
    skipped = {"provider": "p", "model": "m", "outcome": "SKIPPED_CIRCUIT_OPEN"}
    assert get("llmgw_upstream_attempts_total", skipped) == 1


async def test_made_up_model_names_do_not_take_the_configured_models_labels(
    metered: RunningGateway, fake: FakeUpstream
) -> None:
    gw = metered
    # Names the upstream refuses (404), then more names than the cap that it
    # serves: both reach the labels (the deployment; the model once served).
    refused = [f"claude-refused-{i}" for i in range(20)]
    served = [f"claude-made-up-{i}" for i in range(MAX_LABEL_VALUES + 1)]
    fake.enqueue(*(Reply(status=404) for _ in refused))
    results = await asyncio.gather(
        *(gw.stub.Generate(ask(name, "Hi")) for name in refused), return_exceptions=True
    )
    assert {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.NOT_FOUND
    }
    for names in (served[i : i + 25] for i in range(0, len(served), 25)):
        await asyncio.gather(*(gw.stub.Generate(ask(name, "Hi")) for name in names))
    await generate(gw.stub, ask("claude-test", "Hi"))
    await generate(gw.stub, ask("claude-test-latest", "Hi"))  # an alias of it
    await stream_all(gw.stub, ask("gpt-test", "Hi"))

    found = samples(await scrape(gw.gateway.telemetry.metrics_port))
    claude = {"model": "claude-test", "provider": "anthropic"}
    assert (
        value(
            found, "llmgw_request_duration_seconds_count", edge="grpc", method="Generate", **claude
        )
        == 2
    )
    gpt = {"model": "gpt-test", "provider": "openai"}
    assert (
        value(
            found,
            "llmgw_request_duration_seconds_count",
            edge="grpc",
            method="StreamGenerate",
            **gpt,
        )
        == 1
    )
    assert value(found, "llmgw_upstream_attempts_total", outcome="OK", **claude) == 2
    assert value(found, "llmgw_upstream_attempts_total", outcome="OK", **gpt) == 1
    breaker = {"deployment": "anthropic/claude-test"}
    assert value(found, "llmgw_circuit_breaker_state", state="closed", **breaker) == 1
    # The made-up names are still bounded: the last ones were folded into "other".
    other = {"model": OTHER, "provider": "anthropic"}
    assert (
        value(
            found, "llmgw_request_duration_seconds_count", edge="grpc", method="Generate", **other
        )
        > 0
    )
    assert value(found, "llmgw_upstream_attempts_total", outcome="OK", provider=OTHER, model="") > 0
    for metric in ("llmgw_request_duration_seconds_count", "llmgw_upstream_attempts_total"):
        labelled = {dict(labels).get("model") for (name, labels) in found if name == metric}
        assert len(labelled & {*served, *refused}) <= MAX_LABEL_VALUES, metric


def test_a_replayed_answer_counts_no_upstream_tokens_or_model_timing() -> None:
    metrics = GatewayMetrics(process_metrics=False)
    for outcome in ("miss", "hit", "replay"):
        record = CallRecord(method="Generate", request_id=outcome)
        record.provider, record.model_served, record.cache = "anthropic", "claude-test", outcome
        record.usage = Usage(input_tokens=10, output_tokens=5)
        record.first_token_at = record.started_at + 0.2
        record.ended_at = record.started_at + 0.5
        metrics.observe_call(record)
    get = metrics.registry.get_sample_value
    tokens = {"model": "claude-test", "provider": "anthropic", "type": "input"}
    assert get("llmgw_tokens_total", tokens) == 10  # the miss's alone
    ttft = {"model": "claude-test", "provider": "anthropic"}
    assert get("llmgw_time_to_first_token_seconds_count", ttft) == 1
    assert get("llmgw_cache_calls_total", {"edge": "grpc", "outcome": "hit"}) == 1
