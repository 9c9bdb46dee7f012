"""API keys: their format, their keyed hash, and the store that holds them.

A key reads `llmgw_<id>_<secret>`: a recognisable prefix (so secret scanners
and people can tell what leaked), a public id (12 hex digits, the token's
`sub` and what `keys list` and `keys revoke` show), and 192 random bits. The
store keeps only HMAC-SHA256(server secret, key), compared in constant time;
the key itself is shown once, at creation. Nothing here logs a key or a hash.

The store is an SQLite file, or a PostgreSQL database that replicas share
(`auth.key_store`; key_store_backend.py, key_store_postgres.py): one API,
each statement written once. It is read on the serving path through
`asyncio.to_thread` (both drivers block), and records are cached for a few
seconds so that a valid token costs no database round trip; `revoke`,
`rotate` and `update` in the same process drop its cache entry at once,
another process's (another replica's) change is seen within the cache TTL.

Every key expires (`expires_at`; None only where `auth.allow_keys_without_expiry`
let `keys create --expires-in never` make it). `rotate` gives a key a new
secret under the same id, so its scopes, limits, budgets and usage stay
with it; the previous secret's hash is kept beside the new one and accepted
until `previous_valid_until` (the grace period). A store made before keys
expired is migrated when first opened (key_store_backend._migrate): its keys are given
`created_at + key_ttl_days`, but never less than EXPIRY_WARNING_DAYS from the
migration, so no key stops working unannounced (README, Authentication).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

# Re-exported: the migration (key_store_backend.py) needs them, the rest of auth reads them here.
from server.auth.key_store_backend import DAY_S as DAY_S
from server.auth.key_store_backend import EXPIRY_WARNING_DAYS as EXPIRY_WARNING_DAYS
from server.auth.key_store_backend import (
    KeyStoreBackend,
    KeyStoreDb,
    KeyStoreError,
    KeyStoreUnavailableError,
    open_backend,
)
from server.config import AuthConfig
from server.identity import ALL_MODELS, KNOWN_SCOPES, KeyLimits
from server.telemetry.audit import (
    KEY_CREATED,
    KEY_REVOKED,
    KEY_ROTATED,
    KEY_UPDATED,
    audit_event,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "llmgw_"
_KEY = re.compile(r"^llmgw_([0-9a-f]{12})_([0-9a-f]{48})$")
SECRET_BYTES = 32
_CACHE_MAX_ENTRIES = 10_000
_UNAVAILABLE_LOG_EVERY_S = 30.0
DEFAULT_KEY_TTL_DAYS = 90.0


class SecretUnavailableError(Exception):
    """The server secret for key hashes cannot be read."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key as stored: everything except the key."""

    id: str
    name: str
    key_hash: str = field(repr=False)
    scopes: frozenset[str]
    models: tuple[str, ...]
    limits: KeyLimits
    created_at: float
    revoked_at: float | None = None
    # None: never (only where auth.allow_keys_without_expiry allows it).
    expires_at: float | None = None
    # The secret before the last rotation, accepted until previous_valid_until.
    previous_key_hash: str | None = field(default=None, repr=False)
    previous_valid_until: float | None = None
    rotated_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def in_grace(self, now: float) -> bool:
        """Whether the secret before the last rotation is still accepted."""
        return self.previous_valid_until is not None and now < self.previous_valid_until

    def valid_until(self, now: float) -> float:
        """The last moment anything issued now may be valid (inf: never expires).

        During a rotation's grace the caller may hold either secret, so a
        token issued then lives no longer than the grace.
        """
        end = math.inf if self.expires_at is None else self.expires_at
        if self.in_grace(now):
            assert self.previous_valid_until is not None
            end = min(end, self.previous_valid_until)
        return end


def new_api_key() -> tuple[str, str]:
    """A fresh (key id, key) pair."""
    key_id = secrets.token_hex(6)
    return key_id, new_secret_for(key_id)


def new_secret_for(key_id: str) -> str:
    """A fresh key for an existing id (a rotation)."""
    return f"{KEY_PREFIX}{key_id}_{secrets.token_hex(24)}"


