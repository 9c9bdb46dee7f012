"""Where the key store's rows live: an SQLite file (the default) or PostgreSQL.

`KeyStore` (keys.py) and `ProviderKeyStore` (provider_keys.py) write each
statement once, with `?` placeholders, against a `KeyStoreDb`: one
transaction on either backend. The few differences between the two SQL
dialects are settled here, once: the placeholder (`?` or `%s`), the column
types (REAL/INTEGER or DOUBLE PRECISION/BIGINT, for nanodollar budgets past
2**31), and how a transaction keeps other writers off what it read before
writing it (`select_for_update`: FOR UPDATE in PostgreSQL, BEGIN IMMEDIATE
in SQLite). `ON CONFLICT ... DO UPDATE` reads the same on both.

The SQLite backend also migrates stores made by earlier versions
(`_migrate`); the PostgreSQL one (key_store_postgres.py) was born with the
current schema, which it creates, idempotently, on first use.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

DAY_S = 86_400.0
# A migrated store's keys get at least this long (keys.py reports keys this
# close to their expiry).
EXPIRY_WARNING_DAYS = 14
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class KeyStoreError(Exception):
    """The key store failed; the message names where, never a password."""


class KeyStoreUnavailableError(KeyStoreError):
    """The key store cannot be reached now (no file yet, locked, server down)."""


def is_postgres(location: Path | str) -> bool:
    """Whether `auth.key_store` names a PostgreSQL database rather than a file."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the two backends' SQL, said once."""

    placeholder: str
    real: str
    integer: str
    for_update: str

    def sql(self, text: str) -> str:
        """`text` with its `?` placeholders as this backend writes them."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect(placeholder="?", real="REAL", integer="INTEGER", for_update="")
POSTGRES = Dialect(
    placeholder="%s", real="DOUBLE PRECISION", integer="BIGINT", for_update=" FOR UPDATE"
)

_TABLES = (
    """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    models TEXT NOT NULL,
    requests_per_minute {integer},
    tokens_per_minute {integer},
    budget_nanos {integer},
    created_at {real} NOT NULL,
    revoked_at {real},
    expires_at {real},
    previous_key_hash TEXT,
    previous_valid_until {real},
    rotated_at {real}
)
""",
    # The encrypted provider keys (provider_keys.py).
    """
CREATE TABLE IF NOT EXISTS provider_keys (
    name TEXT PRIMARY KEY,
    envelope TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
)
""",
)


def schema(dialect: Dialect) -> tuple[str, ...]:
    """CREATE TABLE IF NOT EXISTS for every table of the store, in `dialect`."""
    return tuple(t.format(real=dialect.real, integer=dialect.integer) for t in _TABLES)


class Cursor(Protocol):
    """What the stores use of a DB-API cursor (sqlite3's and psycopg's both fit)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    def execute(self, query: Any, params: Any = ..., /) -> Any: ...


