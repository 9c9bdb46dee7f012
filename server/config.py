"""Typed configuration: defaults, then a YAML file, then environment, then flags.

Environment variables override file keys with the prefix LLMGW_ and `__`
between nesting levels: LLMGW_SERVER__PORT=50052 sets `server.port`. Values
are read as YAML scalars, so numbers and booleans work. The clients'
variables (CLIENT_ENV: LLMGW_ADDRESS, LLMGW_API_KEY, ...) are not keys and
are passed over. Every problem stops start-up with a message naming the
key (`server.port: ...`).

This is a small loader over pydantic rather than pydantic-settings: we want
one strict precedence order and unknown keys, including misspelt
environment variables, reported by name rather than silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "LLMGW_"
CONFIG_PATH_ENV = "LLMGW_CONFIG"
# The variables the gateway's own clients read (clients/: the Python client
# and CLI, the Node client). A shell set up to call the gateway exports them
# beside the gateway's variables, so they are not configuration keys: the
# loader passes over them instead of refusing them as unknown.
# tests/test_config.py pins this list to the names clients/ reads.
CLIENT_ENV = frozenset(
    {"LLMGW_ADDRESS", "LLMGW_ADMIN_KEY", "LLMGW_API_KEY", "LLMGW_MODEL", "LLMGW_PROTO_ROOT"}
)
# Secrets read straight from the environment where they are used, never
# copied into the configuration (so no dump or error message can show them):
# the key-encryption keys (server/auth/envelope.py).
SECRET_ENV = frozenset({"LLMGW_ENCRYPTION_KEYS"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # The text of the largest context window: 1.05M tokens is at most 4.2M
    # characters (the estimate's floor is a token per 4; longer text is refused
    # by its length), and prose that fills it is ~4.17M (bench/stall_probe.py).
    # grpc's own default too. grpc copies each request on the event loop in one
    # step, before the gateway sees it, so this bounds how long requests that
    # arrive together hold the other calls: five of 4 MiB delay a probe call by
    # 4-6 ms at p99, five of 8 MiB by 40-70 ms (README, "Request size").
    # Larger images go by URL, or raise this and pay that.
    max_receive_message_bytes: int = Field(4 * 1024 * 1024, gt=0)
    max_send_message_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # Server pings idle connections so dead peers are noticed behind proxies.
    keepalive_time_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    # The most often a client may ping us; grpc's default (5 min) kills
    # clients configured with the usual 10-30 s keepalive.
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    # Drops connections idle this long (0: never); lets load balancers rebalance.
    max_connection_idle_s: float = Field(0.0, ge=0)
    max_concurrent_streams: int = Field(0, ge=0)  # per connection; 0: grpc's default
    # On SIGTERM: how long in-flight calls may run before they are cancelled.
    shutdown_grace_s: float = Field(30.0, ge=0)
    reflection: bool = True
    # Under load, merge the stream deltas that are already waiting into one
    # message (server/grpc_edge/coalescing.py); never delays a delta.
    coalesce_stream_deltas: bool = True
    # Generation calls in flight at once in this process, both edges together
    # (0: no limit). A call beyond it waits up to max_queue_s for a slot, then
    # is refused at once: UNAVAILABLE (HTTP 529) with reason GATEWAY_OVERLOADED
    # and a retry delay, recorded like any refusal. Sized so the shipped memory
    # limit (1 GiB) holds this many streams that nobody reads (README, Limits).
    max_concurrent_calls: int = Field(1000, ge=0)
    max_queue_s: float = Field(0.5, ge=0, le=60)
    # A stream whose caller has read nothing for this long (one write waiting
    # on a full flow-control window, or a full socket over HTTP) ends with
    # DEADLINE_EXCEEDED, reason STALLED_READER; 0: never.
    stalled_stream_timeout_s: float = Field(300.0, ge=0)
    # Serving processes sharing the port with SO_REUSEPORT (server/workers.py);
    # one event loop each, so at most one per core helps.
    workers: int = Field(1, ge=1, le=64)
    # auto: uvloop when it is installed (it is a dependency, except on
    # Windows), else asyncio's own loop. uvloop takes 0.1-0.7 ms off a
    # provider call here (bench/results).
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Freed memory the process keeps mapped for reuse (glibc), so a burst of
    # large requests does not fault in fresh pages on the event loop
    # (server/process_memory.py); 0: the C library's defaults.
    keep_freed_memory_mib: int = Field(256, ge=0, le=4096)

    @model_validator(mode="after")
    def _workers_need_a_fixed_port(self) -> Self:
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port (port 0 would give each its own)")
        return self


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class HttpConfig(_Strict):
    """The HTTP front door (server/http_edge/): the providers' own APIs, one core."""

    enabled: bool = True
    # None: the gRPC server's host (server.host).
    host: str | None = None
    port: int = Field(8080, ge=0, le=65535)
    # A larger body is refused (413) before it is read. Room for a full-size
    # image (5 MB: 6.7 MB in base64) beside a long text; the body is read and
    # parsed in steps that take turns with the other calls, so this can be
    # larger than gRPC's limit (README, "Request size").
    max_body_bytes: int = Field(12 * 1024 * 1024, gt=0)
    # While an upstream is silent, a streamed answer gets `event: ping` this
    # often, so that no client gives up on it.
    ping_interval_s: float = Field(15.0, gt=0)


