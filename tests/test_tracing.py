"""Tracing end to end: spans of real calls, caught by the SDK's in-memory exporter.

A gateway in front of the fake upstream, with a tracer provider whose spans
go to an InMemorySpanExporter: a call carrying a W3C traceparent yields a
server span in that trace with the GenAI attributes, each upstream attempt
a child span with its own timing, and errors set the status.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmgateway.v1 import generation_pb2 as pb
from server.app import Gateway
from server.config import TracingConfig, load_config
from server.telemetry.tracing import build_tracer_provider, exporter_name
from tests.conftest import TEST_CONFIG, RunningGateway, started
from tests.fake_upstream import FakeUpstream, Reply
from tests.upstream_fixtures import FAST_RETRIES, ask, provider_config, stream_all

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),)
GENERATE = "llmgateway.v1.GenerationService/Generate"
STREAM = "llmgateway.v1.GenerationService/StreamGenerate"


def in_memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def start_traced_gateway(
    overrides: dict[str, Any], provider: TracerProvider
) -> RunningGateway:
    return await started(
        Gateway(load_config(environ={}, overrides=overrides), tracer_provider=provider)
    )


def upstream_overrides(fake: FakeUpstream, **more: Any) -> dict[str, Any]:
    return {
        "server.host": "127.0.0.1",
        "server.port": 0,
        "http.port": 0,
        "auth.enabled": False,
        "server.coalesce_stream_deltas": False,
        "providers": provider_config(fake),
        "routing": {"retry": FAST_RETRIES, "breaker": {"enabled": False}},
        **more,
    }


@pytest.fixture
async def traced(
    fake: FakeUpstream, _openai_key_in_environment: None
) -> AsyncIterator[tuple[RunningGateway, InMemorySpanExporter]]:
    provider, exporter = in_memory_provider()
    gw = await start_traced_gateway(upstream_overrides(fake), provider)
    yield gw, exporter
    await gw.aclose()


def server_spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER and s.name == name
    ]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    found = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: s.attributes["llmgw.attempt"] if s.attributes else 0)


def all_span_text(spans: Sequence[ReadableSpan]) -> str:
    """Every attribute, event and status of the spans, as one string to search."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.append(json.dumps(dict(span.attributes or {}), default=str))
        parts.append(str(span.status.description))
        for event in span.events:
            parts.append(event.name + json.dumps(dict(event.attributes or {}), default=str))
    return "\n".join(parts)


