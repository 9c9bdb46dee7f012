"""What an SDK-backed provider does that does not depend on its SDK.

Its models (configured, or the shipped catalog of its kind), routing of
unlisted ids by prefix, the caller's deadline as the upstream timeout, and
the SDK client behind a KeyedClient that follows a rotated API key. A
subclass names its SDK client class, model class, catalog and prefixes, and
implements `stream`, `count_tokens` and its one error-mapping function.
The HTTP client under the SDK (aiohttp or httpx) is built in _transport.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

import httpx2

from server.errors import FieldViolation, GatewayError, InvalidArgumentError
from server.providers._transport import HttpTransport, http_client
from server.providers._upstream import (
    PLACEHOLDER_KEY,
    KeyedClient,
    UpstreamModel,
    UpstreamSettings,
    log_upstream_failure,
    refuse,
)
from server.providers.base import Provider
from server.schema import GenerationRequest, ModelInfo, Pricing, dearest_pricing

ModelT = TypeVar("ModelT", bound=UpstreamModel)


class SdkProvider(Provider, Generic[ModelT]):
    """Base of the providers that reach their upstream through an official SDK."""

    # The SDK's async client class, the model settings class, the shipped
    # catalog and the id prefixes of the kind.
    client_class: ClassVar[Callable[..., Any]]
    # The SDK's HTTP client class for each transport (_transport.py).
    http_clients: ClassVar[dict[HttpTransport, Callable[..., httpx2.AsyncClient]]]
    Model: ClassVar[type[UpstreamModel]]
    catalog: ClassVar[Mapping[str, Mapping[str, Any]]]
    default_prefixes: ClassVar[tuple[str, ...]]

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        super().__init__(name)
        self._timeout = settings.timeout_s
        # Re-reads a rotated key (file, command, environment) without a restart.
        self._sdk = KeyedClient(name, self.make_client(settings), settings.credential())
        configured: list[ModelT] | None = getattr(settings, "models", None)
        if configured is None:
            configured = [cast(ModelT, self.Model(id=model_id)) for model_id in self.catalog]
        self._models: dict[str, ModelT] = {m.id: m for m in configured}
        self._infos = [m.info(name) for m in configured]
        prefixes = settings.route_prefixes
        self._prefixes = tuple(self.default_prefixes if prefixes is None else prefixes)
        unlisted = settings.unlisted_pricing
        self._configured_unlisted = None if unlisted is None else unlisted.pricing()
        # (upstream name, price) of every model listed here or in the catalog:
        # an unlisted id's family is found among them (built once, not per call).
        listed: list[UpstreamModel] = [*configured]
        listed += [self.Model(id=model_id) for model_id in self.catalog]
        self._listed_prices = [(m.upstream_name, m.info(name).pricing) for m in listed]

    def make_client(self, settings: UpstreamSettings) -> Any:
        """The SDK client, one per provider instance, over the configured transport
        (_transport.py); its connection pool is reused by every call."""
        return self.client_class(
            # KeyedClient swaps in the real key, and swaps again when it rotates.
            api_key=PLACEHOLDER_KEY,
            base_url=settings.base_url,
            timeout=settings.timeout_s,
            # The router retries and falls back; SDK retries would multiply them.
            max_retries=0,
            default_headers=settings.default_headers or None,
            http_client=http_client(
                settings.http_transport,
                self.http_clients,
                max_connections=settings.max_connections,
                keepalive_s=settings.keepalive_s,
                timeout_s=settings.timeout_s,
            ),
        )

    @classmethod
    def create(cls, name: str, settings: Any) -> SdkProvider[ModelT]:
        return cls(name, settings)

    def create_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The SDK's `create` keyword arguments for `request` (stream and timeout
        aside); raises InvalidArgumentError with every violation."""
        kwargs, violations = self._arguments(request)
        refuse(violations)
        return kwargs

    def refusal(self, request: GenerationRequest) -> InvalidArgumentError | None:
        passthrough = request.passthrough
        if passthrough is not None and passthrough.protocol in self.relays:
            return None  # sent as it came: the upstream judges it
        violations = self._arguments(request)[1]
        return InvalidArgumentError(violations) if violations else None

    def _arguments(self, request: GenerationRequest) -> tuple[dict[str, Any], list[FieldViolation]]:
        """The call's keyword arguments and what in `request` they cannot carry: the
        one function both `create_arguments` and `refusal` use."""
        raise NotImplementedError

    def models(self) -> Sequence[ModelInfo]:
        return self._infos

    def unlisted_model(self, model_id: str) -> ModelInfo | None:
        """An id nobody lists but with this kind's prefix: conservative limits, and priced.

        Never free: at `unlisted_pricing` when configured, else at the dearest
        listed price of its family (the listed models sharing the longest
        prefix with it, e.g. `claude-haiku-` for `claude-haiku-9`), field by
        field, so a key with a budget cannot call a new model for nothing.
        """
        if self._prefixes and model_id.startswith(self._prefixes):
            info = self.Model(id=model_id).info(self.name)
            return dataclasses.replace(info, pricing=self._unlisted_pricing(model_id))
        return None

    def _unlisted_pricing(self, model_id: str) -> Pricing:
        if self._configured_unlisted is not None:
            return self._configured_unlisted
        listed = self._listed_prices
        shared = [_shared_prefix(name, model_id) for name, _ in listed]
        longest = max(shared, default=0)
        family = [price for (_, price), n in zip(listed, shared, strict=True) if n == longest]
        return dearest_pricing(family)

    def _map_error(self, err: Any, model: str, upstream_request_id: str) -> GatewayError:
        """The one place this provider's SDK failures become GatewayErrors."""
        raise NotImplementedError

    def _failure(
        self, err: Any, model: str, upstream_request_id: str, request_id: str
    ) -> GatewayError:
        """An SDK failure mapped, logged without secrets, and reported to the keyed
        client (a refused key is re-read on the next call); the caller raises it."""
        error = self._map_error(err, model, upstream_request_id)
        log_upstream_failure(error, request_id)
        self._sdk.failed(error)
        return error

    def _model(self, model_id: str) -> ModelT:
        return self._models.get(model_id) or cast(ModelT, self.Model(id=model_id))

    async def aclose(self) -> None:
        await self._sdk.aclose()


def _shared_prefix(a: str, b: str) -> int:
    """How many leading characters two model ids share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
