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
