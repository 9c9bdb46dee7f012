"""llm-gateway's server: one gRPC contract in front of every LLM provider.

The public surface is what this module exports; everything else is internal.
"""

from server.app import Gateway, serve
from server.config import ConfigError, GatewayConfig, load_config
from server.errors import GatewayError
from server.events import ResponseAccumulator, StreamEvent, fold
from server.providers.base import Provider, ProviderSettings

__all__ = [
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
