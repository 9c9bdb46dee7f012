"""`python -m server.healthcheck`: exits 0 when the gateway reports SERVING.

Speaks the standard grpc.health.v1 protocol, so it serves as the Docker
HEALTHCHECK and as an exec probe where a native gRPC probe is unavailable.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """Returns the serving status name of `service` ("" for the whole server)."""
    with grpc.insecure_channel(address) as channel:
        # The type stubs declare HealthStub's methods on the async variant only.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response: health_pb2.HealthCheckResponse = stub.Check(request, timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port of the gateway")
    parser.add_argument("--service", default="", help="service name; empty for the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        print(f"unhealthy: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
