"""Channel defaults shared by the async and the sync client.

Retries are the client's own (clients/_retries.py, `max_retries`), around
each call and above the token interceptors, so grpc's retry policy is off
here: with both, attempts would multiply. The gateway retries upstream
providers itself (server/routing/); the client retries what reaches it as
UNAVAILABLE, or RESOURCE_EXHAUSTED with RetryInfo.
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_TIMEOUT_S", "channel_options", "default_address"]

DEFAULT_ADDRESS = "localhost:50051"
# A whole generation, not one token: long outputs from large models take minutes.
DEFAULT_TIMEOUT_S = 600.0
ADDRESS_ENV = "LLMGW_ADDRESS"
API_KEY_ENV = "LLMGW_API_KEY"
USER_AGENT = "llm-gateway-python/0.1"


def channel_options() -> list[tuple[str, str | int]]:
    """grpc channel arguments: keepalive, message sizes, user agent; no grpc retries."""
    return [
        # The client retries (clients/_retries.py); grpc's own would multiply its attempts.
        ("grpc.enable_retries", 0),
        # Ping a connection every 30 s while calls run, so a peer or proxy that
        # vanished fails the call in ~40 s instead of hanging to the deadline.
        # The gateway accepts pings every 10 s (server.min_client_ping_interval_s).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Inline images make requests large. The gateway sets its own limit
        # (server.max_receive_message_bytes, 4 MiB by default) and refuses a
        # larger request with RESOURCE_EXHAUSTED; the client does not guess it.
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