class LoggingConfig(_Strict):
    level: LogLevel = "INFO"
    # auto: JSON when stderr is not a terminal (containers, systemd, log
    # shippers), text when a person is watching it.
    format: Literal["auto", "text", "json"] = "auto"
    # Levels of single loggers, e.g. {"httpx2": "WARNING"}. The provider SDKs'
    # loggers (anthropic, openai, httpx2, httpcore2, ...) log at INFO at most
    # unless named here: at DEBUG they write request bodies, prompts and
    # end-user ids included.
    loggers: dict[str, LogLevel] = {}
    # One line per generation call (logger `llmgw.calls`): ids, model, status,
    # tokens, cost, latency.
    calls: bool = True


# Observability (server/telemetry/).
class TracingConfig(_Strict):
    """OpenTelemetry traces (server/telemetry/tracing.py); the OTEL_* variables apply too."""

    # none: no tracing at all (and no interceptor on the call path). Unset:
    # as OTEL_TRACES_EXPORTER says (otlp, console, none), else none.
    exporter: Literal["none", "otlp_grpc", "otlp_http", "console"] | None = None
    # Collector address; default: OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT, else the
    # SDK's (localhost:4317 for gRPC, http://localhost:4318/v1/traces for HTTP).
    endpoint: str | None = None
    # Default: OTEL_SERVICE_NAME, else llm-gateway.
    service_name: str | None = None
    # Prompt and completion text as span attributes: off, as they may hold
    # anything the callers send.
    capture_content: bool = False


class MetricsConfig(_Strict):
    """A Prometheus endpoint on its own port (server/telemetry/metrics.py)."""

    # Off by default: another listening port is the operator's decision, and
    # several gateways on one host would fight over a fixed port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class AuditConfig(_Strict):
    """Security events as JSON lines (server/telemetry/audit.py)."""

    # Appended to, never rewritten; unset: no audit trail. Off by default: its
    # place and retention are the operator's to choose (README.md).
    path: Path | None = None

    @field_validator("path")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()


