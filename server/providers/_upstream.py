"""What the SDK-backed providers (Anthropic, OpenAI) have in common.

Their settings (where the API key is read, base URL, timeouts, models
filled in from the shipped catalog in server/catalog.py), the SDK client
that follows a rotated API key (KeyedClient), the caller's deadline turned into an
upstream timeout, `provider_options` merged into an SDK call, and the table
from an upstream HTTP failure to a GatewayError. Each provider still maps
its own SDK's exceptions in one function; this module only holds the parts
that would otherwise be written twice.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import inspect
import json
import logging
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from server.credentials import (
    CredentialSource,
    StoredCredential,
    StoredKeyReference,
    credential_source,
    stored_credential,
)
from server.errors import (
    DeadlineExceededError,
    FieldViolation,
    GatewayError,
    InvalidArgumentError,
    QuotaExhaustedError,
    RateLimitedError,
    RequestTooLargeError,
    UpstreamAuthError,
    UpstreamInvalidRequestError,
    UpstreamMalformedError,
    UpstreamModelNotFoundError,
    UpstreamOverloadedError,
    UpstreamRejectedError,
    UpstreamUnavailableError,
)
from server.json_members import Base64Text, encoded_body
from server.loop_turns import LARGE_REQUEST
from server.providers._transport import HttpTransport
from server.providers.base import ProviderSettings
from server.schema import (
    UNPRICED_SERVICE_TIER,
    UNPRICED_SERVICE_TIERS,
    Capabilities,
    LongContextPricing,
    ModelInfo,
    Pricing,
)

log = logging.getLogger(__name__)

SamplingParameter = Literal["temperature", "top_p", "top_k"]
# Upstream error messages are quoted to the caller; long ones are cut.
_MAX_MESSAGE = 500


class LongContextSettings(ProviderSettings):
    """The rates of a prompt longer than `above_tokens` (input, cache reads and
    writes together): they then apply to the whole call, output included."""

    above_tokens: int = Field(gt=0)
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float = Field(0.0, ge=0)
    cache_creation_per_mtok: float = Field(0.0, ge=0)


class PricingSettings(ProviderSettings):
    """US dollars per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    cache_read_per_mtok: float = Field(0.0, ge=0)
    cache_creation_per_mtok: float = Field(0.0, ge=0)
    long_context: LongContextSettings | None = None

    def pricing(self) -> Pricing:
        tier = self.long_context
        return Pricing(
            input_per_mtok=self.input_per_mtok,
            output_per_mtok=self.output_per_mtok,
            cache_read_per_mtok=self.cache_read_per_mtok,
            cache_creation_per_mtok=self.cache_creation_per_mtok,
            long_context=None if tier is None else LongContextPricing(**tier.model_dump()),
        )


class UpstreamModel(ProviderSettings):
    """A model an upstream provider serves.

    Fields left out are taken from the shipped catalog entry for the model
    (by `upstream_id`, else `id`); the class defaults are the conservative
    limits given to a model the catalog does not know.
    """

    id: str = Field(min_length=1)
    # The provider's name for the model, when it differs from `id`.
    upstream_id: str | None = None
    display_name: str = ""
    aliases: list[str] = []
    context_window: int = Field(128_000, gt=0)
    max_output_tokens: int = Field(8_192, gt=0)
    default_max_tokens: int = Field(4_096, gt=0)
    pricing: PricingSettings = PricingSettings()
    tools: bool = True
    images: bool = True
    # The sampling parameters the model accepts; others are refused with
    # INVALID_ARGUMENT before any upstream call.
    sampling: list[SamplingParameter] = ["temperature", "top_p", "top_k"]
    # The rate limits the provider gives us for this model; the router queues
    # or refuses past them (server/routing/deployment_limits.py).
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)

    @property
    def upstream_name(self) -> str:
        return self.upstream_id or self.id

    @property
    def supports_thinking(self) -> bool:
        return False

    def info(self, provider: str) -> ModelInfo:
        return ModelInfo(
            id=self.id,
            provider=provider,
            display_name=self.display_name or self.id,
            aliases=tuple(self.aliases),
            context_window=self.context_window,
            max_output_tokens=self.max_output_tokens,
            default_max_tokens=min(self.default_max_tokens, self.max_output_tokens),
            pricing=self.pricing.pricing(),
            capabilities=Capabilities(
                streaming=True,
                tools=self.tools,
                images=self.images,
                thinking=self.supports_thinking,
            ),
        )


