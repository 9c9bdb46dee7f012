"""OpenTelemetry traces: the tracer provider from config, and what fills the spans.

interceptors/tracing.py opens a SERVER span per RPC, continuing the caller's
W3C traceparent, and makes it the current span while the handler runs.
Everything else here runs inside that span, from the records the gateway
already keeps (no work added to the call path):

- `CallSpans.on_call` (a CallRecord observer) sets the GenAI semantic-
  convention attributes of the call: provider, response model and id,
  finish reasons, token usage with cache tokens, plus ours (key id,
  request id, cost) and a `gen_ai.first_token` event at the first token.
- `CallSpans.on_routed` (a router observer) adds one CLIENT child span per
  upstream attempt, with the attempt's real start and end times (recorded by
  the router on the event loop's clock, turned into wall-clock time here),
  so retries and fallbacks show as siblings under the server span.

No exporter by default. The standard OTEL_* variables apply: the exporter
(OTEL_TRACES_EXPORTER when `tracing.exporter` is unset), its endpoint,
headers and protocol, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER, OTEL_PROPAGATORS, OTEL_BSP_*, OTEL_SDK_DISABLED.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from server.calls import CallRecord
from server.config import TracingConfig
from server.routing.attempts import (
    CANCELLED,
    OK,
    SKIPPED_CIRCUIT_OPEN,
    SKIPPED_RATE_LIMITED,
    RoutedCall,
)

log = logging.getLogger(__name__)

TRACER_NAME = "llm-gateway"
DEFAULT_SERVICE_NAME = "llm-gateway"

# Our own attributes, next to the gen_ai.* ones.
KEY_ID = "llmgw.key_id"
REQUEST_ID = "llmgw.request_id"
ROUTE = "llmgw.route"
TIER = "llmgw.tier"
DEPLOYMENT = "llmgw.deployment"
ATTEMPTS = "llmgw.attempts"
ATTEMPT = "llmgw.attempt"
ATTEMPT_OUTCOME = "llmgw.attempt.outcome"
COST_USD = "llmgw.cost_usd"
ERROR_REASON = "llmgw.error_reason"


def exporter_name(config: TracingConfig, environ: Mapping[str, str]) -> str:
    """none, otlp_grpc, otlp_http or console: the config's, else OTEL_TRACES_EXPORTER's."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    if config.exporter is not None:
        return config.exporter
    wanted = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if wanted in ("", "none"):
        return "none"
    if wanted == "console":
        return "console"
    if wanted == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        return "otlp_http" if protocol.startswith("http") else "otlp_grpc"
    log.warning("OTEL_TRACES_EXPORTER=%s is not supported here: tracing stays off", wanted)
    return "none"


def _exporter(name: str, endpoint: str | None) -> SpanExporter:
    if name == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint)
    if name == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=endpoint)
    return ConsoleSpanExporter()


def build_tracer_provider(
    config: TracingConfig, environ: Mapping[str, str] | None = None
) -> TracerProvider | None:
    """The configured tracer provider, or None when tracing is off (the default)."""
    environ = os.environ if environ is None else environ
    name = exporter_name(config, environ)
    if name == "none":
        return None
    service = config.service_name or environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the sampler comes from
    # OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = _exporter(name, config.endpoint)
    # Console output is for people watching: at once. OTLP goes in batches.
    processor = SimpleSpanProcessor(exporter) if name == "console" else BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    log.info("tracing: exporting spans with %s", name)
    return provider


def _wall_ns(monotonic: float, now_monotonic: float, now_ns: int) -> int:
    return now_ns - int((now_monotonic - monotonic) * 1e9)


class CallSpans:
    """Fills the current server span from the call's records (observers; cheap, no I/O)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def on_call(self, record: CallRecord) -> None:
        """CallRecord observer: the call's GenAI attributes, on the server span."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        usage = record.usage
        attributes: dict[str, AttributeValue] = {
            REQUEST_ID: record.request_id,
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": usage.cache_read_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": usage.cache_creation_input_tokens,
            COST_USD: record.cost.total_nanos / 1e9,
        }
        if record.key_id:
            attributes[KEY_ID] = record.key_id
        if record.provider:
            attributes["gen_ai.provider.name"] = record.provider
            attributes["gen_ai.response.model"] = record.model_served
        if record.response_id:
            attributes["gen_ai.response.id"] = record.response_id
        if record.stop_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = (record.stop_reason.value,)
        if record.error_reason:
            attributes[ERROR_REASON] = record.error_reason
            attributes["error.type"] = record.error_reason
            # A failing upstream is the gateway's failure to serve, whatever the
            # code it maps to (a 429 is RESOURCE_EXHAUSTED).
            if record.error_reason.startswith("UPSTREAM_"):
                span.set_status(Status(StatusCode.ERROR, record.error_reason))
        span.set_attributes(attributes)
        if record.first_token_at is not None:
            now = time.monotonic()
            at = _wall_ns(record.first_token_at, now, time.time_ns())
            span.add_event("gen_ai.first_token", timestamp=at)

    def on_routed(self, call: RoutedCall) -> None:
        """Router observer: a child span per upstream attempt, with its real timing."""
        parent = trace.get_current_span()
        if not parent.is_recording():
            return
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            now = time.monotonic()
        now_ns = time.time_ns()
        context = trace.set_span_in_context(parent)
        served = ""
        for number, attempt in enumerate(call.attempts, 1):
            provider, _, model = attempt.deployment.partition("/")
            start = _wall_ns(attempt.started_at, now, now_ns)
            span = self._tracer.start_span(
                f"chat {model}",
                context=context,
                kind=SpanKind.CLIENT,
                start_time=start,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": provider,
                    "gen_ai.request.model": model,
                    DEPLOYMENT: attempt.deployment,
                    ATTEMPT: number,
                    ATTEMPT_OUTCOME: attempt.outcome,
                },
            )
            if attempt.outcome not in (OK, CANCELLED):
                span.set_attribute("error.type", attempt.outcome)
                span.set_status(Status(StatusCode.ERROR, attempt.outcome))
            if attempt.outcome not in (SKIPPED_CIRCUIT_OPEN, SKIPPED_RATE_LIMITED):
                served = attempt.deployment
            span.end(end_time=start + int(attempt.duration_s * 1e9))
        attributes: dict[str, AttributeValue] = {ROUTE: call.model, ATTEMPTS: len(call.attempts)}
        if served:
            attributes[DEPLOYMENT] = served
        if call.tier:
            attributes[TIER] = call.tier
        parent.set_attributes(attributes)