class KeyStoreDb:
    """One transaction on the store, taking statements written with `?` placeholders."""

    def __init__(self, connection: Connection, dialect: Dialect) -> None:
        self._connection = connection
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        cursor: Cursor = self._connection.execute(self.dialect.sql(sql), tuple(params))
        return cursor

    def select_for_update(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        """A SELECT of rows this transaction then writes from what it read (a
        rotation keeps the secret it replaces): no other writer gets in between,
        or two rotations at once would both keep the same old secret and lose
        the first one's new secret. PostgreSQL locks the rows (FOR UPDATE)."""
        return self.execute(sql + self.dialect.for_update, params)


class _SqliteDb(KeyStoreDb):
    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__(connection, SQLITE)
        self._sqlite = connection

    def select_for_update(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        """SQLite has no row locks: the transaction takes the file's write lock
        before it reads (other writers wait, readers do not)."""
        if not self._sqlite.in_transaction:
            self._sqlite.execute("BEGIN IMMEDIATE")
        return self.execute(sql, params)


class KeyStoreBackend(Protocol):
    """Where a key store's rows live."""

    # What logs and messages may say of it: a path, or user@host:port/db.
    where: str

    def exists(self) -> bool:
        """Whether it may hold keys yet (a file not yet made holds none)."""
        ...

    def connect(self, *, create: bool = False) -> AbstractContextManager[KeyStoreDb]:
        """One transaction, committed on success; `create` makes a missing store."""
        ...

    def close(self) -> None:
        """Lets go of any connection kept for the next use."""
        ...


class SqliteBackend:
    """The embedded store: one SQLite file, mode 0600, opened for each transaction."""

    def __init__(self, path: Path, *, key_ttl_days: float, wall_clock: Callable[[], float]) -> None:
        self.path = path
        self.where = str(path)
        self._key_ttl_days = key_ttl_days
        self._wall_clock = wall_clock
        self._migrated = False

    def exists(self) -> bool:
        return self.path.exists()

    def close(self) -> None:
        pass  # nothing kept: a file is cheap to open

    @contextmanager
    def connect(self, *, create: bool = False) -> Iterator[KeyStoreDb]:
        """Without `create` the file must exist: the serving side never makes an
        empty store by accident."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=5)) as connection:
                if create:
                    for statement in schema(SQLITE):
                        connection.execute(statement)
                    os.chmod(self.path, 0o600)
                if not self._migrated:
                    _migrate(connection, key_ttl_days=self._key_ttl_days, now=self._wall_clock())
                    for statement in schema(SQLITE)[1:]:  # tables added beside api_keys
                        connection.execute(statement)
                    self._migrated = True
                with connection:  # one transaction, committed on success
                    yield _SqliteDb(connection)
        except sqlite3.OperationalError as err:
            raise KeyStoreUnavailableError(f"key store {self.where}: {err}") from err
        except sqlite3.Error as err:
            raise KeyStoreError(f"key store {self.where}: {err}") from err


# The columns added to api_keys since its first schema.
_ADDED_COLUMNS = (
    ("expires_at", "REAL"),
    ("previous_key_hash", "TEXT"),
    ("previous_valid_until", "REAL"),
    ("rotated_at", "REAL"),
)


def _migrate(db: sqlite3.Connection, *, key_ttl_days: float, now: float) -> None:
    """Brings an SQLite store made by an earlier version up to this schema (idempotent).

    Keys of a store without expiries get `created_at + key_ttl_days`, but at
    least EXPIRY_WARNING_DAYS from now: old keys come under the policy, and
    none expires before it has been reported as expiring for that long.
    """
    present = {str(row[1]) for row in db.execute("PRAGMA table_info(api_keys)")}
    missing = [(name, kind) for name, kind in _ADDED_COLUMNS if name not in present]
    if not present or not missing:
        return  # no api_keys table at all (nothing to migrate), or already current
    db.execute("BEGIN IMMEDIATE")  # one migrating process; others wait, then see it done
    try:
        present = {str(row[1]) for row in db.execute("PRAGMA table_info(api_keys)")}
        missing = [(name, kind) for name, kind in _ADDED_COLUMNS if name not in present]
        for name, kind in missing:
            db.execute(f"ALTER TABLE api_keys ADD COLUMN {name} {kind}")
        if ("expires_at", "REAL") in missing:
            floor = now + EXPIRY_WARNING_DAYS * DAY_S
            cursor = db.execute(
                "UPDATE api_keys SET expires_at = MAX(created_at + ?, ?)",
                (key_ttl_days * DAY_S, floor),
            )
            log.warning(
                "key store migrated: %d existing key(s) now expire %g days after their"
                " creation, at the earliest %d days from now; rotate them before then"
                " (`python -m server keys list` shows when)",
                cursor.rowcount,
                key_ttl_days,
                EXPIRY_WARNING_DAYS,
            )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def open_backend(
    location: Path | str, *, key_ttl_days: float, wall_clock: Callable[[], float]
) -> KeyStoreBackend:
    """The backend `auth.key_store` names: a postgresql:// URL, or an SQLite file."""
    if is_postgres(location):
        from server.auth.key_store_postgres import PostgresBackend

        return PostgresBackend(str(location))
    return SqliteBackend(Path(location), key_ttl_days=key_ttl_days, wall_clock=wall_clock)
