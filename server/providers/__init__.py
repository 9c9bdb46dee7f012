"""Provider backends. Add one: subclass Provider (base.py) and register it (registry.py)."""

from server.providers.base import Provider, ProviderSettings
from server.providers.registry import available_kinds, provider_class

__all__ = ["Provider", "ProviderSettings", "available_kinds", "provider_class"]
