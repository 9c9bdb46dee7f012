"""The grpc.health.v1.Health service, with Watch streams that end on drain.

grpcio-health-checking's servicer keeps every Watch stream open until the
server cancels it, so one watching sidecar would hold each shutdown for the
whole grace period. Here a Watch sends the final NOT_SERVING and then ends
once the gateway drains, so shutdown waits only for generation calls.
Everything else follows the protocol in grpc/health/v1/health.proto:
Check answers NOT_FOUND for an unknown service, List the status of every
service registered (grpcio-health-checking's servicer has no List), Watch
answers SERVICE_UNKNOWN and waits for it to appear.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# List's response; grpcio-health-checking's health_pb2 has it, the typeshed
# stubs (types-grpcio-health-checking) do not yet. Typed Any: types-protobuf's
# Message takes no field arguments (since its 2026-11-22 release), this one does.
HealthListResponse: Any = health_pb2.HealthListResponse  # type: ignore[attr-defined]


class HealthService(health_pb2_grpc.HealthServicer):
    """Serving status per service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._draining = False

    def set(self, service: str, status: int) -> None:
        """Sets a service's status; ignored once draining (it stays NOT_SERVING)."""
        if not self._draining:
            self._status[service] = status
            self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Turns every service NOT_SERVING for good and ends Watch streams."""
        self._draining = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._notify()

    def _notify(self) -> None:
        # Wake every watcher of this generation; later waiters get a new event.
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        # A handful of services: far from the size where the protocol lets a
        # server answer RESOURCE_EXHAUSTED instead.
        response: Message = HealthListResponse(
            statuses={
                service: health_pb2.HealthCheckResponse(status=status)
                for service, status in self._status.items()
            }
        )
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        last: int | None = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._draining:
                return
            await changed.wait()