class ProviderConfig(BaseModel):
    """One provider instance: `type` picks the implementation, the rest is its settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str
    # Where `api_key_stored: NAME` is read: the key store and its key-encryption
    # keys, filled in by GatewayConfig from auth.key_store and secrets.
    _stored_key_location: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        settings = dict(self.model_extra or {})
        stored = settings.get("api_key_stored")
        if isinstance(stored, str) and self._stored_key_location:
            settings["api_key_stored"] = {"name": stored, **self._stored_key_location}
        return settings


def _default_providers() -> dict[str, ProviderConfig]:
    return {"offline": ProviderConfig(type="offline")}


# kind: (API key variable, base URL variable), as each provider's SDK reads them
_PROVIDER_ENVIRONMENT = {
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
}


def default_providers(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The providers served when none is configured.

    The offline provider always; Anthropic and OpenAI (with the shipped
    model catalog) when their API key variables are set. The keys stay in
    the environment: the configuration names the variable, never the key.
    """
    providers: dict[str, dict[str, Any]] = {"offline": {"type": "offline"}}
    for kind, (key_variable, url_variable) in _PROVIDER_ENVIRONMENT.items():
        if environ.get(key_variable):
            section: dict[str, Any] = {"type": kind, "api_key_env": key_variable}
            if environ.get(url_variable):
                section["base_url"] = environ[url_variable]
            providers[kind] = section
    return providers


def _auth_state_dir() -> Path:
    """Where keys live by default: $XDG_STATE_HOME/llm-gateway (~/.local/state/llm-gateway).

    Not the working directory, so the gateway and `python -m server keys`
    find the same store wherever they are started from.
    """
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "llm-gateway"


# Callable without credentials unless configured otherwise: probes and tools
# must reach health and reflection before they hold any key.
DEFAULT_PUBLIC_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


class AuthConfig(_Strict):
    """Who may call: API keys, the tokens traded for them, and the signing keys."""

    # false only for local development: then the gateway refuses non-loopback hosts.
    enabled: bool = True
    # Where API keys (as keyed hashes, never the keys) and stored provider keys
    # live: an SQLite file (a Path), or a postgresql:// URL (a str) for a
    # database several replicas share (server/auth/key_store_postgres.py).
    key_store: Path | str = Field(default_factory=lambda: _auth_state_dir() / "keys.sqlite3")
    # The HMAC-SHA256 secret API keys are hashed with; kept apart from the store
    # so a copy of the store alone cannot be used to test guesses.
    secret_file: Path = Field(default_factory=lambda: _auth_state_dir() / "key-secret")
    # Ed25519 signing keys, one PEM file per key id (<kid>.pem). Every key here
    # verifies tokens; the newest private key signs unless signing_key_id pins one.
    signing_keys_dir: Path = Field(default_factory=lambda: _auth_state_dir() / "signing-keys")
    signing_key_id: str | None = None
    issuer: str = Field("llm-gateway", min_length=1)
    audience: str = Field("llm-gateway", min_length=1)
    token_ttl_s: float = Field(900.0, ge=1, le=86400)
    # Clock skew tolerated on exp/nbf/iat; RFC 8725 practice: at most a minute.
    leeway_s: float = Field(30.0, ge=0, le=60)
    # How long a key's record (and so its revocation) may be served from memory.
    cache_ttl_s: float = Field(5.0, ge=0, le=300)
    # Every API key expires: `keys create` and `keys rotate` give it this many
    # days unless --expires-in says otherwise.
    key_ttl_days: float = Field(90.0, gt=0, le=3650)
    # Whether `keys create --expires-in never` may make a key that never expires.
    allow_keys_without_expiry: bool = False
    # Services callable without credentials.
    public_services: tuple[str, ...] = DEFAULT_PUBLIC_SERVICES

    @field_validator("secret_file", "signing_keys_dir")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("key_store", mode="before")
    @classmethod
    def _file_or_database(cls, value: Any) -> Any:
        """A postgresql:// URL stays a str; anything else is a file path.

        A URL of another scheme is refused rather than taken for a file
        name; the message gives the scheme only (a URL may hold a password).
        """
        if isinstance(value, str) and "://" in value:
            scheme = value.split("://", 1)[0]
            if scheme not in ("postgresql", "postgres"):
                raise ValueError(f"a file path or a postgresql:// URL, not a {scheme}:// URL")
            return value
        if isinstance(value, str | Path):
            return Path(value).expanduser()
        return value


class SecretsConfig(_Strict):
    """The key-encryption keys of secrets kept in the key store (server/auth/envelope.py)."""

    # A file holding the ring, `id:base64key` entries separated by commas or
    # newlines: the first encrypts, all decrypt. Unset: the LLMGW_ENCRYPTION_KEYS
    # variable. Keep it apart from the key store and use these keys for nothing else.
    encryption_keys_file: Path | None = None

    @field_validator("encryption_keys_file")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()


