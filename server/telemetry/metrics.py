"""Prometheus metrics, served on their own port.

Fed by the two records the gateway already keeps, so the call path gains no
work of its own: each finished generation call's CallRecord (RPCs, latency,
time to first token, time per output token, tokens and cost by model and
provider, refusals) and each RoutedCall (upstream attempts and errors by
deployment). In-flight calls, circuit-breaker states and the counts other
parts keep (ledger and limits-store failures, exported as counters) are read
when Prometheus scrapes, not maintained per call. Refusals arrive as call
records like any other call; budget alerts with `record_budget_alert`.

Labels are bounded: methods, status codes, providers and error reasons are
fixed sets; model and deployment names come from the configuration, but an
unlisted model a provider accepts is caller text, so each of those labels
keeps its first MAX_LABEL_VALUES such names and folds the rest into "other".
The configured models and deployments are outside that cap: callers'
made-up names cannot take their labels. Never request ids, key ids or free
text.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from server.calls import CallRecord
from server.routing.attempts import (
    CANCELLED,
    OK,
    SKIPPED_CIRCUIT_OPEN,
    SKIPPED_INVALID_PARAMETERS,
    SKIPPED_RATE_LIMITED,
    RoutedCall,
)
from server.routing.breaker import BreakerState

MAX_LABEL_VALUES = 200
OTHER = "other"

# The GenAI semantic conventions' advised buckets (gen_ai.server.*).
REQUEST_DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]  # 10 ms .. 82 s
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
TTFT_BUCKETS += [7.5, 10.0]
GUARDRAIL_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]

# Outcomes that are not failures of the upstream (skips never reached it).
_NOT_UPSTREAM_ERRORS = frozenset(
    {OK, CANCELLED, SKIPPED_CIRCUIT_OPEN, SKIPPED_RATE_LIMITED, SKIPPED_INVALID_PARAMETERS}
)


class BoundedLabel:
    """Passes `known` values through, and the first `limit` distinct others; then OTHER.

    Known values (the models and deployments the configuration serves) never
    count against the limit: names callers make up cannot push them out.
    """

    __slots__ = ("_known", "_limit", "_seen")

    def __init__(self, limit: int = MAX_LABEL_VALUES, known: Iterable[str] = ()) -> None:
        self._known = frozenset(known)
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen or value in self._known:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class _BreakerCollector(Collector):
    """circuit-breaker state per deployment, read at scrape time."""

    def __init__(self, deployments: Iterable[str], state_of: Callable[[str], BreakerState]):
        self._deployments = deployments
        self._state_of = state_of

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "llmgw_circuit_breaker_state",
            "Circuit-breaker state of each deployment tried so far (1 for the current state).",
            labels=["deployment", "state"],
        )
        for deployment in sorted(self._deployments):
            current = self._state_of(deployment)
            for state in BreakerState:
                family.add_metric([deployment, state.value], 1.0 if state is current else 0.0)
        yield family


class _CountsCollector(Collector):
    """Monotonic counts kept by other parts (the ledger, the limits store), read at scrape time.

    Exported as counters (`<name>_total`), so rate() and increase() apply
    and a restart reads as a counter reset, not as a drop; 0 until watched.
    """

    def __init__(self, counts: dict[str, str]) -> None:
        self._help = counts
        self._read: dict[str, Callable[[], float]] = {}

    def watch(self, name: str, read: Callable[[], float]) -> None:
        self._read[name] = read

    def describe(self) -> Iterator[Metric]:
        for name, documentation in self._help.items():
            yield CounterMetricFamily(name, documentation)

    def collect(self) -> Iterator[Metric]:
        for name, documentation in self._help.items():
            read = self._read.get(name)
            yield CounterMetricFamily(name, documentation, value=read() if read else 0.0)


class _KeyExpiryCollector(Collector):
    """Active API keys by days left to their expiry (server/auth/expiry.py), read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "llmgw_api_keys",
            "Active API keys by days left to their expiry: expired, lt_1, lt_7, lt_14"
            " (reported as expiring), lt_30, lt_90, later, never.",
            labels=["days_left"],
        )
        for bucket, count in self._counts().items():
            family.add_metric([bucket], float(count))
        yield family


