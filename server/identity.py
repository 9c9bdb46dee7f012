"""Who is calling: the identity the auth interceptor establishes for each call.

The interceptor (interceptors/auth.py) authenticates the call's credentials
and binds an Identity to the `IDENTITY` context variable around the handler;
anything downstream reads it with `current_identity()` instead of receiving
it as an argument. No identity means the call did not go through
authentication: a public service (health, reflection) or a gateway running
with auth disabled for local development.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from server.errors import ModelNotAllowedError

# Scopes a key can carry. `generate` covers GenerationService; `admin` is
# reserved for key management over the API.
SCOPE_GENERATE = "generate"
SCOPE_ADMIN = "admin"
KNOWN_SCOPES = frozenset({SCOPE_GENERATE, SCOPE_ADMIN})
ALL_MODELS = ("*",)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key limits, all optional (None: unlimited); enforced by the rate limiter."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Spending cap in billionths of a dollar, like Cost.total_nanos.
    budget_nanos: int | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: an API key, presented directly or through a token."""

    key_id: str
    scopes: frozenset[str]
    # Model ids or aliases, as shell-style patterns: ("*",) allows every model.
    models: tuple[str, ...] = ALL_MODELS
    credential: Literal["api_key", "token"] = "api_key"
    name: str = ""
    limits: KeyLimits = field(default_factory=KeyLimits)
    # Which of the key's secrets authenticated the call (server/auth/keys.py
    # secret_fingerprint): a token issued for it carries it, so that a rotation
    # ends the old secret's tokens with its grace. "" when unknown.
    secret: str = ""

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of `names` (the model as asked for, then as resolved) is allowed."""
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.models)


IDENTITY: ContextVar[Identity | None] = ContextVar("llmgateway_identity", default=None)


def current_identity() -> Identity | None:
    """The identity of the call being served, or None when it was not authenticated."""
    return IDENTITY.get()


def require_model_access(requested: str, resolved: str) -> None:
    """Raises ModelNotAllowedError unless the caller's key may use the model.

    Both names count, so a key listing an alias may use that alias, and a key
    listing a model id may reach it through any alias. Without an identity
    (auth disabled, or a public service) there is nothing to restrict.
    """
    identity = current_identity()
    if identity is not None and not identity.may_use((requested, resolved)):
        raise ModelNotAllowedError(requested)