class RetryConfig(_Strict):
    """Retries of one deployment on failures a retry may cure (429, 5xx, 529, resets)."""

    # Per deployment, the first try included; 1 turns retries off.
    max_attempts: int = Field(3, ge=1, le=10)
    # Full jitter: the n-th retry sleeps uniform(0, min(max, initial * multiplier**(n-1))),
    # and at least what the upstream's retry-after asks for.
    initial_backoff_s: float = Field(0.25, gt=0)
    max_backoff_s: float = Field(8.0, gt=0)
    multiplier: float = Field(2.0, ge=1)
    # A retry-after longer than this is not waited for: the next deployment is tried.
    max_retry_after_s: float = Field(30.0, ge=0)
    # How long one attempt may wait for its answer before the router gives up on
    # it and tries the next deployment (routing/attempt_timeouts.py). Each bound
    # lies within the caller's deadline; the first two end an attempt that has
    # sent no content yet, which then falls back (UNAVAILABLE, UPSTREAM_TIMEOUT,
    # counted by the breaker). A stream: until its first content (text, thinking
    # or a tool call). Generous, since real models take this long: Claude reads a
    # prompt near 1M tokens for a minute or two, and OpenAI reasoning models send
    # nothing over Chat Completions until they have finished reasoning.
    first_token_timeout_s: float | None = Field(180.0, gt=0)
    # A unary call (Generate): the whole answer. The SDKs' own default, past
    # which Anthropic's refuses a non-streaming call.
    unary_timeout_s: float | None = Field(600.0, gt=0)
    # A stream after its first content: the longest silence between two events.
    # It ends the stream (no fallback once content has reached the caller).
    stream_idle_timeout_s: float | None = Field(120.0, gt=0)
    # With a caller deadline, the share of the time left that an attempt leaves
    # for the deployments after it: a deployment (its retries included) that
    # another may follow gets at most (1 - fallback_reserve) of what is left
    # before its content starts. 0: the first deployment may take it all.
    fallback_reserve: float = Field(0.5, ge=0, lt=1)
    # Deprecated (first_token_timeout_s, unary_timeout_s and stream_idle_timeout_s
    # replace it): still bounds each whole attempt, within the caller's deadline.
    attempt_timeout_s: float | None = Field(None, gt=0)


class BreakerConfig(_Strict):
    """A circuit breaker per deployment: skip one that keeps failing."""

    enabled: bool = True
    # Consecutive failures (client errors excluded) that open the circuit.
    failure_threshold: int = Field(5, ge=1)
    # How long an open circuit skips its deployment before probing it again.
    recovery_s: float = Field(60.0, gt=0)
    # Calls let through at once while half-open; one success closes the circuit.
    half_open_probes: int = Field(1, ge=1)


