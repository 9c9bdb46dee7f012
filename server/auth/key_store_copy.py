"""`python -m server keys copy-store --to LOCATION`: a key store's rows copied to another.

Moves an SQLite store to PostgreSQL (or a PostgreSQL store to a file) without
issuing a single new key: every `api_keys` row (id, name, scopes, models,
limits and budget, created, expiry, revocation and rotation times, the
current secret's hash and, during a grace, the previous one's) and every
`provider_keys` row (its envelope as it is, with its dates) is written to the
target in one transaction. Nothing is decrypted, re-hashed or re-sealed: a
key's hash is an HMAC under `auth.secret_file`, and an envelope's associated
data names its table, row and field (envelope.SecretPlace), never the
database; both stay valid wherever the rows live, for gateways that read the
target with the same secret file, signing keys and key-encryption keys.

A target that already holds one of the source's key ids or provider key
names is refused, and nothing is written; with `merge`, rows identical to the
source's are skipped, and different ones are reported as conflicts and left
as they are (never overwritten).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.auth.key_store_backend import KeyStoreDb, SqliteBackend, is_postgres
from server.auth.keys import API_KEY_COLUMNS, KeyStore
from server.telemetry.audit import KEY_STORE_COPIED, audit_event


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    columns: str  # the first one is the primary key


_API_KEYS = _Table("api_keys", API_KEY_COLUMNS)
_PROVIDER_KEYS = _Table("provider_keys", "name, envelope, created_at, updated_at")
_TABLES = (_API_KEYS, _PROVIDER_KEYS)


class CopyRefusedError(Exception):
    """The copy was refused before anything was written; the message says why."""


@dataclass(frozen=True, slots=True)
class TableCopy:
    """What happened to one table's rows."""

    copied: int = 0
    # Already in the target with the same values (merge): left as they are.
    identical: int = 0
    # Already in the target with other values (merge): left as they are. Ids or names.
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CopyReport:
    keys: TableCopy
    provider_keys: TableCopy

    @property
    def conflicts(self) -> bool:
        return bool(self.keys.conflicts or self.provider_keys.conflicts)


def copy_target(text: str) -> Path | str:
    """`--to` as `auth.key_store` takes it: a postgresql:// URL, or a file path.

    A URL of another scheme is refused (its scheme only is named: a URL may
    hold a password).
    """
    if is_postgres(text):
        return text
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise CopyRefusedError(
            f"--to: a key store is a file path or a postgresql:// URL, not a {scheme}:// URL"
        )
    return Path(text).expanduser()


def _same_store(source: KeyStore, target: KeyStore) -> bool:
    """Whether both name one store: the same file, or the same user@host:port/db."""
    one, other = source.backend, target.backend
    if isinstance(one, SqliteBackend) and isinstance(other, SqliteBackend):
        return one.path.resolve() == other.path.resolve()
    return source.where == target.where


def copy_store(source: KeyStore, target: KeyStore, *, merge: bool = False) -> CopyReport:
    """Copies every key and stored provider key from `source` to `target`.

    One transaction on the target: all of it is written, or (a refusal, a
    failure) none. Raises CopyRefusedError when the target holds some of
    the rows and `merge` is not set, or is the source itself; KeyStoreError
    when either store fails (the message names it, never a password).
    """
    if _same_store(source, target):
        raise CopyRefusedError(f"--to names the configured key store itself ({source.where})")
    if not source.exists():
        raise CopyRefusedError(f"there is no key store at {source.where}: nothing to copy")
    with source.connect() as db:
        rows = {table: _rows(db, table) for table in _TABLES}
    with target.connect(create=True) as db:
        # Locked (FOR UPDATE; SQLite's write lock) until the copy commits.
        present = {table: _rows(db, table, lock=True) for table in _TABLES}
        if not merge:
            _refuse_overlap(rows, present, target.where)
        report = CopyReport(*(_write(db, table, rows[table], present[table]) for table in _TABLES))
    audit_event(
        KEY_STORE_COPIED,
        source=source.where,
        target=target.where,
        merge=merge,
        keys_copied=report.keys.copied,
        keys_identical=report.keys.identical,
        key_conflicts=report.keys.conflicts,
        provider_keys_copied=report.provider_keys.copied,
        provider_keys_identical=report.provider_keys.identical,
        provider_key_conflicts=report.provider_keys.conflicts,
    )
    return report


def _rows(db: KeyStoreDb, table: _Table, *, lock: bool = False) -> dict[str, tuple[object, ...]]:
    """A table's rows by primary key, as the driver returns them: the same
    Python types from both backends (str, int, float, None)."""
    sql = f"SELECT {table.columns} FROM {table.name} ORDER BY {table.columns.split(',')[0]}"
    cursor = db.select_for_update(sql) if lock else db.execute(sql)
    return {str(row[0]): tuple(row) for row in cursor.fetchall()}


def _refuse_overlap(
    rows: dict[_Table, dict[str, tuple[object, ...]]],
    present: dict[_Table, dict[str, tuple[object, ...]]],
    where: str,
) -> None:
    held = {table: sorted(rows[table].keys() & present[table].keys()) for table in _TABLES}
    if not any(held.values()):
        return
    parts = []
    if held[_API_KEYS]:
        parts.append(f"key id(s) {', '.join(held[_API_KEYS])}")
    if held[_PROVIDER_KEYS]:
        parts.append(f"provider key(s) {', '.join(held[_PROVIDER_KEYS])}")
    raise CopyRefusedError(
        f"{where} already holds {' and '.join(parts)}; nothing was copied. Use --merge to"
        " copy the others, skipping identical rows and reporting different ones"
    )


def _write(
    db: KeyStoreDb,
    table: _Table,
    rows: dict[str, tuple[object, ...]],
    present: dict[str, tuple[object, ...]],
) -> TableCopy:
    copied = identical = 0
    conflicts: list[str] = []
    width = len(table.columns.split(","))
    # A plain INSERT: should a row with the same key appear meanwhile, the
    # whole copy fails rather than overwrite it.
    insert = f"INSERT INTO {table.name} ({table.columns}) VALUES ({', '.join('?' * width)})"
    for key, row in rows.items():
        there = present.get(key)
        if there is None:
            db.execute(insert, row)
            copied += 1
        elif there == row:
            identical += 1
        else:
            conflicts.append(key)
    return TableCopy(copied, identical, conflicts)
