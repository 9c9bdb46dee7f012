"""The router: from a requested model to the provider that serves it.

It owns the model catalog (every provider's models and aliases) and wraps
each provider stream with what the gateway adds on the way back: the cost
of the final usage. Retries, fallbacks and load balancing (later) live
here too, so the servicer never talks to a provider directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from server.config import ConfigError, GatewayConfig
from server.costs import compute_cost
from server.events import MessageDelta, StreamEvent
from server.providers.base import Provider
from server.providers.registry import UnknownProviderKindError, provider_class
from server.schema import GenerationRequest, ModelInfo, TokenCount, TokenCountRequest


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: a provider and the model it serves."""

    provider: Provider
    model: ModelInfo


def build_providers(config: GatewayConfig) -> list[Provider]:
    """Instantiates the configured providers; errors name the bad key."""
    providers: list[Provider] = []
    for name, section in config.providers.items():
        try:
            cls = provider_class(section.type)
        except UnknownProviderKindError as err:
            raise ConfigError(f"invalid configuration:\n  providers.{name}.type: {err}") from None
        try:
            providers.append(cls.from_settings(name, section.settings()))
        except ValidationError as err:
            problems = "\n".join(
                f"  providers.{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors()
            )
            raise ConfigError(f"invalid configuration:\n{problems}") from None
    return providers


class Router:
    """Resolves models to providers and runs calls on them."""

    def __init__(self, providers: Iterable[Provider]) -> None:
        self._providers = list(providers)
        self._routes: dict[str, Route] = {}
        for provider in self._providers:
            for model in provider.models():
                for key in (model.id, *model.aliases):
                    existing = self._routes.get(key)
                    if existing is not None:
                        raise ConfigError(
                            f"invalid configuration:\n  providers.{provider.name}: model {key!r}"
                            f" is also served by provider {existing.provider.name!r}"
                        )
                    self._routes[key] = Route(provider, model)

    @property
    def providers(self) -> Sequence[Provider]:
        return self._providers

    def resolve(self, model: str) -> Route | None:
        """The route for a model id or alias, or None when nobody serves it.

        Listed ids and aliases first; then an unlisted id is offered to each
        provider in configuration order (e.g. `claude-...` to Anthropic).
        """
        route = self._routes.get(model)
        if route is not None:
            return route
        for provider in self._providers:
            info = provider.unlisted_model(model)
            if info is not None:
                return Route(provider, info)
        return None

    def models(self, provider: str = "") -> list[ModelInfo]:
        """Every model served (each once, aliases included), optionally of one provider."""
        return [
            model
            for p in self._providers
            if not provider or p.name == provider
            for model in p.models()
        ]

    async def stream(self, request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        """Runs a generation on the route's provider, pricing the final usage."""
        request.model = route.model.id
        pricing = route.model.pricing
        upstream = route.provider.stream(request)
        try:
            async for event in upstream:
                if isinstance(event, MessageDelta) and event.usage is not None:
                    event.cost = compute_cost(event.usage, pricing)
                yield event
        finally:
            # Closing an async generator runs the provider's `finally`, which
            # closes the upstream response: a cancelled call stops at once.
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def count_tokens(self, request: TokenCountRequest, route: Route) -> TokenCount:
        request.model = route.model.id
        return await route.provider.count_tokens(request)

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()