def looks_like_api_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


def key_id_of(key: str) -> str | None:
    """The id inside a well-formed key, or None."""
    match = _KEY.match(key)
    return match.group(1) if match else None


class KeyHasher:
    """HMAC-SHA256 of API keys under the server secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the key secret must hold at least {SECRET_BYTES} bytes")
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def matches(self, key: str, key_hash: str) -> bool:
        return hmac.compare_digest(self.hash(key), key_hash)


def secret_fingerprint(key_hash: str) -> str:
    """Which of a key's secrets a token was issued for (its `sec` claim): a digest
    of the secret's stored hash, which says nothing of either."""
    return hashlib.sha256(key_hash.encode()).hexdigest()[:16]


def read_secret(path: Path) -> bytes:
    """The secret in `path` (raises SecretUnavailableError when missing or short)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as err:
        raise SecretUnavailableError(f"cannot read the key secret {path}: {err.strerror}") from None
    if len(secret) < SECRET_BYTES:
        raise SecretUnavailableError(f"the key secret {path} is shorter than {SECRET_BYTES} bytes")
    return secret


def ensure_secret(path: Path) -> bytes:
    """Reads the secret, creating it (mode 0600) when it does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(SECRET_BYTES) + "\n")
    return read_secret(path)


class DefaultTtl:
    """The type of DEFAULT_TTL: a key's lifetime as the store's key_ttl_days says."""


DEFAULT_TTL = DefaultTtl()


class Unchanged:
    """The type of UNCHANGED: `KeyStore.update` leaves this field as it is.

    A sentinel rather than None, because None is a value some fields take
    (`expires_at=None`: never; a limit of None: unlimited).
    """


UNCHANGED = Unchanged()


