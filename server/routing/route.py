"""Routes and deployments: where a requested model may be served.

A deployment is one provider instance serving one model (its own key,
region or server). A route is what a model id or alias resolves to: its
deployments, grouped by priority (tried in order) and load-balanced within
a group. Without configured routes each model has a one-deployment route.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.providers.base import Provider
from server.schema import GenerationRequest, ModelInfo


@dataclass(frozen=True, slots=True)
class Deployment:
    """One provider instance serving one model; `model` carries its limits."""

    provider: Provider
    model: ModelInfo
    weight: float = 1.0
    priority: int = 0
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.provider.name}/{self.model.id}")


# Picks the route a smart alias stands for, for one request: (route, tier, reason).
SmartChooser = Callable[[GenerationRequest], "tuple[Route, str, str]"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes.

    `provider` and `model` are the first deployment's, except that a
    configured route's `model` is named after the route's alias and carries
    the most generous limits among its deployments (each deployment is
    checked against its own limits when the call is routed).
    """

    provider: Provider
    model: ModelInfo
    deployments: tuple[Deployment, ...] = ()
    # Set for the smart-routing alias: the route is chosen per request.
    choose: SmartChooser | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.deployments:
            object.__setattr__(self, "deployments", (Deployment(self.provider, self.model),))
