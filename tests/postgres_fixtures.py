"""A real PostgreSQL server for the ledger and key store tests, started once per session.

`postgres_server` runs initdb into a temporary folder and `postgres` on a free
port on 127.0.0.1 (fsync off: the data is thrown away), and stops it at the end
of the session; `postgres_dsn` hands each test a fresh, empty database on it.
PostgreSQL refuses to run as root, so under root both run as `nobody`, which
owns the folder. The binaries come from Debian's `postgresql` package (`make
test` installs it, see the Makefile); without them the tests are skipped,
except in CI (CI=true), where they fail.

`key_store_location` runs a key store test on each backend (issue 21): a
fresh SQLite file, then a fresh PostgreSQL database; `store_sql` and
`store_text` reach past the KeyStore into either, as an attacker with a copy
of the store (or an operator with psql) would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from server.auth.key_store_backend import POSTGRES, is_postgres
from tests.redis_fixtures import free_port

_INITDB = ("-E", "UTF8", "--locale=C", "--no-sync")
# Throwaway data: durability off, for speed.
_SETTINGS = (
    *("-c", "listen_addresses=127.0.0.1"),
    *("-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"),
    *("-c", "max_connections=200"),
)


def postgres_bin_dir() -> Path:
    """The folder of Debian's newest installed PostgreSQL binaries (skips if none)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    message = "PostgreSQL is not installed (make test installs Debian's postgresql)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PostgresServer:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


def _as_server_user() -> dict[str, Any]:
    """Popen arguments that drop root to `nobody` (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    # Not under pytest's tmp_path: its folders are private to root, and the
    # server user must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="llmgw-postgres-"))
    data = folder / "data"
    user = _as_server_user()
    if user:
        os.chown(folder, user["user"], user["group"])
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(folder), "LC_ALL": "C"}
    log_path = folder / "server.log"
    try:
        subprocess.run(
            [*(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust"), *_INITDB],
            check=True,
            capture_output=True,
            env=env,
            cwd=folder,
            timeout=120,
            **user,
        )
        port = free_port()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    *(bin_dir / "postgres", "-D", data, "-p", str(port)),
                    *("-c", f"unix_socket_directories={folder}"),
                    *_SETTINGS,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=folder,
                **user,
            )
        server = PostgresServer(port, folder, process)
        try:
            _wait_until_serving(server, log_path)
            yield server
        finally:
            process.send_signal(2)  # SIGINT: fast shutdown
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_serving(server: PostgresServer, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if server.process.poll() is not None:
            raise AssertionError("postgres exited:\n" + log_path.read_text(errors="replace"))
        try:
            psycopg.connect(server.dsn(), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped after the test."""
    name = f"t_{os.urandom(6).hex()}"
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.dsn(name)
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(postgres_server.dsn(), autocommit=True) as conn,
    ):
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def key_store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """auth.key_store on each backend: an SQLite file not made yet, or an empty database."""
    if request.param == "sqlite":
        return tmp_path / "keys.sqlite3"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


def store_sql(location: Path | str, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
    """Runs one statement (`?` placeholders) on the store directly; its rows, if any."""
    if is_postgres(location):
        with psycopg.connect(str(location), autocommit=True) as conn:
            cursor = conn.execute(POSTGRES.sql(sql), params)
            return cursor.fetchall() if cursor.description else []
    with contextlib.closing(sqlite3.connect(location)) as db, db:
        return db.execute(sql, params).fetchall()


def store_text(location: Path | str) -> bytes:
    """Everything the store holds, as bytes to scan for what must not be there.

    An SQLite store's files as they are on disk (with its journal, if any);
    a PostgreSQL store's rows as text.
    """
    if not is_postgres(location):
        path = Path(location)
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    rows = [
        *store_sql(location, "SELECT * FROM api_keys"),
        *store_sql(location, "SELECT * FROM provider_keys"),
    ]
    return "\n".join(map(repr, rows)).encode()
