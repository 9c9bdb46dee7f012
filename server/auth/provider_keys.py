"""Providers' API keys kept in the key store, each in an AES-256-GCM envelope.

`keys provider set NAME` seals a key under the first key-encryption key of
the ring (server/auth/envelope.py) into the `provider_keys` table of the
API key store (auth.key_store); a provider section naming it with
`api_key_stored: NAME` reads it through server/credentials.py. Each envelope
is bound to its row (`provider_keys`, NAME, `api_key`), so it cannot be
moved to another name. `rotate_kek` re-seals every row under the ring's
first key, after which an older key can leave the ring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from server.auth.envelope import EnvelopeError, KekRing, SecretPlace, envelope_parts, load_ring
from server.auth.key_store_backend import KeyStoreError
from server.auth.keys import KeyStore
from server.telemetry.audit import PROVIDER_KEY_SET, PROVIDER_KEYS_REENCRYPTED, audit_event

TABLE = "provider_keys"
FIELD = "api_key"


class StoredKeyError(Exception):
    """A stored provider key cannot be read; the message names it, never its value."""


def place_of(name: str) -> SecretPlace:
    return SecretPlace(TABLE, name, FIELD)


@dataclass(frozen=True, slots=True)
class StoredKeyInfo:
    """What `keys provider list` shows: never the key."""

    name: str
    kek_id: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ReencryptionReport:
    reencrypted: int  # rows moved to the first key
    already_current: int  # rows that were on it already
    failed: list[str]  # names whose envelope did not open (left as they were)


class ProviderKeyStore:
    """The `provider_keys` table of a key store."""

    def __init__(self, store: KeyStore, ring: KekRing | None) -> None:
        self._store = store
        self._ring = ring

    @classmethod
    def at(
        cls, key_store: Path | str, keys_file: Path | None, *, need_ring: bool = True
    ) -> ProviderKeyStore:
        """The store at `key_store` (a file or a postgresql:// URL) with the ring
        from `keys_file` or the environment."""
        ring = load_ring(keys_file) if need_ring else None
        return cls(KeyStore(key_store), ring)

    def close(self) -> None:
        """Lets go of the key store's kept connections (PostgreSQL)."""
        self._store.close()

    @property
    def ring(self) -> KekRing:
        if self._ring is None:
            raise StoredKeyError("no key-encryption keys were loaded")
        return self._ring

    def set(self, name: str, secret: str) -> StoredKeyInfo:
        """Seals `secret` as provider key `name` (replacing any earlier one)."""
        ring = self.ring
        envelope = ring.seal(secret, place_of(name))
        now = time.time()
        with self._store.connect(create=True) as db:
            db.execute(
                f"INSERT INTO {TABLE} (name, envelope, created_at, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE"
                " SET envelope = excluded.envelope, updated_at = excluded.updated_at",
                (name, envelope, now, now),
            )
            created = db.execute(
                f"SELECT created_at FROM {TABLE} WHERE name = ?", (name,)
            ).fetchone()[0]
        audit_event(PROVIDER_KEY_SET, name=name, kek_id=ring.primary)
        return StoredKeyInfo(name, ring.primary, float(created), now)

    def get(self, name: str) -> str:
        """The plaintext of provider key `name`; raises StoredKeyError saying why not."""
        where = self._store.where
        if not self._store.exists():
            raise StoredKeyError(f"there is no key store at {where}")
        try:
            with self._store.connect() as db:
                row = db.execute(f"SELECT envelope FROM {TABLE} WHERE name = ?", (name,)).fetchone()
        except KeyStoreError as err:
            raise StoredKeyError(str(err)) from None
        if row is None:
            raise StoredKeyError(f"no provider key named {name!r} in {where}")
        try:
            return self.ring.open(str(row[0]), place_of(name))
        except EnvelopeError as err:
            raise StoredKeyError(f"provider key {name!r} cannot be decrypted: {err}") from None

    def list(self) -> list[StoredKeyInfo]:
        if not self._store.exists():
            return []
        with self._store.connect() as db:
            rows = db.execute(
                f"SELECT name, envelope, created_at, updated_at FROM {TABLE} ORDER BY name"
            ).fetchall()
        infos = []
        for name, envelope, created, updated in rows:
            try:
                kek_id = envelope_parts(str(envelope))[1]
            except EnvelopeError:
                kek_id = "?"
            infos.append(StoredKeyInfo(str(name), kek_id, float(created), float(updated)))
        return infos

    def delete(self, name: str) -> bool:
        if not self._store.exists():
            return False
        with self._store.connect() as db:
            return db.execute(f"DELETE FROM {TABLE} WHERE name = ?", (name,)).rowcount > 0

    def rotate_kek(self) -> ReencryptionReport:
        """Re-seals every row not on the ring's first key, in one transaction.

        A row that does not open is left as it was and named in the report;
        the others are re-sealed all the same.
        """
        ring = self.ring
        moved = current = 0
        failed: list[str] = []
        if not self._store.exists():
            return ReencryptionReport(0, 0, [])
        now = time.time()
        with self._store.connect() as db:
            rows = db.select_for_update(
                f"SELECT name, envelope FROM {TABLE} ORDER BY name"
            ).fetchall()
            for name, envelope in rows:
                name, envelope = str(name), str(envelope)
                try:
                    plaintext = ring.open(envelope, place_of(name))
                except EnvelopeError:
                    failed.append(name)
                    continue
                if envelope_parts(envelope)[1] == ring.primary:
                    current += 1
                    continue
                db.execute(
                    f"UPDATE {TABLE} SET envelope = ?, updated_at = ? WHERE name = ?",
                    (ring.seal(plaintext, place_of(name)), now, name),
                )
                moved += 1
        audit_event(
            PROVIDER_KEYS_REENCRYPTED,
            kek_id=ring.primary,
            reencrypted=moved,
            already_current=current,
            failed=failed,
        )
        return ReencryptionReport(moved, current, failed)