def with_catalog_defaults(data: Any, catalog: Mapping[str, Mapping[str, Any]]) -> Any:
    """A model's raw settings over its catalog entry (a pydantic "before" validator)."""
    if isinstance(data, Mapping):
        key = data.get("upstream_id") or data.get("id")
        if isinstance(key, str) and key in catalog:
            return {**catalog[key], **data}
    return data


class UpstreamSettings(ProviderSettings):
    """Settings every SDK-backed provider takes.

    The API key comes from at most one of `api_key` (in the configuration,
    fixed until a restart), `api_key_env` (an environment variable),
    `api_key_file` (a file, e.g. a mounted secret), `api_key_command` (a
    command's standard output, run without a shell) and `api_key_stored` (a
    key kept encrypted in the key store, `keys provider set NAME`); with none,
    from the provider's usual environment variable (such as
    ANTHROPIC_API_KEY). The last four are re-read every `api_key_ttl_s`
    seconds and right after the provider refuses the key
    (server/credentials.py), so a rotated key is
    picked up without a restart. Only where the key lives is configuration:
    the key itself never shows in a repr, a log line or an error.
    """

    # The variable the SDK itself would read when no key is configured.
    default_key_env: ClassVar[str] = ""

    # Validated in this order: each source's validator sees the ones above it.
    api_key_env: str | None = Field(None, min_length=1)
    api_key_file: Path | None = None
    api_key_command: list[str] | None = Field(None, min_length=1)
    # A name given to `python -m server keys provider set`.
    api_key_stored: StoredKeyReference | None = None
    # None: 60 s, or 300 s for a command.
    api_key_ttl_s: float | None = Field(None, gt=0)
    api_key: SecretStr | None = Field(None, validate_default=True)
    # None: the SDK's default (which honours ANTHROPIC_BASE_URL / OPENAI_BASE_URL).
    base_url: str | None = None
    # The longest an upstream call may take when the caller set no deadline.
    timeout_s: float = Field(600.0, gt=0)
    # Model ids with one of these prefixes route here even when not listed,
    # with conservative limits. None: the provider kind's default prefixes.
    route_prefixes: list[str] | None = None
    # The price of such an unlisted id. None: the dearest listed price of its
    # family (the listed models sharing the longest prefix with it).
    unlisted_pricing: PricingSettings | None = None
    # Headers sent with every upstream request (e.g. a beta flag).
    default_headers: dict[str, str] = {}
    # The HTTP client under the SDK (server/providers/_transport.py): "aiohttp",
    # the SDK's aiohttp transport (about 40% less CPU per call), or "httpx",
    # the SDK's default. Both honour HTTP(S)_PROXY, NO_PROXY and SSL_CERT_FILE.
    http_transport: HttpTransport = "aiohttp"
    # This provider instance's connection pool: at most this many connections
    # to the upstream at once, each idle one kept open this long for the next call.
    max_connections: int = Field(1000, gt=0)
    keepalive_s: float = Field(15.0, gt=0)

    @field_validator("api_key_file")
    @classmethod
    def _file_is_readable(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is not None:
            _only_source("api_key_file", info)
            # Once, at start-up: the provider reads it again, off the event loop.
            try:
                readable = bool(path.read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError) as err:
                raise ValueError(f"cannot read {path}: {type(err).__name__}") from None
            if not readable:
                raise ValueError(f"{path} is empty")
        return path

    @field_validator("api_key_command")
    @classmethod
    def _command_is_runnable(cls, argv: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if argv is not None:
            _only_source("api_key_command", info)
            # Not run here: a slow secrets CLI must not hold up start-up.
            if shutil.which(argv[0]) is None:
                raise ValueError(f"{argv[0]!r} is not an executable file or on PATH")
        return argv

    @field_validator("api_key_stored")
    @classmethod
    def _stored_is_alone(
        cls, stored: StoredKeyReference | None, info: ValidationInfo
    ) -> StoredKeyReference | None:
        if stored is not None:
            _only_source("api_key_stored", info)
            # Not read here: a key that cannot be decrypted must not stop the
            # gateway (server/credentials.py reports it and fails its calls).
        return stored

    @field_validator("api_key")
    @classmethod
    def _key_is_available(cls, key: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if key is not None:
            _only_source("api_key", info)
            return key
        if any(name not in info.data for name in _KEY_SOURCES):
            return key  # a source was given but is invalid: that error is enough
        if all(info.data[name] is None for name in _KEY_SOURCES[1:]):
            name = info.data["api_key_env"] or cls.default_key_env
            if not os.environ.get(name):
                raise ValueError(
                    f"no API key: set api_key, or the environment variable {name}"
                    " (or give api_key_file, api_key_command or api_key_stored)"
                )
        return key

    def credential(self) -> CredentialSource:
        """Where the provider reads its API key on each call."""
        if self.api_key is not None:
            return _ConfiguredKey(self.api_key)
        if self.api_key_stored is not None:
            return stored_credential(self.api_key_stored, ttl=self.api_key_ttl_s)
        if self.api_key_file is not None or self.api_key_command is not None:
            return credential_source(
                file=self.api_key_file, command=self.api_key_command, ttl_s=self.api_key_ttl_s
            )
        return credential_source(
            env=self.api_key_env or self.default_key_env, ttl_s=self.api_key_ttl_s
        )


_KEY_SOURCES = ("api_key_env", "api_key_file", "api_key_command", "api_key_stored")


def _only_source(name: str, info: ValidationInfo) -> None:
    """Refuses a second key source next to `name` (those validated before it)."""
    others = [other for other in _KEY_SOURCES if other != name and info.data.get(other)]
    if others:
        raise ValueError(f"give one source for the API key, not both {others[0]} and {name}")


class _ConfiguredKey:
    """`api_key` from the configuration: it changes only with a restart."""

    __slots__ = ("_key",)

    def __init__(self, key: SecretStr) -> None:
        self._key = key

    async def get(self) -> str:
        return self._key.get_secret_value()

    def invalidate(self) -> None:
        pass


class _RekeyableClient(Protocol):
    """What KeyedClient needs of an SDK client (AsyncAnthropic, AsyncOpenAI)."""

    def with_options(self, *, api_key: str) -> Self: ...

    async def close(self) -> None: ...


ClientT = TypeVar("ClientT", bound=_RekeyableClient)
# Never sent: every call goes through KeyedClient.current(), which swaps it out.
PLACEHOLDER_KEY = "not-yet-read"
# Keys to remove from upstream error messages: the current one and a few before
# it (calls under way may still send an older one).
_REMEMBERED_KEYS = 3


class KeyedClient(Generic[ClientT]):
    """An SDK client that sends the current value of a refreshable API key.

    `base` is built once (with PLACEHOLDER_KEY) and owns the HTTP connection
    pool. `current()` asks the credential source for the key, a cached
    string compare in the common case; when the key changed, it swaps to
    `base.with_options(api_key=key)`, a copy that shares base's HTTP client
    and so its connection pool (both SDKs' `copy` pass `self._client` on).
    Calls already under way finish with the client they started with.
    """

    def __init__(self, provider: str, base: ClientT, source: CredentialSource) -> None:
        self._provider = provider
        self._base = base
        self._source = source
        self._client = base
        self._key: str | None = None
        self.redact = Redactor()

    async def current(self) -> ClientT:
        """The client to call with; raises CredentialUnavailableError without a key."""
        key = await self._source.get()
        if key != self._key:
            if self._key is not None:
                log.info(
                    "provider %s: its API key changed; new calls send the new one", self._provider
                )
            self._client = self._base.with_options(api_key=key)
            self._key = key
            self.redact.remember(key)
        return self._client

    def failed(self, error: GatewayError) -> None:
        """Notes a mapped upstream failure: a refused key is re-read by the next call."""
        if isinstance(error, UpstreamAuthError):
            self._source.invalidate()

    async def aclose(self) -> None:
        await self._base.close()
        if isinstance(self._source, StoredCredential):
            self._source.retire()  # a closed provider's key is no longer reported


# -- Deadlines -----------------------------------------------------------------


def upstream_timeout(deadline: float | None, cap: float) -> float:
    """The seconds an upstream call may take: what is left of the caller's budget.

    Raises DeadlineExceededError when nothing is left, so that no upstream
    call starts that could not finish in time.
    """
    if deadline is None:
        return cap
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceededError("the deadline ran out before the upstream call")
    return min(left, cap)


# -- Request building ----------------------------------------------------------


def sdk_parameters(method: Callable[..., Any]) -> frozenset[str]:
    """The keyword arguments an SDK method accepts."""
    return frozenset(inspect.signature(method).parameters) - {"self"}


# What the gateway decided, checked, reserved and priced: the model (a key
# may be allowed only some), the prompt (estimated for the context window,
# TPM and the budget), the tools (estimated too), the output cap (reserved)
# and how many outputs are paid for. No provider option may set them, on any
# path: as a keyword, in `extra_body`, or as an unknown key sent in the body.
GATEWAY_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "functions",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
        "stream",
        "stream_options",
        "timeout",
        # Sent as the anthropic-workspace-id header: which workspace is billed.
        "workspace_id",
    }
)
# Credentials, billing routing (which organisation, project or workspace pays)
# and framing: the gateway's alone.
GATEWAY_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "openai-organization",
        "openai-project",
        "anthropic-workspace-id",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
    }
)
GATEWAY_QUERY = frozenset({"model", "key", "api_key", "api-key"})
_SET_BY_GATEWAY = "is set by the gateway and cannot be given"


