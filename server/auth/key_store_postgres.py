"""The key store in PostgreSQL (`auth.key_store: postgresql://...`): keys replicas share.

Several gateways, and `python -m server keys ...` on any host, read and
write the same rows: a key created, rotated or revoked through one is seen
by every other within `auth.cache_ttl_s` (keys.py caches records that long).

Sync psycopg, called through `asyncio.to_thread` on the serving path as the
SQLite backend is: the command line is synchronous, so one sync code path
serves both, and each statement is written once for both backends. The
serving path reaches the database only on a cache miss (once per key per
cache TTL), where a thread hop costs nothing next to the round trip. A few
connections are kept between uses, so a cache miss does not pay for a new
backend process on the server; a connection that failed is dropped. Every
statement is bounded by `statement_timeout`, so a stuck server fails the
lookup (the credential is refused) instead of holding a thread for ever.

The schema is created on first use, idempotently, under an advisory lock
so that replicas starting together do not race. Errors and logs name the
database as user@host:port/db, never its password.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.pq import TransactionStatus

from server.auth.key_store_backend import (
    POSTGRES,
    KeyStoreDb,
    KeyStoreError,
    KeyStoreUnavailableError,
    schema,
)
from server.postgres_dsn import Dsn

# An arbitrary constant of its own (the ledger's is 0x6C6C6D67_7700).
_SCHEMA_LOCK = 0x6C6C6D67_6B73
_KEPT_CONNECTIONS = 4
_TIMEOUT_S = 5


class PostgresBackend:
    """Key store rows in a PostgreSQL database; a few connections kept for reuse."""

    def __init__(self, dsn: str, *, timeout_s: int = _TIMEOUT_S) -> None:
        self._dsn = Dsn(dsn)
        self.where = self._dsn.where
        self._timeout_s = timeout_s
        self._idle: list[psycopg.Connection[tuple[object, ...]]] = []
        self._lock = threading.Lock()
        self._schema_ready = False

    def exists(self) -> bool:
        return True  # the database is there to be asked; the schema is made on first use

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _said(self, err: BaseException) -> str:
        return f"key store {self.where}: {self._dsn.scrubbed(err)}"

    def _take(self) -> psycopg.Connection[tuple[object, ...]]:
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection
        connection = psycopg.connect(
            self._dsn.text,
            autocommit=True,  # transactions are explicit: connection.transaction()
            connect_timeout=self._timeout_s,
            options=f"-c statement_timeout={self._timeout_s * 1000}",
        )
        if not self._schema_ready:
            try:
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in schema(POSTGRES):
                        connection.execute(statement)
            except BaseException:
                connection.close()
                raise
            self._schema_ready = True
        return connection

    def _give_back(self, connection: psycopg.Connection[tuple[object, ...]]) -> None:
        healthy = not connection.closed and (
            connection.info.transaction_status == TransactionStatus.IDLE
        )
        if healthy:
            with self._lock:
                if len(self._idle) < _KEPT_CONNECTIONS:
                    self._idle.append(connection)
                    return
        connection.close()

    @contextmanager
    def connect(self, *, create: bool = False) -> Iterator[KeyStoreDb]:
        """One transaction, committed on success; `create` changes nothing here
        (the tables are made on first use)."""
        try:
            connection = self._take()
        except psycopg.Error as err:
            raise KeyStoreUnavailableError(self._said(err)) from None
        try:
            with connection.transaction():
                yield KeyStoreDb(connection, POSTGRES)
        except psycopg.OperationalError as err:
            connection.close()  # possibly broken: not kept
            raise KeyStoreUnavailableError(self._said(err)) from None
        except psycopg.Error as err:
            raise KeyStoreError(self._said(err)) from None
        finally:
            self._give_back(connection)
