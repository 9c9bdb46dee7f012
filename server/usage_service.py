"""The UsageService servicer: ledger totals and budget state, for admins.

Admin scope comes from the auth interceptor (a service without a configured
scope needs `admin`). GetUsage flushes the ledger's queued rows first, so
calls that ended before the request are counted.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from llmgateway.v1 import usage_pb2 as pb
from llmgateway.v1 import usage_pb2_grpc as pb_grpc
from server.accounting import Accounting
from server.accounting.ledger import Grouping
from server.auth.keys import KeyStore
from server.errors import FieldViolation, InvalidArgumentError, UnavailableError
from server.grpc_edge.servicer import error_boundary

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["UsageService"].full_name

_GROUPINGS: dict[int, Grouping] = {
    pb.USAGE_GROUPING_UNSPECIFIED: "",
    pb.USAGE_GROUPING_KEY: "key",
    pb.USAGE_GROUPING_MODEL: "model",
    pb.USAGE_GROUPING_PROVIDER: "provider",
}
_DEFAULT_WINDOW_S = 86_400.0


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class UsageServicer(pb_grpc.UsageServiceServicer):
    """Serves llmgateway.v1.UsageService over the gateway's Accounting."""

    def __init__(self, accounting: Accounting, key_store: KeyStore | None = None) -> None:
        self._accounting = accounting
        self._keys = key_store

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        async with error_boundary(context):
            ledger = self._accounting.ledger
            if ledger is None:
                raise UnavailableError("the usage ledger is disabled (ledger.enabled: false)")
            grouping = _GROUPINGS.get(request.group_by)
            if grouping is None:
                raise InvalidArgumentError([FieldViolation("group_by", "unknown grouping")])
            end = (
                request.end_time.ToNanoseconds() / 1e9
                if request.HasField("end_time")
                else time.time()
            )
            start = (
                request.start_time.ToNanoseconds() / 1e9
                if request.HasField("start_time")
                else end - _DEFAULT_WINDOW_S
            )
            if start >= end:
                raise InvalidArgumentError(
                    [FieldViolation("start_time", "must be before end_time")]
                )
            await ledger.flush()
            totals = await ledger.totals(start, end, grouping, request.key_id)
            return pb.GetUsageResponse(
                totals=[
                    pb.UsageTotals(
                        group=t.group,
                        requests=t.requests,
                        errors=t.errors,
                        input_tokens=t.input_tokens,
                        output_tokens=t.output_tokens,
                        cache_read_input_tokens=t.cache_read_tokens,
                        cache_creation_input_tokens=t.cache_write_tokens,
                        cost_nanos=t.cost_nanos,
                    )
                    for t in totals
                ],
                start_time=_timestamp(start),
                end_time=_timestamp(end),
            )
        return pb.GetUsageResponse()  # error_boundary has set the failure's status

    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetBudgetResponse:
        async with error_boundary(context):
            stored = None
            if self._keys is not None and request.key_id:
                record = await self._keys.get(request.key_id)
                stored = record.limits if record is not None else None
            limits = self._accounting.policy.limits_for_key(request.key_id, stored)
            states = await self._accounting.admission.budget_state(request.key_id, limits)
            return pb.GetBudgetResponse(
                key_id=request.key_id,
                budgets=[
                    pb.BudgetState(
                        period=period.kind,
                        period_label=period.label,
                        limit_nanos=period.counter.limit_nanos,
                        spent_nanos=spent,
                        reserved_nanos=reserved,
                        end_time=_timestamp(period.ends.timestamp()),
                    )
                    for period, spent, reserved in states
                ],
            )
        return pb.GetBudgetResponse()  # error_boundary has set the failure's status