class DeploymentConfig(_Strict):
    """One place a route's model is served: a provider instance and its model id."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    # Share of calls among deployments of the same priority.
    weight: float = Field(1.0, gt=0)
    # Lower is tried first; deployments of one priority are load-balanced.
    # Default: the position of the first deployment of the same model, so
    # several deployments of one model share the load and other models are
    # fallbacks in list order.
    priority: int | None = None
    # Limits of this deployment when they differ from the provider's model.
    context_window: int | None = Field(None, gt=0)
    max_output_tokens: int | None = Field(None, gt=0)
    # The rate limits the provider gives this deployment (server/routing/
    # deployment_limits.py); they override the provider's model entry. Tokens
    # are estimated input plus max_tokens, as for a key's limit.
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)


Tier = Literal["small", "medium", "large"]


class SmartRoutingConfig(_Strict):
    """An alias that picks a tier of model from the request (server/routing/smart.py)."""

    alias: str = Field("auto", min_length=1)
    # Tier -> a model id, alias or route; at least one tier.
    tiers: dict[Tier, str] = Field(min_length=1)
    # Estimated input tokens from which the medium and large tiers are chosen.
    medium_input_tokens: int = Field(2_000, ge=0)
    large_input_tokens: int = Field(20_000, ge=0)
    # A request tag (metadata.tags) naming the tier the caller wants.
    hint_tag: str = "tier"
    # Keys with a budget under this many nanodollars never get above `small`.
    low_budget_nanos: int | None = Field(None, ge=0)


class RoutingConfig(_Strict):
    """Routes, retries, circuit breakers and load balancing (server/routing/)."""

    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    # How deployments of one priority share calls.
    balancing: Literal["weighted", "least_in_flight"] = "weighted"
    # Alias -> deployments, in fallback order. Models not named here route
    # to the provider that lists them, as without this section.
    routes: dict[str, list[DeploymentConfig]] = {}
    smart: SmartRoutingConfig | None = None
    # The longest a call waits for a rate-limited deployment's capacity
    # (never past its deadline) before that deployment is skipped.
    deployment_queue_s: float = Field(1.0, ge=0)

    @field_validator("routes")
    @classmethod
    def _routes_are_not_empty(
        cls, routes: dict[str, list[DeploymentConfig]]
    ) -> dict[str, list[DeploymentConfig]]:
        for alias, deployments in routes.items():
            if not deployments:
                raise ValueError(f"route {alias!r} has no deployments")
        return routes


# -- Limits, budgets, usage ledger (server/accounting/) -------------


class KeyLimitsConfig(_Strict):
    """Limits for one API key; unset fields fall back to the key store's, then to none."""

    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)


class LimitsConfig(_Strict):
    """Per-key rate limits (interceptors/rate_limit.py, server/accounting/admission.py)."""

    # Where counters live: this process or a Redis shared by replicas.
    backend: Literal["local", "redis"] = "local"
    # Applied to every key (and to unauthenticated local-development calls).
    default: KeyLimitsConfig = KeyLimitsConfig()
    # Key id -> limits overriding the default and the key store.
    keys: dict[str, KeyLimitsConfig] = {}


class RedisConfig(_Strict):
    """The Redis that replicas share: the limits' counters (limits.backend:
    redis), and the response cache's and request ids' answers (cache.backend,
    idempotency.backend: redis). `failure_mode` is the limits'; the cache and
    the request ids go on without Redis when it cannot be reached."""

    url: str = "redis://127.0.0.1:6379/0"
    # Every Redis command is bounded by this: a call never hangs on Redis.
    timeout_s: float = Field(0.25, gt=0, le=10)
    # When Redis cannot be reached: let calls through (open) or refuse them (closed).
    failure_mode: Literal["open", "closed"] = "open"
    key_prefix: str = "llmgw:"
    # Connections each of the limits and the cache may hold (server/redis_connection.py):
    # beyond them a command waits for one, within timeout_s.
    max_connections: int = Field(256, gt=0, le=10_000)


class KeyBudgetConfig(_Strict):
    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)


class BudgetsConfig(_Strict):
    """Spending caps per key and period (UTC day, UTC month), with alerts."""

    default: KeyBudgetConfig = KeyBudgetConfig()
    keys: dict[str, KeyBudgetConfig] = {}
    # Fractions of a budget at which an alert fires, once per period.
    alert_thresholds: tuple[float, ...] = (0.5, 0.8, 0.95)
    # POSTed a JSON alert (in the background, never delaying a call); None: log only.
    alert_webhook_url: str | None = None
    # A reservation of a handler that never settles (a crashed replica) expires.
    reservation_ttl_s: float = Field(900.0, gt=0)
    # limits.backend redis: raise Redis's spends to the usage ledger's this often
    # (a settle lost while Redis was unreachable, an SQLite ledger's rows); 0: never.
    reconcile_interval_s: float = Field(60.0, ge=0)

    @field_validator("alert_thresholds")
    @classmethod
    def _fractions(cls, thresholds: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < t <= 1 for t in thresholds):
            raise ValueError("thresholds are fractions in (0, 1]")
        return tuple(sorted(thresholds))


