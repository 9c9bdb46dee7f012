"""API keys: their format, their keyed hash, and the SQLite store that holds them.

A key reads `llmgw_<id>_<secret>`: a recognisable prefix (so secret scanners
and people can tell what leaked), a public id (12 hex digits, the token's
`sub` and what `keys list` and `keys revoke` show), and 192 random bits. The
store keeps only HMAC-SHA256(server secret, key), compared in constant time;
the key itself is shown once, at creation. Nothing here logs a key or a hash.

The store is read on the serving path through `asyncio.to_thread` (sqlite3
blocks), and records are cached for a few seconds so that a valid token
costs no database round trip; `revoke` in the same process drops its cache
entry at once, another process's revocation is seen within the cache TTL.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from server.identity import ALL_MODELS, KeyLimits
from server.telemetry.audit import KEY_CREATED, KEY_REVOKED, audit_event

KEY_PREFIX = "llmgw_"
_KEY = re.compile(r"^llmgw_([0-9a-f]{12})_([0-9a-f]{48})$")
SECRET_BYTES = 32
_CACHE_MAX_ENTRIES = 10_000


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

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def new_api_key() -> tuple[str, str]:
    """A fresh (key id, key) pair."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_hex(24)}"


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    models TEXT NOT NULL,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    budget_nanos INTEGER,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""
_COLUMNS = (
    "id, name, key_hash, scopes, models, requests_per_minute, tokens_per_minute,"
    " budget_nanos, created_at, revoked_at"
)


def _record(row: Sequence[object]) -> KeyRecord:
    (key_id, name, key_hash, scopes, models, rpm, tpm, budget, created, revoked) = row
    return KeyRecord(
        id=str(key_id),
        name=str(name),
        key_hash=str(key_hash),
        scopes=frozenset(json.loads(str(scopes))),
        models=tuple(json.loads(str(models))),
        limits=KeyLimits(rpm, tpm, budget),  # type: ignore[arg-type]
        created_at=float(created),  # type: ignore[arg-type]
        revoked_at=None if revoked is None else float(revoked),  # type: ignore[arg-type]
    )


class KeyStore:
    """API key records in SQLite, with a short-lived cache for the serving path.

    The admin operations (create, list, revoke) are synchronous for the
    command line; the serving path uses `get`, which runs in a thread.
    """

    def __init__(
        self,
        path: Path,
        *,
        cache_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()

    @contextmanager
    def _connect(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mode=rw: the serving side never creates an empty store by accident.
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        with closing(sqlite3.connect(uri, uri=True, timeout=5)) as connection:
            if create:
                connection.execute(_SCHEMA)
                os.chmod(self.path, 0o600)
            with connection:  # one transaction, committed on success
                yield connection

    # -- admin (command line) --------------------------------------------------

    def create(
        self,
        hasher: KeyHasher,
        *,
        name: str,
        scopes: Iterable[str],
        models: Iterable[str] = ALL_MODELS,
        limits: KeyLimits | None = None,
    ) -> tuple[KeyRecord, str]:
        """Stores a new key; returns its record and the key, which nothing keeps."""
        key_id, key = new_api_key()
        limits = limits or KeyLimits()
        record = KeyRecord(
            id=key_id,
            name=name,
            key_hash=hasher.hash(key),
            scopes=frozenset(scopes),
            models=tuple(models) or ALL_MODELS,
            limits=limits,
            created_at=time.time(),
        )
        with self._connect(create=True) as db:
            db.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
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
                ),
            )
        audit_event(
            KEY_CREATED,
            key_id=record.id,
            name=record.name,
            scopes=sorted(record.scopes),
            models=list(record.models),
        )
        return record, key

    def list(self) -> list[KeyRecord]:
        if not self.path.exists():
            return []
        with self._connect() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [_record(row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Marks a key revoked; False when no such key (or already revoked)."""
        revoked = self._revoke_row(key_id)
        self._cache.pop(key_id, None)
        if revoked:
            audit_event(KEY_REVOKED, key_id=key_id)
        return revoked

    def _revoke_row(self, key_id: str) -> bool:
        if not self.path.exists():
            return False
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount > 0

    def lookup(self, key_id: str) -> KeyRecord | None:
        """The stored record, uncached and blocking (None when absent)."""
        try:
            with self._connect() as db:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
                ).fetchone()
        except sqlite3.OperationalError:
            # No store yet (no key was ever created), or it is locked past the
            # timeout: either way this key cannot be vouched for.
            return None
        return _record(row) if row else None

    # -- serving path ----------------------------------------------------------

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record of a key, from memory when looked up less than cache_ttl ago."""
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_ttl:
            return cached[1]
        record = await asyncio.to_thread(self.lookup, key_id)
        self._cache[key_id] = (self._clock(), record)
        self._cache.move_to_end(key_id)
        # Unknown ids are cached too (one lookup per guess per TTL), so the
        # cache is bounded: the oldest entries go first.
        while len(self._cache) > _CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)
        return record

    async def revoke_async(self, key_id: str) -> bool:
        """Revokes a key; this process stops accepting it (and its tokens) at once."""
        revoked = await asyncio.to_thread(self._revoke_row, key_id)
        self._cache.pop(key_id, None)
        if revoked:
            audit_event(KEY_REVOKED, key_id=key_id)
        return revoked