class SecretFile:
    """The key secret, read lazily and then kept: the serving side creates nothing.

    `python -m server keys create` makes the secret with the first key, so a
    gateway started before any key exists picks it up on the first key it sees.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hasher: KeyHasher | None = None

    async def hasher(self) -> KeyHasher:
        if self._hasher is None:
            self._hasher = KeyHasher(await asyncio.to_thread(read_secret, self.path))
        return self._hasher


# Every column of api_keys, in the order _record reads them.
API_KEY_COLUMNS = (
    "id, name, key_hash, scopes, models, requests_per_minute, tokens_per_minute,"
    " budget_nanos, created_at, revoked_at, expires_at, previous_key_hash,"
    " previous_valid_until, rotated_at"
)


_ACTIVE_KEY = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ? AND revoked_at IS NULL"
# The fields `KeyStore.update` may change, as the audit event names them.
_UPDATABLE = ("name", "models", "scopes", "limits", "expires_at")


def _optional(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _record(row: Sequence[object]) -> KeyRecord:
    (key_id, name, key_hash, scopes, models, rpm, tpm, budget, created, revoked) = row[:10]
    expires, previous_hash, previous_until, rotated = row[10:]
    return KeyRecord(
        id=str(key_id),
        name=str(name),
        key_hash=str(key_hash),
        scopes=frozenset(json.loads(str(scopes))),
        models=tuple(json.loads(str(models))),
        limits=KeyLimits(rpm, tpm, budget),  # type: ignore[arg-type]
        created_at=float(created),  # type: ignore[arg-type]
        revoked_at=_optional(revoked),
        expires_at=_optional(expires),
        previous_key_hash=None if previous_hash is None else str(previous_hash),
        previous_valid_until=_optional(previous_until),
        rotated_at=_optional(rotated),
    )


class KeyStore:
    """API key records in SQLite or PostgreSQL, with a short-lived cache for the serving path.

    The admin operations (create, list, rotate, update, revoke) are
    synchronous for the command line; the serving path uses `get`, which
    runs in a thread. `location` is a file path or a postgresql:// URL.
    """

    def __init__(
        self,
        location: Path | str,
        *,
        cache_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        key_ttl_days: float = DEFAULT_KEY_TTL_DAYS,
        wall_clock: Callable[[], float] = time.time,
        allow_keys_without_expiry: bool = False,
    ) -> None:
        self.key_ttl_days = key_ttl_days
        self.backend: KeyStoreBackend = open_backend(
            location, key_ttl_days=key_ttl_days, wall_clock=wall_clock
        )
        # What messages may name: a path, or user@host:port/db (never a password).
        self.where = self.backend.where
        # auth.allow_keys_without_expiry: whether `update` may set expires_at=None.
        self.allow_keys_without_expiry = allow_keys_without_expiry
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        # Counts `forget` calls: a lookup that a forget overtook is not cached.
        self._forgotten = 0
        self._unavailable_logged_at = -math.inf

    @classmethod
    def from_config(cls, config: AuthConfig) -> KeyStore:
        """The store `auth:` names, with its cache TTL and expiry policy."""
        return cls(
            config.key_store,
            cache_ttl=config.cache_ttl_s,
            key_ttl_days=config.key_ttl_days,
            allow_keys_without_expiry=config.allow_keys_without_expiry,
        )

    def connect(self, *, create: bool = False) -> AbstractContextManager[KeyStoreDb]:
        """One transaction on the store, committed on success (the schema made current).

        Statements use `?` placeholders whichever the backend. Without
        `create` an SQLite store must exist: the serving side never creates
        an empty store by accident. Raises KeyStoreError (KeyStoreUnavailableError
        when the store cannot be reached).
        """
        return self.backend.connect(create=create)

    def exists(self) -> bool:
        """Whether the store may hold keys (False: an SQLite file not made yet)."""
        return self.backend.exists()

    def close(self) -> None:
        """Lets go of the connections kept for reuse (PostgreSQL)."""
        self.backend.close()

    # -- admin (command line) --------------------------------------------------

    def create(
        self,
        hasher: KeyHasher,
        *,
        name: str,
        scopes: Iterable[str],
        models: Iterable[str] = ALL_MODELS,
        limits: KeyLimits | None = None,
        expires_in_s: float | DefaultTtl | None = DEFAULT_TTL,
    ) -> tuple[KeyRecord, str]:
        """Stores a new key; returns its record and the key, which nothing keeps.

        `expires_in_s`: the key's lifetime; by default the store's
        key_ttl_days, None for a key that never expires (the caller checks
        that the configuration allows it).
        """
        key_id, key = new_api_key()
        limits = limits or KeyLimits()
        now = self._wall_clock()
        record = KeyRecord(
            id=key_id,
            name=name,
            key_hash=hasher.hash(key),
            scopes=frozenset(scopes),
            models=tuple(models) or ALL_MODELS,
            limits=limits,
            created_at=now,
            expires_at=self._expiry(now, expires_in_s),
        )
        with self.connect(create=True) as db:
            db.execute(
                f"INSERT INTO api_keys ({API_KEY_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, NULL, NULL)",
                (
                    record.id,
                    record.name,
                    record.key_hash,
                    json.dumps(sorted(record.scopes)),
                    json.dumps(list(record.models)),
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    limits.budget_nanos,
                    record.created_at,
                    record.expires_at,
                ),
            )
        audit_event(
            KEY_CREATED,
            key_id=record.id,
            name=record.name,
            scopes=sorted(record.scopes),
            models=list(record.models),
            expires_at=record.expires_at,
        )
        return record, key

    def _expiry(self, now: float, expires_in_s: float | DefaultTtl | None) -> float | None:
        if isinstance(expires_in_s, DefaultTtl):
            return now + self.key_ttl_days * DAY_S
        return None if expires_in_s is None else now + expires_in_s

    def rotate(
        self,
        hasher: KeyHasher,
        key_id: str,
        *,
        grace_s: float,
        expires_in_s: float | DefaultTtl | None = DEFAULT_TTL,
    ) -> tuple[KeyRecord, str] | None:
        """Gives an active key a new secret; None when there is no such key.

        The id, and so the scopes, limits, budgets and usage, stay. The old
        secret is accepted for `grace_s` more seconds (never past its own
        expiry), and so are the tokens issued before now; 0 ends it at once.
        The new secret gets a full lifetime (`expires_in_s`, as for create).
        A second rotation within the grace drops the first secret at once.
        """
        if not self.exists():
            return None
        key = new_secret_for(key_id)
        now = self._wall_clock()
        expires_at = self._expiry(now, expires_in_s)
        with self.connect() as db:
            row = db.select_for_update(_ACTIVE_KEY, (key_id,)).fetchone()
            if row is None:
                return None
            old = _record(row)
            grace_end: float | None = None
            if grace_s > 0:
                grace_end = min(
                    now + grace_s, math.inf if old.expires_at is None else old.expires_at
                )
            db.execute(
                "UPDATE api_keys SET key_hash = ?, previous_key_hash = ?,"
                " previous_valid_until = ?, rotated_at = ?, expires_at = ? WHERE id = ?",
                (
                    hasher.hash(key),
                    old.key_hash if grace_end is not None else None,
                    grace_end,
                    now,
                    expires_at,
                    key_id,
                ),
            )
            row = db.execute(
                f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        self._cache.pop(key_id, None)
        record = _record(row)
        audit_event(
            KEY_ROTATED,
            key_id=key_id,
            name=record.name,
            grace_s=grace_s,
            previous_valid_until=grace_end,
            expires_at=record.expires_at,
        )
        return record, key

    def update(
        self,
        key_id: str,
        *,
        name: str | Unchanged = UNCHANGED,
        models: Iterable[str] | Unchanged = UNCHANGED,
        scopes: Iterable[str] | Unchanged = UNCHANGED,
        limits: KeyLimits | Unchanged = UNCHANGED,
        expires_at: float | Unchanged | None = UNCHANGED,
    ) -> KeyRecord | None:
        """Changes the given fields of an active key; None when there is no such key.

        What is not given stays. `limits` replaces all of them (rate limits
        and budget) at once; empty `models` means all models, as for create;
        `expires_at` is a wall-clock time, None (never) only when the store
        allows keys without expiry (ValueError otherwise, like `keys create`).
        The secret and its hashes are untouched: that is `rotate`. The key
        leaves this process's cache at once; other processes see the change
        within their cache TTL. The audit event (key.updated) names the
        fields that changed; none is emitted when nothing did.
        """
        if expires_at is None and not self.allow_keys_without_expiry:
            raise ValueError("a key that never expires needs auth.allow_keys_without_expiry: true")
        if isinstance(name, str) and not name.strip():
            raise ValueError("a key's name must not be empty")
        new_scopes = None if isinstance(scopes, Unchanged) else frozenset(scopes)
        if new_scopes is not None and (not new_scopes or new_scopes - KNOWN_SCOPES):
            raise ValueError(
                f"scopes must be some of {sorted(KNOWN_SCOPES)}, not {sorted(new_scopes)}"
            )
        if not self.exists():
            return None
        with self.connect() as db:
            row = db.select_for_update(_ACTIVE_KEY, (key_id,)).fetchone()
            if row is None:
                return None
            old = _record(row)
            new = replace(
                old,
                name=old.name if isinstance(name, Unchanged) else name,
                models=old.models if isinstance(models, Unchanged) else tuple(models) or ALL_MODELS,
                scopes=old.scopes if new_scopes is None else new_scopes,
                limits=old.limits if isinstance(limits, Unchanged) else limits,
                expires_at=old.expires_at if isinstance(expires_at, Unchanged) else expires_at,
            )
            changed = [f for f in _UPDATABLE if getattr(new, f) != getattr(old, f)]
            if changed:
                db.execute(
                    "UPDATE api_keys SET name = ?, scopes = ?, models = ?,"
                    " requests_per_minute = ?, tokens_per_minute = ?, budget_nanos = ?,"
                    " expires_at = ? WHERE id = ?",
                    (
                        new.name,
                        json.dumps(sorted(new.scopes)),
                        json.dumps(list(new.models)),
                        new.limits.requests_per_minute,
                        new.limits.tokens_per_minute,
                        new.limits.budget_nanos,
                        new.expires_at,
                        key_id,
                    ),
                )
        self._cache.pop(key_id, None)
        if changed:
            audit_event(
                KEY_UPDATED,
                key_id=key_id,
                name=new.name,
                fields=changed,
                expires_at=new.expires_at,
            )
        return new

    def list(self) -> list[KeyRecord]:
        if not self.exists():
            return []
        with self.connect() as db:
            rows = db.execute(
                f"SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY created_at"
            ).fetchall()
        return [_record(row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Marks a key revoked; False when no such key (or already revoked)."""
        revoked = self._revoke_row(key_id)
        self._cache.pop(key_id, None)
        if revoked:
            audit_event(KEY_REVOKED, key_id=key_id)
        return revoked

    def _revoke_row(self, key_id: str) -> bool:
        if not self.exists():
            return False
        with self.connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._wall_clock(), key_id),
            )
        return cursor.rowcount > 0

    def lookup(self, key_id: str) -> KeyRecord | None:
        """The stored record, uncached and blocking; None when the store holds no such key.

        Raises KeyStoreUnavailableError when the store cannot be read (its
        server is down, the file is locked past the timeout, or there is no
        SQLite file: no key was ever made, or its volume is gone), and
        KeyStoreError when it fails otherwise: "no such key" is only ever
        said by a store that was asked. The serving path (`get`) refuses the
        credential either way.
        """
        with self.connect() as db:
            row = db.execute(
                f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        return _record(row) if row else None

    def _lookup_for_serving(self, key_id: str) -> KeyRecord | None:
        """`lookup`, with a store that cannot be reached as no record: the
        credential is refused like an unknown key, and a warning says why."""
        try:
            return self.lookup(key_id)
        except KeyStoreUnavailableError as err:
            # Locked past the timeout, or its server down: this key cannot be
            # vouched for. No store yet (no key was ever created) is no outage.
            if self.exists():
                self._report_unavailable(err)
            return None

    def _report_unavailable(self, err: KeyStoreError) -> None:
        """A warning at most every _UNAVAILABLE_LOG_EVERY_S: lookups fail by the hundred."""
        now = self._clock()
        if now - self._unavailable_logged_at >= _UNAVAILABLE_LOG_EVERY_S:
            self._unavailable_logged_at = now
            log.warning("cannot read the API key store; credentials are refused: %s", err)

    # -- serving path ----------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record of a key, from memory when looked up less than cache_ttl ago.

        None for an unknown key, and for any key while the store cannot be
        reached (logged at most every 30 s): either way the credential is refused.
        """
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_ttl:
            return cached[1]
        forgotten = self._forgotten
        record = await asyncio.to_thread(self._lookup_for_serving, key_id)
        if forgotten != self._forgotten:
            return record  # read before a change announced meanwhile: not kept
        self._cache[key_id] = (self._clock(), record)
        self._cache.move_to_end(key_id)
        # Unknown ids are cached too (one lookup per guess per TTL), so the
        # cache is bounded: the oldest entries go first.
        while len(self._cache) > _CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)
        return record

    def forget(self, key_id: str | None = None) -> None:
        """Drops a key's cached record (None: every record), so the next call
        reads the store: another process changed the key and said so
        (server/auth/revocation.py)."""
        self._forgotten += 1
        if key_id is None:
            self._cache.clear()
        else:
            self._cache.pop(key_id, None)

    async def valid_until(self, key_id: str, now: float) -> float:
        """When anything issued now for the key must end (TokenIssuer's bound)."""
        record = await self.get(key_id)
        return math.inf if record is None else record.valid_until(now)

    async def revoke_async(self, key_id: str) -> bool:
        """Revokes a key; this process stops accepting it (and its tokens) at once."""
        revoked = await asyncio.to_thread(self._revoke_row, key_id)
        self._cache.pop(key_id, None)
        if revoked:
            audit_event(KEY_REVOKED, key_id=key_id)
        return revoked
