"""The observability of one gateway, assembled from config (see server/telemetry/)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from opentelemetry.sdk.trace import TracerProvider

from interceptors.tracing import TracingInterceptor
from server.accounting import BudgetAlert
from server.config import GatewayConfig
from server.grpc_edge.servicer import GenerationServicer
from server.logs import log_call
from server.routing import Router
from server.telemetry.audit import BUDGET_ALERT, audit_call, audit_event, close_audit, ensure_audit
from server.telemetry.metrics import GatewayMetrics, MetricsServer
from server.telemetry.tracing import TRACER_NAME, CallSpans, build_tracer_provider

log = logging.getLogger(__name__)


class Telemetry:
    """The observability of one gateway.

    `tracer_provider` replaces the configured one (tests pass one with an
    in-memory exporter); tracing is on when either exists.
    """

    def __init__(
        self,
        config: GatewayConfig,
        servicer: GenerationServicer,
        router: Router,
        *,
        tracer_provider: TracerProvider | None = None,
        in_flight: Callable[[], float] | None = None,
    ) -> None:
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        self._owned_provider = None
        if tracer_provider is None:
            tracer_provider = self._owned_provider = build_tracer_provider(config.tracing)
        self.tracer_provider = tracer_provider
        if tracer_provider is not None:
            tracer = tracer_provider.get_tracer(TRACER_NAME)
            spans = CallSpans(tracer)
            servicer.observers.append(spans.on_call)
            router.observers.append(spans.on_routed)
            self.interceptors.append(
                TracingInterceptor(tracer, capture_content=config.tracing.capture_content)
            )
        self.metrics: GatewayMetrics | None = None
        self._metrics_server: MetricsServer | None = None
        if config.metrics.enabled:
            models, deployments = served_names(router)
            self.metrics = GatewayMetrics(
                # Both edges' calls (the gateway's count), else the servicer's.
                in_flight=in_flight or (lambda: servicer.in_flight),
                breaker_state=router.breaker_state,
                known_models=models,
                known_deployments=deployments,
            )
            servicer.observers.append(self.metrics.observe_call)
            router.observers.append(self.metrics.observe_routed)
            self._metrics_host = config.metrics.host
            self._metrics_server = MetricsServer(
                self.metrics, config.metrics.host, config.metrics.port
            )
        if config.logging.calls:
            servicer.observers.append(log_call)
        servicer.observers.append(audit_call)
        self._audit_sink = ensure_audit(config.audit)

    def on_budget_alert(self, alert: BudgetAlert) -> None:
        """A budget threshold crossed: an audit event and a counter."""
        audit_event(
            BUDGET_ALERT,
            key_id=alert.key_id,
            period=alert.period,
            threshold=alert.threshold,
            spent_nanos=alert.spent_nanos,
            limit_nanos=alert.limit_nanos,
        )
        if self.metrics is not None:
            self.metrics.record_budget_alert(alert.period, alert.threshold)

    @property
    def metrics_port(self) -> int:
        """The port /metrics is served on (0 when metrics are off or not started)."""
        return self._metrics_server.port if self._metrics_server is not None else 0

    def start(self) -> None:
        if self._metrics_server is not None:
            port = self._metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", self._metrics_host, port)

    async def stop(self) -> None:
        """Stops the metrics endpoint and flushes the spans still queued."""
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._owned_provider is not None:
            await asyncio.to_thread(self._owned_provider.shutdown)
        if self._audit_sink is not None:  # opened by this gateway: closed by it
            close_audit(self._audit_sink)


def served_names(router: Router) -> tuple[set[str], set[str]]:
    """The model names and deployments (provider/model) the configuration serves.

    Every listed id, alias and route, and every deployment they resolve to,
    with the model id that deployment reports as served.
    """
    models: set[str] = set()
    deployments: set[str] = set()
    for info in router.models():
        for name in (info.id, *info.aliases):
            models.add(name)
            route = router.resolve(name)
            for deployment in route.deployments if route is not None else ():
                models.add(deployment.model.id)
                deployments.add(deployment.name)
    return models, deployments
