"""Pins what users may import; a change here is a change to the public surface."""

from __future__ import annotations

import server
import server.providers


def test_server_exports() -> None:
    assert sorted(server.__all__) == [
        "ConfigError",
        "Gateway",
        "GatewayConfig",
        "GatewayError",
        "Provider",
        "ProviderSettings",
        "ResponseAccumulator",
        "StreamEvent",
        "fold",
        "load_config",
        "serve",
    ]
    for name in server.__all__:
        assert getattr(server, name) is not None


def test_provider_exports() -> None:
    assert sorted(server.providers.__all__) == [
        "Provider",
        "ProviderSettings",
        "available_kinds",
        "provider_class",
    ]
    assert "offline" in server.providers.available_kinds()


def test_client_exports() -> None:
    import clients

    assert sorted(clients.__all__) == [
        "DeadlineExceededError",
        "FieldViolation",
        "GatewayClient",
        "GatewayClientSync",
        "GatewayError",
        "InternalError",
        "InvalidArgumentError",
        "NotFoundError",
        "PermissionDeniedError",
        "Prompt",
        "RateLimitedError",
        "RequestOptions",
        "Response",
        "ResponseBlock",
        "ResponseStream",
        "ResponseStreamSync",
        "StreamAccumulator",
        "TokenSource",
        "UnauthenticatedError",
        "UnavailableError",
        "assistant",
        "build_request",
        "image",
        "image_url",
        "response_message",
        "response_text",
        "to_json",
        "tool",
        "tool_choice",
        "tool_result",
        "user",
    ]
    for name in clients.__all__:
        assert getattr(clients, name) is not None
