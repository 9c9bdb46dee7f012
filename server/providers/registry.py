"""Finds provider implementations by kind.

Built-in providers are listed here. Third parties add their own without
touching this code by declaring an entry point in the `llmgateway.providers`
group whose value is a Provider subclass, e.g. in their pyproject.toml:

    [project.entry-points."llmgateway.providers"]
    mycloud = "mycloud_gateway:MyCloudProvider"

and then configuring `providers: {mine: {type: mycloud, ...}}`.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points

from server.providers.base import Provider

ENTRY_POINT_GROUP = "llmgateway.providers"
log = logging.getLogger(__name__)

# kind -> "module:Class"; imported lazily so an unused provider's SDK is never loaded.
_BUILTIN: dict[str, str] = {
    "offline": "server.providers.offline:OfflineProvider",
    "anthropic": "server.providers.anthropic_messages:AnthropicProvider",
    "openai": "server.providers.openai_chat:OpenAIChatProvider",
}


class UnknownProviderKindError(LookupError):
    pass


@cache
def _discovered() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILTIN and ep.value != _BUILTIN[ep.name]:
            log.warning("entry point %r shadows a built-in provider kind; ignored", ep.name)
            continue
        found[ep.name] = ep.value
    return found


def available_kinds() -> list[str]:
    """Every provider kind that can be configured."""
    return sorted({*_BUILTIN, *_discovered()})


def provider_class(kind: str) -> type[Provider]:
    """The Provider subclass registered for `kind`."""
    target = _BUILTIN.get(kind) or _discovered().get(kind)
    if target is None:
        raise UnknownProviderKindError(
            f"unknown provider type {kind!r}; available: {', '.join(available_kinds())}"
        )
    module_name, _, attribute = target.partition(":")
    cls = getattr(import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise UnknownProviderKindError(f"{target} is not a Provider subclass")
    return cls