def merge_provider_options(
    kwargs: dict[str, Any], options: Mapping[str, Any], known: Collection[str]
) -> list[FieldViolation]:
    """Merges `provider_options` into SDK keyword arguments, in place.

    Keys the SDK method takes replace the gateway's value; `extra_headers`,
    `extra_query` and `extra_body` are merged key by key; any other key goes
    into the request body untouched (`extra_body`). What the gateway decided
    (GATEWAY_FIELDS, GATEWAY_HEADERS, GATEWAY_QUERY) is refused wherever it
    is given, never dropped in silence. Returns what was refused.
    """
    violations: list[FieldViolation] = []
    for key, value in options.items():
        path = f"provider_options.{key}"
        value = _integral_floats_as_ints(value)
        if key in GATEWAY_FIELDS:
            violations.append(FieldViolation(path, _SET_BY_GATEWAY))
        elif key == "service_tier" and isinstance(value, str) and value in UNPRICED_SERVICE_TIERS:
            violations.append(FieldViolation(path, UNPRICED_SERVICE_TIER.format(tier=value)))
        elif key in ("extra_headers", "extra_query", "extra_body"):
            if not isinstance(value, dict):
                violations.append(FieldViolation(path, "must be an object"))
                continue
            refused = _refused_entries(key, value)
            if refused:
                violations += [FieldViolation(f"{path}.{name}", why) for name, why in refused]
                continue
            kwargs[key] = {**kwargs.get(key, {}), **value}
        elif key in known:
            kwargs[key] = value
        else:
            kwargs.setdefault("extra_body", {})[key] = value
    return violations


