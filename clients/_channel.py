"""Channel defaults shared by the async and the sync client.

Retries: grpc itself retries a call that failed UNAVAILABLE before any
response arrived (the gateway draining, a connection refused during a
rolling update), per the service config below. grpc commits a call once
a response or its headers arrive, so a stream is never replayed after its
first event. Those retries happen inside grpc core, under the Python
interceptors: the token interceptors (clients/credentials.py) see one call,
and their own once-only UNAUTHENTICATED retry is separate. The gateway
retries upstream providers itself (server/routing/), so nothing here
retries RESOURCE_EXHAUSTED or INTERNAL.
"""

from __future__ import annotations

import json
import os

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_TIMEOUT_S", "channel_options", "default_address"]

DEFAULT_ADDRESS = "localhost:50051"
# A whole generation, not one token: long outputs from large models take minutes.
DEFAULT_TIMEOUT_S = 600.0
ADDRESS_ENV = "LLMGW_ADDRESS"
API_KEY_ENV = "LLMGW_API_KEY"
USER_AGENT = "llm-gateway-python/0.1"

SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "llmgateway.v1.GenerationService"},
                {"service": "llmgateway.v1.TokenService"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "3s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options() -> list[tuple[str, str | int]]:
    """grpc channel arguments: keepalive, retries, message sizes, user agent."""
    return [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # Ping a connection every 30 s while calls run, so a peer or proxy that
        # vanished fails the call in ~40 s instead of hanging to the deadline.
        # The gateway accepts pings every 10 s (server.min_client_ping_interval_s).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Inline images make requests large; the gateway accepts 32 MiB.
        ("grpc.max_send_message_length", 32 * 1024 * 1024),
        ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ("grpc.primary_user_agent", USER_AGENT),
    ]


def default_address() -> str:
    """LLMGW_ADDRESS, else localhost:50051."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def default_api_key() -> str | None:
    """LLMGW_API_KEY, if set."""
    return os.environ.get(API_KEY_ENV) or None