async def test_a_call_continues_the_callers_trace_with_genai_attributes(
    traced: tuple[RunningGateway, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    req = ask("claude-test", "Tell me a secret story", max_tokens=100, temperature=0.5)
    response = await gw.stub.Generate(req, metadata=TRACEPARENT)
    (span,) = server_spans(exporter, GENERATE)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "claude-test"
    assert attributes["gen_ai.request.max_tokens"] == 100
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert attributes["gen_ai.provider.name"] == "anthropic"
    assert attributes["gen_ai.response.model"] == response.model
    assert attributes["gen_ai.response.id"] == response.id
    assert attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert attributes["gen_ai.usage.input_tokens"] == response.usage.input_tokens > 0
    assert attributes["gen_ai.usage.output_tokens"] == response.usage.output_tokens > 0
    assert "gen_ai.usage.cache_read.input_tokens" in attributes
    assert "gen_ai.usage.cache_creation.input_tokens" in attributes
    nanos = sum(
        (response.cost.input_nanos, response.cost.output_nanos),
        response.cost.cache_read_nanos + response.cost.cache_creation_nanos,
    )
    assert attributes["llmgw.cost_usd"] == pytest.approx(nanos / 1e9)
    assert attributes["llmgw.request_id"] == response.request_id
    assert attributes["llmgw.route"] == "claude-test"
    assert attributes["llmgw.deployment"] == "anthropic/claude-test"
    assert attributes["llmgw.attempts"] == 1
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code is StatusCode.UNSET
    # Content is not captured unless configured.
    assert "gen_ai.input.messages" not in attributes
    assert "secret story" not in all_span_text(exporter.get_finished_spans())
    (attempt,) = children(exporter, span)
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes is not None and attempt.attributes["llmgw.attempt.outcome"] == "OK"


async def test_a_stream_is_traced_with_its_first_token(
    traced: tuple[RunningGateway, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    await stream_all(gw.stub, ask("gpt-test", "Hi"))
    (span,) = server_spans(exporter, STREAM)
    assert span.parent is None  # no traceparent: a new trace
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.usage.output_tokens"] > 0
    (first_token,) = [e for e in span.events if e.name == "gen_ai.first_token"]
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= first_token.timestamp <= span.end_time


async def test_a_retried_call_has_one_child_span_per_attempt(
    traced: tuple[RunningGateway, InMemorySpanExporter], fake: FakeUpstream
) -> None:
    gw, exporter = traced
    fake.enqueue(Reply(status=500), Reply(status=503))
    await gw.stub.Generate(ask("claude-test", "Hi"), metadata=TRACEPARENT)
    (span,) = server_spans(exporter, GENERATE)
    attempts = children(exporter, span)
    assert [a.attributes["llmgw.attempt"] for a in attempts if a.attributes] == [1, 2, 3]
    outcomes = [a.attributes["llmgw.attempt.outcome"] for a in attempts if a.attributes]
    assert outcomes[-1] == "OK" and all(o.startswith("UPSTREAM_") for o in outcomes[:2])
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR] * 2 + [StatusCode.UNSET]
    assert all(a.context.trace_id == span.context.trace_id for a in attempts)
    assert all(a.name == "chat claude-test" for a in attempts)
    # Real timings: in order, not overlapping, inside the server span.
    assert span.start_time is not None and span.end_time is not None
    previous_end = span.start_time
    for attempt in attempts:
        assert attempt.start_time is not None and attempt.end_time is not None
        assert previous_end <= attempt.start_time <= attempt.end_time <= span.end_time
        previous_end = attempt.end_time
    assert span.attributes is not None and span.attributes["llmgw.attempts"] == 3
    assert span.status.status_code is StatusCode.UNSET  # the call succeeded in the end


async def test_an_upstream_error_sets_the_span_status(
    traced: tuple[RunningGateway, InMemorySpanExporter], fake: FakeUpstream
) -> None:
    gw, exporter = traced
    fake.enqueue(Reply(status=503), Reply(status=503), Reply(status=503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"), metadata=TRACEPARENT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    (span,) = server_spans(exporter, GENERATE)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert str(span.attributes["error.type"]).startswith("UPSTREAM_")
    assert len(children(exporter, span)) == 3


async def test_an_upstream_rate_limit_is_an_error_too(
    traced: tuple[RunningGateway, InMemorySpanExporter], fake: FakeUpstream
) -> None:
    gw, exporter = traced
    fake.enqueue(*[Reply(status=429, headers={"retry-after": "0"}) for _ in range(3)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-test", "Hi"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (span,) = server_spans(exporter, GENERATE)
    assert span.status.status_code is StatusCode.ERROR


async def test_a_callers_mistake_keeps_the_status_unset_but_records_the_code(
    traced: tuple[RunningGateway, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.StreamGenerate(ask("no-such-model", "Hi")).read()
    code = caught.value.code()
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    (span,) = server_spans(exporter, STREAM)
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.status.status_code is StatusCode.UNSET


async def test_health_is_not_traced(traced: tuple[RunningGateway, InMemorySpanExporter]) -> None:
    gw, exporter = traced
    health = health_pb2_grpc.HealthStub(gw.channel)
    await health.Check(health_pb2.HealthCheckRequest(service=""))
    await gw.stub.ListModels(pb.ListModelsRequest())
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["llmgateway.v1.GenerationService/ListModels"]


async def test_content_is_captured_only_when_configured() -> None:
    provider, exporter = in_memory_provider()
    overrides = {**TEST_CONFIG, "tracing.capture_content": True}
    gw = await start_traced_gateway(overrides, provider)
    try:
        await gw.stub.Generate(ask("echo", "echo this prompt"))
        await stream_all(gw.stub, ask("echo", "stream this prompt"))
    finally:
        await gw.aclose()
    (unary,) = server_spans(exporter, GENERATE)
    (streamed,) = server_spans(exporter, STREAM)
    assert unary.attributes is not None and streamed.attributes is not None
    assert "echo this prompt" in str(unary.attributes["gen_ai.input.messages"])
    assert "echo this prompt" in str(unary.attributes["gen_ai.output.messages"])
    assert "stream this prompt" in str(streamed.attributes["gen_ai.output.messages"])


async def test_tracing_is_off_by_default_with_no_interceptor() -> None:
    config = load_config(environ={}, overrides=TEST_CONFIG)
    assert exporter_name(config.tracing, {}) == "none"
    gateway = Gateway(config)
    assert gateway.telemetry.interceptors == []


def test_the_exporter_follows_config_then_otel_variables() -> None:
    unset = TracingConfig()
    assert exporter_name(unset, {"OTEL_TRACES_EXPORTER": "otlp"}) == "otlp_grpc"
    http = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert exporter_name(unset, http) == "otlp_http"
    assert exporter_name(unset, {"OTEL_TRACES_EXPORTER": "console"}) == "console"
    assert exporter_name(TracingConfig(exporter="none"), http) == "none"
    assert exporter_name(TracingConfig(exporter="otlp_http"), {"OTEL_SDK_DISABLED": "true"}) == (
        "none"
    )
    assert build_tracer_provider(unset, {}) is None
    env = {"OTEL_SERVICE_NAME": "gw-under-test", "OTEL_RESOURCE_ATTRIBUTES": "team=llm"}
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES from the process environment.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=llm")
        provider = build_tracer_provider(TracingConfig(exporter="otlp_grpc"), env)
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "gw-under-test"
    assert provider.resource.attributes["team"] == "llm"
    started = time.monotonic()
    provider.shutdown()  # nothing queued: returns at once, no collector needed
    assert time.monotonic() - started < 5
