"""Key management that the command line and the admin API share: one set of rules.

`python -m server keys ...` (cli.py) and KeyService (admin_service.py) both
create, rotate and update keys through these functions, so that a key made
either way gets the same defaults (scope `generate`, every model, a lifetime
of auth.key_ttl_days, a 24-hour grace on rotation) and passes the same checks
(a name, known scopes, limits that are not negative, a positive lifetime,
`never` only where auth.allow_keys_without_expiry). A bad value raises
KeyFieldError naming the field (the API's field name; the command line says
which flag). The KeyStore does the writing and the audit events; telling
other gateway processes is revocation.py's.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.auth.keys import (
    DEFAULT_TTL,
    UNCHANGED,
    DefaultTtl,
    KeyHasher,
    KeyRecord,
    KeyStore,
    Unchanged,
    ensure_secret,
)
from server.auth.tokens import create_signing_key, load_signing_keys
from server.config import AuthConfig
from server.identity import ALL_MODELS, KNOWN_SCOPES, SCOPE_GENERATE, KeyLimits

# How long the secret before a rotation keeps working, unless asked otherwise.
DEFAULT_GRACE_S = 86_400.0
_MAX_NAME_CHARS = 200
_MAX_MODELS = 256


class KeyFieldError(ValueError):
    """A bad value for one field of a key operation; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def checked_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise KeyFieldError("name", "a key needs a name (who or what it is for)")
    if len(name) > _MAX_NAME_CHARS:
        raise KeyFieldError("name", f"at most {_MAX_NAME_CHARS} characters")
    return name


def checked_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    unknown = sorted(chosen - KNOWN_SCOPES)
    if unknown or not chosen:
        raise KeyFieldError("scopes", f"unknown scope(s) {unknown}; known: {sorted(KNOWN_SCOPES)}")
    return chosen


def checked_models(models: Iterable[str], *, empty: str = "all") -> tuple[str, ...]:
    """The patterns a key may use. `empty`: what an empty list means, `all`
    (as when creating a key) or `refused` (an update must say `*`, so that
    clearing the list never widens a key by accident)."""
    chosen = tuple(model.strip() for model in models)
    if any(not model for model in chosen):
        raise KeyFieldError("models", "a model or pattern cannot be empty")
    if len(chosen) > _MAX_MODELS:
        raise KeyFieldError("models", f"at most {_MAX_MODELS} models or patterns")
    if not chosen:
        if empty == "refused":
            raise KeyFieldError("models", "list at least one model or pattern; '*' allows all")
        return ALL_MODELS
    return chosen


def checked_limits(limits: KeyLimits, *, field: str = "limits") -> KeyLimits:
    for name in ("requests_per_minute", "tokens_per_minute", "budget_nanos"):
        value = getattr(limits, name)
        if value is not None and value < 0:
            raise KeyFieldError(f"{field}.{name}", f"must not be negative (got {value})")
    return limits


def checked_lifetime(
    config: AuthConfig, lifetime_s: float | DefaultTtl | None, *, field: str = "lifetime"
) -> float | DefaultTtl | None:
    """A key's lifetime: DEFAULT_TTL (auth.key_ttl_days), seconds, or None for never."""
    if lifetime_s is None and not config.allow_keys_without_expiry:
        raise KeyFieldError(
            field, "`never` needs auth.allow_keys_without_expiry: true in the configuration"
        )
    if isinstance(lifetime_s, float | int) and lifetime_s <= 0:
        raise KeyFieldError(field, "a key must live longer than 0")
    return lifetime_s


def checked_expiry(
    config: AuthConfig, expires_at: float | None, now: float, *, field: str = "expire_time"
) -> float | None:
    """A new expiry time (wall clock): in the future, or None (never) where allowed."""
    if expires_at is None:
        checked_lifetime(config, None, field=field)
        return None
    if expires_at <= now:
        raise KeyFieldError(field, "must be in the future (to end a key now, revoke it)")
    return expires_at


def checked_grace(grace_s: float, *, field: str = "grace_period") -> float:
    if grace_s < 0:
        raise KeyFieldError(field, "must not be negative (0 ends the old secret at once)")
    return grace_s


def create_key(
    config: AuthConfig,
    *,
    name: str,
    scopes: Iterable[str] = (SCOPE_GENERATE,),
    models: Iterable[str] = ALL_MODELS,
    limits: KeyLimits | None = None,
    expires_in_s: float | DefaultTtl | None = DEFAULT_TTL,
    store: KeyStore | None = None,
) -> tuple[KeyRecord, str]:
    """Creates an API key; returns its record and the key, which is kept nowhere.

    The first key also makes what the gateway needs to check it and to sign
    tokens for it: the hashing secret and a signing key. `expires_in_s`
    defaults to auth.key_ttl_days; None (never) needs auth.allow_keys_without_expiry.
    `store`: the serving process's store (its cache), else one over auth.key_store.
    """
    name = checked_name(name)
    chosen_scopes = checked_scopes(scopes)
    chosen_models = checked_models(models)
    limits = checked_limits(limits or KeyLimits())
    expires_in_s = checked_lifetime(config, expires_in_s)
    hasher = KeyHasher(ensure_secret(config.secret_file))
    if not any(key.private_key for key in load_signing_keys(config.signing_keys_dir).values()):
        create_signing_key(config.signing_keys_dir)
    store = store or open_store(config)
    return store.create(
        hasher,
        name=name,
        scopes=chosen_scopes,
        models=chosen_models,
        limits=limits,
        expires_in_s=expires_in_s,
    )


def rotate_key(
    config: AuthConfig,
    key_id: str,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    expires_in_s: float | DefaultTtl | None = DEFAULT_TTL,
    store: KeyStore | None = None,
) -> tuple[KeyRecord, str] | None:
    """Gives an active key a new secret (KeyStore.rotate); None when there is no such key."""
    grace_s = checked_grace(grace_s)
    expires_in_s = checked_lifetime(config, expires_in_s)
    store = store or open_store(config)
    return store.rotate(
        KeyHasher(ensure_secret(config.secret_file)),
        key_id,
        grace_s=grace_s,
        expires_in_s=expires_in_s,
    )


def update_key(
    config: AuthConfig,
    key_id: str,
    *,
    now: float,
    name: str | Unchanged = UNCHANGED,
    scopes: Iterable[str] | Unchanged = UNCHANGED,
    models: Iterable[str] | Unchanged = UNCHANGED,
    limits: KeyLimits | Unchanged = UNCHANGED,
    expires_at: float | Unchanged | None = UNCHANGED,
    store: KeyStore | None = None,
) -> KeyRecord | None:
    """Changes the given fields of an active key (KeyStore.update); None when
    there is no such key. An empty `models` is refused: `*` allows every model."""
    store = store or open_store(config)
    return store.update(
        key_id,
        name=name if isinstance(name, Unchanged) else checked_name(name),
        scopes=scopes if isinstance(scopes, Unchanged) else checked_scopes(scopes),
        models=models if isinstance(models, Unchanged) else checked_models(models, empty="refused"),
        limits=limits if isinstance(limits, Unchanged) else checked_limits(limits),
        expires_at=(
            expires_at
            if isinstance(expires_at, Unchanged)
            else checked_expiry(config, expires_at, now)
        ),
    )


def open_store(config: AuthConfig) -> KeyStore:
    """The KeyStore `auth:` names, for a process that serves nothing."""
    return KeyStore.from_config(config)