class _StoredKeysCollector(Collector):
    """Stored provider keys in use (server/credentials.py), 1 for each that cannot be used."""

    def __init__(self, status: Callable[[], dict[str, bool]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if not status:
            return  # no provider reads a stored key: no such metric
        family = GaugeMetricFamily(
            "llmgw_stored_provider_keys_undecryptable",
            "Stored provider keys (api_key_stored) the providers use: 1 while the gateway holds"
            " no usable value for the key (it could not be read or decrypted, and its"
            " provider fails closed), 0 otherwise.",
            labels=["stored_key"],
        )
        for name, failing in status.items():
            family.add_metric([name], 1.0 if failing else 0.0)
        yield family


QUOTA_BACKEND_FAILURES = "llmgw_quota_backend_failures"
LEDGER_WRITE_FAILURES = "llmgw_ledger_write_failures"
LEDGER_ROWS_DROPPED = "llmgw_ledger_rows_dropped"
CACHE_BACKEND_FAILURES = "llmgw_cache_backend_failures"
CACHE_EVICTIONS = "llmgw_cache_evictions"
CACHE_LOOKUP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]


class _CacheSizeCollector(Collector):
    """The response cache's memory backend: bytes and entries stored, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "llmgw_cache_bytes",
            "Bytes of answers held by the response cache's memory backend (encoded size).",
            value=stats.get("bytes", 0.0),
        )
        yield GaugeMetricFamily(
            "llmgw_cache_entries",
            "Answers held by the response cache's memory backend.",
            value=stats.get("entries", 0.0),
        )


# CallRecord.cache outcomes whose answer was replayed, not made upstream.
_REPLAYED = frozenset({"hit", "replay"})


class GatewayMetrics:
    """The gateway's metrics in their own registry (so several gateways can coexist).

    `known_models` and `known_deployments` (provider/model) always have a
    label of their own; other names share the MAX_LABEL_VALUES cap.
    """

    def __init__(
        self,
        *,
        in_flight: Callable[[], float] = lambda: 0.0,
        breaker_state: Callable[[str], BreakerState] | None = None,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
        known_models: Iterable[str] = (),
        known_deployments: Iterable[str] = (),
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.rpcs = Counter(
            "llmgw_rpcs",
            "Generation calls by edge (grpc, http), method and status code.",
            ["edge", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "llmgw_request_duration_seconds",
            "Generation call latency, to the last byte (gen_ai.server.request.duration).",
            ["edge", "method", "model", "provider"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llmgw_time_to_first_token_seconds",
            "Time to the first content token (gen_ai.server.time_to_first_token).",
            ["model", "provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llmgw_time_per_output_token_seconds",
            "Time per output token after the first (gen_ai.server.time_per_output_token).",
            ["model", "provider"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llmgw_tokens",
            "Upstream tokens by model, provider and type (input, output, cache_read,"
            " cache_creation); answers replayed from the cache count none.",
            ["model", "provider", "type"],
            registry=r,
        )
        self.cost = Counter(
            "llmgw_cost_usd", "Cost of the calls in US dollars.", ["model", "provider"], registry=r
        )
        self.refusals = Counter(
            "llmgw_refusals",
            "Calls refused by rate limits, quotas, budgets and the overload gate, by reason.",
            ["reason"],
            registry=r,
        )
        self.budget_alerts = Counter(
            "llmgw_budget_alerts",
            "Budget alerts fired (each once per key, period and threshold).",
            ["period", "threshold"],
            registry=r,
        )
        self.attempts = Counter(
            "llmgw_upstream_attempts",
            "Upstream attempts by deployment and outcome (OK, CANCELLED, an error reason).",
            ["provider", "model", "outcome"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "llmgw_upstream_errors",
            "Failed upstream attempts by deployment and error reason.",
            ["provider", "model", "reason"],
            registry=r,
        )
        self.cache_calls = Counter(
            "llmgw_cache_calls",
            "Generation calls by response-cache outcome (hit, miss, bypass, refresh) and edge.",
            ["edge", "outcome"],
            registry=r,
        )
        self.cache_lookup = Histogram(
            "llmgw_cache_lookup_seconds",
            "Time to look a call up in the response cache (the backend's get), by edge.",
            ["edge"],
            buckets=CACHE_LOOKUP_BUCKETS,
            registry=r,
        )
        # Guardrails (server/guardrails/): entity types are a fixed set of names.
        self.guardrail_findings = Counter(
            "llmgw_guardrail_findings",
            "PII and secrets the guardrail found, by entity type, action and stage"
            " (input, output).",
            ["entity", "action", "stage"],
            registry=r,
        )
        self.guardrail_failures = Counter(
            "llmgw_guardrail_failures",
            "Guardrail analyses not done (timeout, error, budget), by stage; each one"
            " blocked its call or let it through as on_error says.",
            ["stage", "reason"],
            registry=r,
        )
        self.guardrail_seconds = Histogram(
            "llmgw_guardrail_analysis_seconds",
            "Time one guarded stage of a call spent analysing its text, by stage.",
            ["stage"],
            buckets=GUARDRAIL_BUCKETS,
            registry=r,
        )
        in_flight_gauge = Gauge(
            "llmgw_calls_in_flight",
            "Generation calls being served, on both edges.",
            registry=r,
        )
        in_flight_gauge.set_function(in_flight)
        self._counts = _CountsCollector(
            {
                QUOTA_BACKEND_FAILURES: "Operations on the shared limits store (Redis) that"
                " failed; each one was let through or refused as redis.failure_mode says.",
                LEDGER_WRITE_FAILURES: "Writes of usage-ledger rows that failed (each batch"
                " is retried).",
                LEDGER_ROWS_DROPPED: "Usage-ledger rows dropped: the ledger failed until"
                " ledger.max_buffered rows were waiting.",
                CACHE_EVICTIONS: "Answers the response cache's memory backend dropped to"
                " stay within cache.max_bytes.",
                CACHE_BACKEND_FAILURES: "Response-cache operations on Redis that failed;"
                " each call went on without the cache.",
            }
        )
        r.register(self._counts)
        self._deployments: set[str] = set()
        if breaker_state is not None:
            r.register(_BreakerCollector(self._deployments, breaker_state))
        self._model = BoundedLabel(known=known_models)
        self._deployment = BoundedLabel(known=known_deployments)
        self._reason = BoundedLabel(100)

    # -- observers -----------------------------------------------------------------

    def observe_call(self, record: CallRecord) -> None:
        """CallRecord observer (runs once per generation call)."""
        model = self._model(record.model_served)
        provider = record.provider
        self.rpcs.labels(record.edge, record.method, record.status.name).inc()
        latency = record.latency_s
        if latency is not None:
            self.duration.labels(record.edge, record.method, model, provider).observe(latency)
        usage = record.usage
        # An answer replayed (a cache hit, a repeated request id) used no
        # upstream tokens, and its timing is not the model's.
        replayed = record.cache in _REPLAYED
        ttft = record.time_to_first_token_s
        if ttft is not None and not replayed:
            self.ttft.labels(model, provider).observe(ttft)
            if latency is not None and usage.output_tokens > 1:
                per_token = (latency - ttft) / (usage.output_tokens - 1)
                self.tpot.labels(model, provider).observe(per_token)
        if provider and not replayed:
            for kind, count in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
                ("cache_read", usage.cache_read_input_tokens),
                ("cache_creation", usage.cache_creation_input_tokens),
            ):
                if count:
                    self.tokens.labels(model, provider, kind).inc(count)
            if record.cost.total_nanos:
                self.cost.labels(model, provider).inc(record.cost.total_nanos / 1e9)
        if record.cache:
            self.cache_calls.labels(record.edge, record.cache).inc()
            if record.cache_lookup_s is not None:
                self.cache_lookup.labels(record.edge).observe(record.cache_lookup_s)
        if (
            record.status.name == "RESOURCE_EXHAUSTED"
            and not record.error_reason.startswith("UPSTREAM_")
        ) or record.error_reason == "GATEWAY_OVERLOADED":  # shed at the overload gate
            self.record_refusal(record.error_reason or "RESOURCE_EXHAUSTED")

    def observe_routed(self, call: RoutedCall) -> None:
        """Router observer: one count per upstream attempt."""
        for attempt in call.attempts:
            deployment = self._deployment(attempt.deployment)
            if deployment != OTHER:
                self._deployments.add(deployment)
            provider, _, model = deployment.partition("/")
            outcome = self._reason(attempt.outcome)
            self.attempts.labels(provider, model, outcome).inc()
            if attempt.outcome not in _NOT_UPSTREAM_ERRORS:
                self.upstream_errors.labels(provider, model, outcome).inc()

    # -- hooks for limits and budgets ------------------------------------------------

    def record_refusal(self, reason: str) -> None:
        """A call refused by a limit (the error's reason: RATE_LIMIT_EXCEEDED, ...)."""
        self.refusals.labels(self._reason(reason)).inc()

    def watch_quota_backend_failures(self, count: Callable[[], float]) -> None:
        """Reads the shared limits store's failure count (never decreasing) at each scrape."""
        self._counts.watch(QUOTA_BACKEND_FAILURES, count)

    def watch_ledger(self, failures: Callable[[], float], dropped: Callable[[], float]) -> None:
        """Reads the ledger's failed writes and dropped rows (never decreasing) at each scrape."""
        self._counts.watch(LEDGER_WRITE_FAILURES, failures)
        self._counts.watch(LEDGER_ROWS_DROPPED, dropped)

    def watch_cache(self, stats: Callable[[], dict[str, float]]) -> None:
        """Reads the response cache's size, evictions and backend failures at each scrape."""
        self._counts.watch(CACHE_EVICTIONS, lambda: stats().get("evictions", 0.0))
        self._counts.watch(CACHE_BACKEND_FAILURES, lambda: stats().get("backend_failures", 0.0))
        self.registry.register(_CacheSizeCollector(stats))

    def watch_key_expiry(self, counts: Callable[[], dict[str, int]]) -> None:
        """Reads active API keys by days-left bucket at each scrape (blocking is fine there)."""
        self.registry.register(_KeyExpiryCollector(counts))

    def watch_stored_provider_keys(self, status: Callable[[], dict[str, bool]]) -> None:
        """Reads which stored provider keys cannot be used at each scrape (name: failing)."""
        self.registry.register(_StoredKeysCollector(status))

    def record_guardrail(
        self, stage: str, action: str, counts: dict[str, int], seconds: float, failure: str | None
    ) -> None:
        """One guarded stage of a call: what it found, how long it took, what it missed."""
        for entity, count in counts.items():
            self.guardrail_findings.labels(self._reason(entity), action, stage).inc(count)
        if failure is not None:
            self.guardrail_failures.labels(stage, failure).inc()
        self.guardrail_seconds.labels(stage).observe(seconds)

    def record_budget_alert(self, period: str, threshold: float) -> None:
        """A key's spend crossed `threshold` (0.5, 0.8, ...) of its `period` budget."""
        self.budget_alerts.labels(self._reason(period), f"{threshold:g}").inc()


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus-client's, on a daemon thread)."""

    def __init__(self, metrics: GatewayMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        server, thread = start_http_server(self._port, self._host, self._metrics.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_address[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the serving thread's poll (up to half a second).
            await asyncio.to_thread(server.shutdown)
            server.server_close()
