"""The provider interface: what a backend must do to serve models.

A provider speaks only the gateway's internal types (server/schema.py and
server/events.py). It streams; the gateway folds the stream for unary calls,
so a provider implements generation exactly once. Each provider class
declares a pydantic `Settings` model for its own configuration section.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from server.errors import InvalidArgumentError
from server.events import StreamEvent
from server.schema import GenerationRequest, ModelInfo, TokenCount, TokenCountRequest


class ProviderSettings(BaseModel):
    """Base of every provider's settings; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Provider(abc.ABC):
    """A backend that serves some models.

    `name` is the configured instance name (e.g. "anthropic-eu"); `kind` is
    the registry name of the implementation (e.g. "anthropic").
    """

    kind: ClassVar[str]
    Settings: ClassVar[type[ProviderSettings]] = ProviderSettings
    # True when the chunk boundaries of `stream` are part of the output (a
    # deterministic test double): the gateway then never merges waiting
    # deltas (server/grpc_edge/coalescing.py) for this provider.
    exact_chunks: ClassVar[bool] = False
    # The wire formats (server/schema.py's Passthrough.protocol) whose requests
    # this provider sends upstream verbatim instead of translating them (an
    # instance may narrow it: not every OpenAI-compatible server has every API).
    relays: frozenset[str] = frozenset()

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> Provider:
        """Builds a provider from its raw configuration section.

        Raises pydantic.ValidationError; the caller names the section.
        """
        return cls.create(name, cls.Settings.model_validate(dict(settings)))

    @classmethod
    @abc.abstractmethod
    def create(cls, name: str, settings: Any) -> Provider:
        """Builds a provider from its validated settings."""

    @abc.abstractmethod
    def models(self) -> Sequence[ModelInfo]:
        """The models this provider serves."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Generates, yielding events as they arrive.

        The events follow the order documented on StreamGenerate. The
        iterator must release upstream resources when closed early (the
        caller cancelled), so implementations close them in `finally`.
        """

    def refusal(self, request: GenerationRequest) -> InvalidArgumentError | None:
        """What `stream` would refuse in `request` before any upstream call (a
        parameter its model does not take, an option it will not send), found
        without side effects by the code `stream` builds its call with; None
        when it can take the request. The router asks every deployment a call
        may reach before the first attempt, so that a fallback that cannot take
        the request is skipped instead of hiding the primary's failure.
        """
        return None

    @abc.abstractmethod
    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        """Counts the input tokens of a request."""

    def unlisted_model(self, model_id: str) -> ModelInfo | None:
        """The model an id this provider does not list names, if it serves it anyway.

        SDK providers serve new models by id prefix (`claude-`, `gpt-`) on the
        day they ship; the default serves only listed models.
        """
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Releases clients and connections at shutdown."""
