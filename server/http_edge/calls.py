"""Generation calls that came over HTTP, run through the core as gRPC calls are.

Whatever the protocol (Anthropic Messages here; OpenAI's next), a call
passes the same steps as on the gRPC edge, in the same order, each written
once in the core: the process-wide bound on calls in flight
(server/accounting/overload_gate.py), the key's call gate (requests per
minute, concurrency),
one CallRecord that every observer sees when the call ends (ledger,
metrics, the per-call log line, audit, trace attributes), the model
allow-list, and the admission of tokens per minute and budget. The
protocol's adapter only decodes the request and encodes the events.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from server.accounting.call_gate import CallGate
from server.accounting.overload_gate import OverloadGate
from server.calls import (
    CallObserver,
    CallRecord,
    Drain,
    Durability,
    accounted,
    close_durably,
    close_record,
    open_record,
    random_id,
)
from server.identity import current_identity, require_model_access
from server.routing import Route
from server.schema import GenerationRequest
from server.stall_watch import watching

if TYPE_CHECKING:
    from server.accounting import Admission

EDGE = "http"


class HttpCalls:
    """Runs the core's per-call steps for the HTTP edge's protocol adapters."""

    def __init__(
        self,
        gate: CallGate,
        admission: Admission | None,
        observers: list[CallObserver],
        tracer: trace.Tracer | None = None,
        *,
        durable: Durability | None = None,
        drain: Drain | None = None,
        overload: OverloadGate | None = None,
        stalled_stream_timeout_s: float = 0.0,
    ) -> None:
        self._gate = gate
        self._admission = admission
        # The gRPC servicer's list itself: observers added later are seen too.
        self._observers = observers
        self._tracer = tracer
        # ledger.durability: sync: the answer's last bytes wait for the call's row.
        self._durable = durable
        self._drain = drain  # calls the gateway's drain cuts are recorded UNAVAILABLE
        self._overload = overload  # the calls in flight on both edges, bounded
        # A stream whose client reads nothing this long ends (server/stall_watch.py;
        # the StreamWriter's writes are watched, 0: never).
        self._stalled_s = stalled_stream_timeout_s
        self.in_flight = 0

    @asynccontextmanager
    async def call(
        self, method: str, request_id: str, headers: Mapping[str, str], span_name: str
    ) -> AsyncIterator[CallRecord]:
        """One generation call: through the overload and key gates, recorded however
        it ends.

        A refusal at a gate raises its GatewayError, recorded like any call.
        """
        record = open_record(method, "")
        record.edge = EDGE
        record.request_id = request_id
        overload = self._overload
        if overload is not None:
            refused = await overload.enter()
            if refused is not None:
                close_record(record, self._observers, refused.code, refused.reason)
                raise refused
        try:
            with self._span(span_name, headers) as span:
                identity = current_identity()
                limits = self._gate.limits_for(identity)
                holder = ""
                if limits is not None:
                    holder = random_id()
                    key_id = identity.key_id if identity is not None else ""
                    refusal = await self._gate.admit(key_id, limits, holder)
                    if refusal is not None:
                        close_record(record, self._observers, refusal.code, refusal.reason)
                        raise refusal
                self.in_flight += 1
                try:
                    async with (
                        accounted(
                            record, self._observers, None, durable=self._durable, drain=self._drain
                        ),
                        watching(self._stalled_s),
                    ):
                        yield record
                finally:
                    self.in_flight -= 1
                    if limits is not None and limits.max_concurrent is not None:
                        self._gate.leave(record.key_id, holder)
                    if span is not None and record.status.name in _SERVER_FAILURES:
                        span.set_status(Status(StatusCode.ERROR, record.error_reason))
        finally:
            if overload is not None:
                overload.leave()

    async def finished(self, record: CallRecord) -> None:
        """The call's events have all passed and only its answer's last bytes are left.

        With ledger.durability: sync the record is closed (OK) here and its row
        committed before those bytes go; otherwise it closes when the call ends.
        """
        if self._durable is not None:
            await close_durably(record, self._observers, self._durable, grpc.StatusCode.OK)

    async def admit(self, record: CallRecord, request: GenerationRequest, route: Route) -> None:
        """What a decoded request passes before any upstream call (as on gRPC)."""
        record.model_requested = request.model
        record.request = request
        record.pricing = route.model.pricing
        if not record.end_user:
            record.end_user = request.metadata.end_user_id
        require_model_access(request.model, route.model.id)
        if self._admission is not None:
            await self._admission.admit(record, request, route)

    @contextlib.contextmanager
    def _span(self, name: str, headers: Mapping[str, str]) -> Iterator[trace.Span | None]:
        if self._tracer is None:
            yield None
            return
        parent = propagate.extract(dict(headers))
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, record_exception=False
        ) as span:
            yield span


# Status codes that count as the server's failure (as on the gRPC edge).
_SERVER_FAILURES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