def _refused_entries(where: str, entries: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The entries of extra_headers, extra_query or extra_body the caller may not set."""
    if where == "extra_body":
        refused = [(name, _SET_BY_GATEWAY) for name in entries if name in GATEWAY_FIELDS]
        tier = entries.get("service_tier")
        if isinstance(tier, str) and tier in UNPRICED_SERVICE_TIERS:
            refused.append(("service_tier", UNPRICED_SERVICE_TIER.format(tier=tier)))
        return refused
    if where == "extra_query":
        return [(name, _SET_BY_GATEWAY) for name in entries if name.lower() in GATEWAY_QUERY]
    refused = [(name, "must be a string") for name, v in entries.items() if not isinstance(v, str)]
    refused += [
        (name, "is a credential or billing header: the gateway's alone")
        for name in entries
        if name.lower() in GATEWAY_HEADERS
    ]
    return refused


def post_arguments(
    kwargs: Mapping[str, Any], header_arguments: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A typed `create` call's keyword arguments as the body and options of `client.post`.

    The providers call the SDK's generic `client.post` (the SDKs' documented
    way to make a request their typed methods do not cover) with
    `cast_to=object`: the SDK still builds the request (base URL, auth,
    version and client headers), sends it, raises its own exceptions for
    HTTP errors and error events, and decodes SSE, but returns the JSON as
    parsed instead of building pydantic models of it, which cost more than
    the rest of the gateway's work on a call (about 110 us for a Message,
    100 us for each OpenAI stream chunk) while the codecs read a handful of
    fields. The body is what the typed method would send: its arguments,
    `extra_body` merged over them; `extra_headers` and `extra_query` become
    options, as do the arguments the typed method sends as headers
    (`header_arguments`: argument -> header). The providers serialize the
    body with the SDK's `openapi_dumps` (what `client.post` does to a body of
    plain JSON values) and send it with `_relay.send_relayed`, which is that
    `client.post` without rebuilding the SDK's request for every call.
    """
    body = dict(kwargs)
    headers: dict[str, str] = dict(body.pop("extra_headers", None) or {})
    query = body.pop("extra_query", None)
    body.update(body.pop("extra_body", None) or {})
    for argument, header in (header_arguments or {}).items():
        if argument in body:
            headers.setdefault(header, body.pop(argument))  # extra_headers win, as in `create`
    options: dict[str, Any] = {"headers": headers}
    if query:
        options["params"] = query
    return body, options


class _BodyEncoder(json.JSONEncoder):
    """The SDKs' body encoder for plain JSON values (their `openapi_dumps`), and a
    Base64Text that the stepped walk leaves to it, written whole."""

    def default(self, o: Any) -> Any:
        if isinstance(o, Base64Text):
            return o.text()
        return super().default(o)


# The settings of both SDKs' `openapi_dumps` (tests/test_request_encoding.py
# checks that the bytes are theirs).
_BODY_ENCODER = _BodyEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

# An image larger than this, in a large request, is written in base64 a piece at
# a time by request_content (image_base64); smaller ones at once.
IMAGE_AT_ONCE_BYTES = 192 * 1024


def image_base64(data: bytes, prefix: str = "") -> str | Base64Text:
    """An image's bytes as base64 text after `prefix`, for a request body: made now,
    or, when the request is large (LARGE_REQUEST), a Base64Text that
    request_content writes in steps."""
    if len(data) > IMAGE_AT_ONCE_BYTES and LARGE_REQUEST.get():
        return Base64Text(data, prefix)
    return prefix + base64.b64encode(data).decode("ascii")


async def request_content(body: dict[str, Any], dumps: Callable[[Any], bytes]) -> bytes:
    """The bytes of a request body: `dumps(body)` (the SDK's `openapi_dumps`), or
    for a large request (LARGE_REQUEST, set by either edge for a request over a
    MiB) the same bytes written in steps that take turns with the other calls
    (server/loop_turns.py): its long texts and images' base64 a piece at a time.
    Encoding a 4 MB text is 10-14 ms of one step; five such requests at once
    held the event loop that long five times over (bench/stall_probe.py
    --upstream openai)."""
    if not LARGE_REQUEST.get():
        return dumps(body)
    return await encoded_body(body, _BODY_ENCODER.encode)


def _integral_floats_as_ints(value: Any) -> Any:
    # google.protobuf.Struct holds every number as a double; upstream APIs
    # refuse 1024.0 where they expect an integer.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


def sampling_arguments(
    model: UpstreamModel, temperature: float | None, top_p: float | None, top_k: int | None
) -> tuple[dict[str, float | int], list[FieldViolation]]:
    """The sampling parameters to send, and those the model does not accept."""
    given: dict[str, float | int] = {}
    if temperature is not None:
        given["temperature"] = _shortest(temperature)
    if top_p is not None:
        given["top_p"] = _shortest(top_p)
    if top_k is not None:
        given["top_k"] = top_k
    violations = [
        FieldViolation(name, f"model {model.id!r} does not accept {name}")
        for name in given
        if name not in model.sampling
    ]
    return given, violations


def _shortest(value: float) -> float:
    # Protobuf floats are single precision: 0.7 arrives as 0.699999988079071.
    return float(f"{value:.7g}")


# -- Errors --------------------------------------------------------------------


class Redactor:
    """Removes secrets from text that may quote them (an upstream error message)."""

    __slots__ = ("_secrets",)

    def __init__(self, *secrets: str) -> None:
        self._secrets = [s for s in secrets if s]

    def remember(self, secret: str) -> None:
        """Redacts `secret` too, forgetting the oldest beyond a few."""
        if secret and secret not in self._secrets:
            self._secrets = [*self._secrets, secret][-_REMEMBERED_KEYS:]

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text[:_MAX_MESSAGE]


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The delay a `retry-after-ms` or `retry-after` header asks for, if any."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# What an upstream failure means, whatever the provider called it.
FailureKind = Literal[
    "invalid_request",
    "too_large",
    "auth",
    "quota",
    "not_found",
    "rate_limited",
    "overloaded",
    "unavailable",
    "rejected",
]


def kind_of_status(status: int) -> FailureKind:
    """The meaning of an HTTP status from an upstream API."""
    if status in (400, 422):
        return "invalid_request"
    if status == 413:
        return "too_large"
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "quota"
    if status == 404:
        return "not_found"
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    if status >= 500 or status in (408, 409):
        return "unavailable"
    return "rejected"


def upstream_failure(
    kind: FailureKind,
    *,
    provider: str,
    model: str,
    message: str,
    metadata: dict[str, str],
    retry_after: float | None = None,
    param: str | None = None,
) -> GatewayError:
    """The GatewayError for an upstream failure of a kind; `message` is already redacted."""
    metadata = {"provider": provider, **{k: v for k, v in metadata.items() if v}}
    said = f": {message}" if message else ""
    if kind == "invalid_request":
        violation = FieldViolation(param or "request", message or "refused by the provider")
        return UpstreamInvalidRequestError(
            [violation], f"provider {provider} refused the request{said}", metadata=metadata
        )
    if kind == "too_large":
        violation = FieldViolation("request", message or "too large for the provider")
        return RequestTooLargeError(
            [violation], f"the request is too large for provider {provider}", metadata=metadata
        )
    if kind == "auth":
        return UpstreamAuthError(
            f"the gateway's credentials for provider {provider} were refused;"
            " the gateway is misconfigured",
            metadata=metadata,
        )
    if kind == "quota":
        return QuotaExhaustedError(
            f"the gateway's quota with provider {provider} is used up{said}", metadata=metadata
        )
    if kind == "not_found":
        return UpstreamModelNotFoundError(
            f"provider {provider} does not serve model {model!r}{said}",
            metadata={**metadata, "model": model},
        )
    if kind == "rate_limited":
        return RateLimitedError(
            f"provider {provider} is rate-limiting the gateway; retry later",
            metadata=metadata,
            retry_after=retry_after,
        )
    if kind == "overloaded":
        return UpstreamOverloadedError(
            f"provider {provider} is overloaded; retry later",
            metadata=metadata,
            retry_after=retry_after,
        )
    if kind == "unavailable":
        return UpstreamUnavailableError(
            f"provider {provider} failed{said}", metadata=metadata, retry_after=retry_after
        )
    return UpstreamRejectedError(
        f"provider {provider} refused the request{said}", metadata=metadata
    )


class UnreadableAnswerError(ValueError):
    """An upstream answer that parses but is not what the API sends (JSON that is not
    an object); mapped like an answer that does not parse."""


def json_object(value: Any, what: str) -> dict[str, Any]:
    """`value` (parsed JSON of an upstream answer or event) if it is an object;
    else raises UnreadableAnswerError naming `what` it was."""
    if not isinstance(value, dict):
        raise UnreadableAnswerError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


def malformed_answer(
    provider: str, err: BaseException, metadata: Mapping[str, str], redact: Redactor
) -> GatewayError:
    """An answer of `provider` the gateway cannot read (`err` says why): UNAVAILABLE,
    retried and fallen back from like a 5xx, what was wrong in `protocol_error`."""
    if isinstance(err, json.JSONDecodeError):
        problem = f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
    elif isinstance(err, UnreadableAnswerError):
        problem = str(err)
    else:
        said = redact(str(err))
        problem = f"{type(err).__name__}: {said}" if said else type(err).__name__
    return UpstreamMalformedError(
        f"provider {provider} answered with something the gateway cannot read ({problem})",
        metadata={"provider": provider, **metadata, "protocol_error": problem},
    )


def log_upstream_failure(error: GatewayError, request_id: str) -> None:
    """One log line per upstream failure: what and where, never credentials."""
    log.warning(
        "upstream call failed: %s (provider=%s status=%s upstream_request_id=%s request_id=%s)",
        error.reason,
        error.metadata.get("provider", ""),
        error.metadata.get("upstream_status", ""),
        error.metadata.get("upstream_request_id", ""),
        request_id,
    )


def refuse(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgumentError(violations)


async def replay(items: list[Any]) -> AsyncIterator[Any]:
    """Items already in hand as an async iterator, to feed a stream decoder."""
    for item in items:
        yield item