def _ledger_path() -> Path:
    return _auth_state_dir() / "usage.sqlite3"


class LedgerConfig(_Strict):
    """The usage ledger: one row per generation call."""

    enabled: bool = True
    backend: Literal["sqlite", "postgres"] = "sqlite"
    path: Path = Field(default_factory=_ledger_path)
    # postgres only: a libpq connection string or URL (the password best in
    # PGPASSWORD or ~/.pgpass; it is never logged).
    dsn: str = ""
    # Rows are written in batches this often; a crash loses at most this much.
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    # async: a call's row is written after its caller has its answer (a crash
    # loses the rows of the last flush interval). sync: the caller gets the
    # final status (the end of the body, over HTTP) only once the row is
    # committed, in a batch shared with the calls ending meanwhile; with
    # SQLite, each batch is also synced to disk.
    durability: Literal["async", "sync"] = "async"
    max_batch: int = Field(500, ge=1)
    # Rows kept in memory while the ledger cannot be written (PostgreSQL
    # unreachable, a full disk or a locked SQLite file); beyond it rows are dropped.
    max_buffered: int = Field(100_000, ge=1)

    @field_validator("path")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()

    @model_validator(mode="after")
    def _postgres_needs_a_dsn(self) -> Self:
        if self.enabled and self.backend == "postgres" and not self.dsn.strip():
            raise ValueError(
                "ledger.dsn is required with ledger.backend: postgres"
                " (e.g. postgresql://llmgw@db.internal:5432/llmgw)"
            )
        return self


# -- Response cache (server/cache/) -----------------------------------


class CacheModelConfig(_Strict):
    """The cache settings of one model, alias or route; unset fields: the `cache` section's."""

    enabled: bool | None = None
    ttl_s: float | None = Field(None, gt=0)
    max_entry_bytes: int | None = Field(None, gt=0)
    backend: Literal["memory", "redis"] | None = None
    namespace: str | None = None
    store_max_tokens: bool | None = None
    store_tool_calls: bool | None = None


class CacheConfig(_Strict):
    """The exact-match response cache in front of the router (off unless enabled)."""

    # Every model's default; `models` turns it on or off per model, alias or route.
    enabled: bool = False
    # How long an answer is served from the cache (a caller's x-llmgw-cache-ttl
    # may shorten it for the answer its call stores).
    ttl_s: float = Field(3600.0, gt=0)
    # Larger answers are not stored (measured encoded, before compression).
    max_entry_bytes: int = Field(1024 * 1024, gt=0)
    # memory: this process's LRU; redis: shared by replicas (the `redis` section's server).
    backend: Literal["memory", "redis"] = "memory"
    # The memory backend's bound: the least recently used answers go beyond it.
    max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # Who shares answers: "" gives each API key its own; a name here shares
    # them between every key whose calls use this setting.
    namespace: str = ""
    # Answers cut at max_tokens, and answers that call tools, are not stored
    # unless these say so.
    store_max_tokens: bool = False
    store_tool_calls: bool = False
    # Identical calls arriving while the first one's answer is being made wait
    # for it this long at most (single flight), then call the upstream themselves.
    lock_timeout_s: float = Field(30.0, gt=0, le=600)
    # The answers of calls in flight, kept until complete, hold this much at
    # most all together; beyond it an answer is not kept (not stored).
    max_pending_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # Model id, alias or route name -> its own settings.
    models: dict[str, CacheModelConfig] = {}

    @property
    def used(self) -> bool:
        """Whether any model may be cached."""
        return self.enabled or any(m.enabled for m in self.models.values())

    def backends(self) -> set[str]:
        """The backends some model's settings name."""
        names: set[str] = {self.backend} if self.enabled else set()
        for model in self.models.values():
            if model.enabled or (model.enabled is None and self.enabled):
                names.add(model.backend or self.backend)
        return names


class IdempotencyConfig(_Strict):
    """A repeated GenerateRequest.request_id gets its first call's answer
    (server/cache/idempotency.py)."""

    # How long a request id's answer is kept for its repeats (0: off).
    window_s: float = Field(600.0, ge=0)
    # memory: this process; redis: shared by replicas (the `redis` section's server).
    backend: Literal["memory", "redis"] = "memory"
    # Larger answers are not kept (a repeat then calls the upstream again).
    max_entry_bytes: int = Field(4 * 1024 * 1024, gt=0)
    # The memory backend's bound: the least recently used answers go beyond it.
    max_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # A repeat arriving while the first call runs waits this long at most.
    wait_s: float = Field(60.0, gt=0, le=600)
    # The answers of calls in flight, kept until complete, hold this much at
    # most all together; beyond it an answer is not kept (its repeat runs again).
    max_pending_bytes: int = Field(16 * 1024 * 1024, gt=0)


# -- Guardrails: PII and secrets (server/guardrails/) ----------------


class PiiGuardConfig(_Strict):
    """The PII and secrets guardrail of one scope; unset fields inherit.

    `guardrails.pii` is every call's default; `guardrails.models.<name>.pii`
    overrides it for a model, alias or route, and `guardrails.keys.<id>.pii`
    for an API key (the key wins over the model). What is still unset after
    that takes the defaults noted here.
    """

    # off (the default) | detect: count and log entity types | mask: replace each
    # value with a placeholder stable within the conversation (<EMAIL_ADDRESS_1>)
    # | redact: remove values | block: refuse with INVALID_ARGUMENT.
    action: Literal["off", "detect", "mask", "redact", "block"] | None = None
    # Presidio entity types (default: credit cards, IBAN, US SSN, e-mail, phone,
    # IP address and the secrets: API keys, JWTs, PEM private keys, AWS keys).
    entities: tuple[str, ...] | None = None
    score_threshold: float | None = Field(None, ge=0, le=1)  # default 0.5
    scope: Literal["input", "output", "both"] | None = None  # default both
    # An analyzer error, time-out or spent scan budget: block (default) or allow.
    on_error: Literal["block", "allow"] | None = None
    # With mask: put the original values back into the answer (default false).
    restore: bool | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        # YAML reads a bare `off` as false.
        return "off" if value is False else value


class GuardrailScopeConfig(_Strict):
    """The guardrails of one model, alias, route or API key."""

    pii: PiiGuardConfig = PiiGuardConfig()


class GuardrailsConfig(_Strict):
    """Guardrails on what reaches a model and what comes back (off unless configured)."""

    pii: PiiGuardConfig = PiiGuardConfig()
    # Model id, alias or route name -> overrides; API key id -> overrides.
    models: dict[str, GuardrailScopeConfig] = {}
    keys: dict[str, GuardrailScopeConfig] = {}
    # Analysis runs in this many threads; a call's analysis that takes longer
    # than timeout_s follows on_error.
    workers: int = Field(2, ge=1, le=64)
    timeout_s: float = Field(1.0, gt=0, le=60)
    # The most new (not cached) text one call may have scanned; the rest follows on_error.
    max_scan_chars: int = Field(250_000, gt=0)
    # Analysis results kept per content block (by hash), so a resent transcript
    # is scanned only for its new blocks.
    cache_entries: int = Field(50_000, ge=0)
    # Streamed answers under mask, redact or block hold back this many characters,
    # so a value split between two deltas is seen whole.
    stream_window_chars: int = Field(128, ge=16, le=4096)
    # Regions whose phone number formats are recognized (each one costs time).
    phone_regions: tuple[str, ...] = ("US", "GB")
    language: str = "en"
    # An installed spaCy model package (e.g. en_core_web_sm) adds its named
    # entities (PERSON, LOCATION, ...); none: a blank pipeline, nothing downloaded.
    ner_model: str | None = None

    @property
    def used(self) -> bool:
        """Whether any call may be guarded."""
        scopes = [self.pii, *(s.pii for s in self.models.values())]
        scopes += [s.pii for s in self.keys.values()]
        return any(s.action not in (None, "off") for s in scopes)


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # Key-encryption keys for the provider API keys kept in the key store.
    secrets: SecretsConfig = SecretsConfig()
    # Instance name -> provider. The offline provider serves when none is configured.
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)
    routing: RoutingConfig = RoutingConfig()
    # Rate limits, budgets, the usage ledger and the Redis they may share.
    limits: LimitsConfig = LimitsConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    redis: RedisConfig = RedisConfig()
    # The response cache, in front of the router.
    cache: CacheConfig = CacheConfig()
    # Request ids that make a call idempotent.
    idempotency: IdempotencyConfig = IdempotencyConfig()
    # PII and secrets in prompts and answers: detect, mask, redact or block.
    guardrails: GuardrailsConfig = GuardrailsConfig()
    # Observability.
    tracing: TracingConfig = TracingConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _one_metrics_port_per_process(self) -> Self:
        if self.metrics.enabled and self.server.workers > 1:
            raise ValueError(
                "metrics.enabled needs server.workers: 1 (each worker would need its own port)"
            )
        return self

    @model_validator(mode="after")
    def _workers_share_their_limits(self) -> Self:
        # With limits.backend: local every worker is a process with its own
        # counters and budgets, so N workers would let each key through N times
        # its limits and spend its budget N times, and say nothing.
        configured = self.configured_limits()
        if self.workers_count_limits_alone and configured:
            raise ValueError(
                f"server.workers: {self.server.workers} with limits.backend:"
                f" {self.limits.backend} would give each worker its own limits and budgets"
                f" ({', '.join(configured)}), so every key would get {self.server.workers}"
                " times its limits; set limits.backend: redis (shared by all workers)"
                " or server.workers: 1"
            )
        return self

    @model_validator(mode="after")
    def _locate_stored_provider_keys(self) -> Self:
        keys_file = self.secrets.encryption_keys_file
        for section in self.providers.values():
            section._stored_key_location = {
                "key_store": str(self.auth.key_store),
                "encryption_keys_file": None if keys_file is None else str(keys_file),
            }
        return self

    @property
    def http_port(self) -> int:
        """The HTTP front door's configured port; 0 when it is off (or picked by the OS)."""
        return self.http.port if self.http.enabled else 0

    @property
    def workers_count_limits_alone(self) -> bool:
        """Several workers, each with its own in-process limits and budgets."""
        return self.server.workers > 1 and self.limits.backend != "redis"

    def configured_limits(self) -> list[str]:
        """The limits and budgets sections that configure anything."""
        return configured_limit_sections(self.limits, self.budgets)


def configured_limit_sections(limits: LimitsConfig, budgets: BudgetsConfig) -> list[str]:
    """The limits and budgets sections that configure anything (none: no key is limited
    by the configuration, though the key store's keys may still be)."""
    sections = {
        "limits.default": limits.default != KeyLimitsConfig(),
        "limits.keys": bool(limits.keys),
        "budgets.default": budgets.default != KeyBudgetConfig(),
        "budgets.keys": bool(budgets.keys),
    }
    return [name for name, configured in sections.items() if configured]


class ConfigError(Exception):
    """The configuration is invalid; the message names every bad key."""


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """Loads and validates the configuration.

    `path` defaults to $LLMGW_CONFIG; no file means defaults. `overrides`
    are dotted keys from command-line flags ({"server.port": 50052}).
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_PATH_ENV) or None
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}

    for name, raw in environ.items():
        if (
            name.startswith(ENV_PREFIX)
            and name != CONFIG_PATH_ENV
            and name not in CLIENT_ENV
            and name not in SECRET_ENV
        ):
            keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
            _set(data, keys, yaml.safe_load(raw) if raw else raw, origin=name)
    for dotted, value in (overrides or {}).items():
        _set(data, dotted.split("."), value, origin=f"--{dotted}")
    if "providers" not in data:
        data["providers"] = default_providers(environ)

    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"invalid configuration ({source}):\n{problems}") from None


def _set(data: dict[str, Any], keys: list[str], value: Any, *, origin: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys)} sets a key inside a non-mapping")
        node = child
    node[keys[-1]] = value
