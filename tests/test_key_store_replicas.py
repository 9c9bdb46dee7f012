"""Replicas sharing one key store (issue 21, item 3): what one does, the other sees.

Two KeyStore objects over the same store stand for two gateway processes,
each with its own record cache and its own Authenticator. Run on both
backends: a PostgreSQL database is what replicas share in production, an
SQLite file is what processes on one host share. The cache clock is moved,
not slept through. Then what only PostgreSQL has: replicas creating the
schema together, and an unreachable server failing closed, never naming
its password.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.auth.authenticator import Authenticator
from server.auth.key_store_backend import KeyStoreUnavailableError
from server.auth.keys import KeyHasher, KeyStore, SecretFile, ensure_secret
from server.auth.tokens import SigningKeyRing, TokenVerifier, create_signing_key
from server.config import ConfigError, load_config
from server.errors import UnauthenticatedError
from tests.test_auth import bearer
from tests.test_key_lifecycle import keys_cli

CACHE_TTL_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    store: KeyStore
    authenticator: Authenticator

    async def accepts(self, key: str) -> bool:
        try:
            await self.authenticator.authenticate(bearer(key))
        except UnauthenticatedError:
            return False
        return True


@pytest.fixture
def cache_clock() -> Clock:
    return Clock()


@pytest.fixture
def replicas(
    key_store_location: Path | str, tmp_path: Path, cache_clock: Clock
) -> Iterator[tuple[Replica, Replica, KeyHasher]]:
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    create_signing_key(tmp_path / "signing")
    ring = SigningKeyRing(tmp_path / "signing")
    ring.load()
    verifier = TokenVerifier(ring, issuer="gw", audience="gw", leeway=0)

    def replica() -> Replica:
        store = KeyStore(key_store_location, cache_ttl=CACHE_TTL_S, clock=cache_clock)
        return Replica(store, Authenticator(store, SecretFile(tmp_path / "secret"), verifier))

    one, two = replica(), replica()
    yield one, two, hasher
    one.store.close()
    two.store.close()


async def test_a_key_made_by_one_replica_is_served_and_revoked_by_the_other(
    replicas: tuple[Replica, Replica, KeyHasher], cache_clock: Clock
) -> None:
    one, two, hasher = replicas
    record, key = one.store.create(hasher, name="shared", scopes=["generate"])
    assert await two.accepts(key)  # two never saw it made: it reads the store
    assert await one.accepts(key)

    assert two.store.revoke(record.id)
    assert not await two.accepts(key)  # the revoking replica at once
    cache_clock.now += CACHE_TTL_S - 0.1
    assert await one.accepts(key)  # the other within its cache TTL...
    cache_clock.now += 0.2
    assert not await one.accepts(key)  # ...and not after it


async def test_a_rotation_and_an_update_by_one_replica_reach_the_other(
    replicas: tuple[Replica, Replica, KeyHasher], cache_clock: Clock
) -> None:
    one, two, hasher = replicas
    record, old = one.store.create(hasher, name="rotating", scopes=["generate"], models=["a"])
    assert await two.accepts(old)
    rotated = one.store.rotate(hasher, record.id, grace_s=0)
    assert rotated is not None
    new = rotated[1]
    cache_clock.now += CACHE_TTL_S + 0.1
    assert await two.accepts(new)
    assert not await two.accepts(old)

    assert one.store.update(record.id, models=["b"]) is not None
    cache_clock.now += CACHE_TTL_S + 0.1
    seen = await two.store.get(record.id)
    assert seen is not None and seen.models == ("b",) and seen.key_hash == rotated[0].key_hash


class PausingHasher(KeyHasher):
    """Holds each rotation, between its read and its write, until a second one
    has read too (or for a second): without the store's lock both would read
    the same old secret."""

    def __init__(self, secret: bytes, barrier: threading.Barrier) -> None:
        super().__init__(secret)
        self._barrier = barrier

    def hash(self, key: str) -> str:
        with contextlib.suppress(threading.BrokenBarrierError):
            self._barrier.wait(timeout=1)
        return super().hash(key)


def test_two_rotations_at_once_take_effect_one_after_the_other(
    key_store_location: Path | str, tmp_path: Path
) -> None:
    secret = ensure_secret(tmp_path / "secret")
    plain = KeyHasher(secret)
    record, _ = KeyStore(key_store_location).create(plain, name="raced", scopes=["generate"])
    hasher = PausingHasher(secret, threading.Barrier(2))
    keys: list[str] = []

    def rotate() -> None:  # each on its own replica
        store = KeyStore(key_store_location)
        try:
            rotated = store.rotate(hasher, record.id, grace_s=3600)
            assert rotated is not None
            keys.append(rotated[1])
        finally:
            store.close()

    threads = [threading.Thread(target=rotate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(keys) == 2
    final = KeyStore(key_store_location).lookup(record.id)
    assert final is not None
    # The later rotation's secret is current and the earlier one's in its grace:
    # both keys handed out work (neither rotation read what the other replaced).
    assert {final.key_hash, final.previous_key_hash} == {plain.hash(key) for key in keys}


def test_replicas_starting_together_create_the_schema_once(postgres_dsn: str) -> None:
    failures: list[BaseException] = []

    def start() -> None:
        store = KeyStore(postgres_dsn)
        try:
            assert store.list() == []
        except BaseException as err:
            failures.append(err)
        finally:
            store.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert KeyStore(postgres_dsn).lookup("abcdefabcdef") is None  # and once more, made


async def test_an_unreachable_database_refuses_keys_and_never_shows_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    dsn = "postgresql://gateway:hunter2-secret@127.0.0.1:1/keys"  # nothing listens on port 1
    store = KeyStore(dsn, cache_ttl=0)
    assert store.where == "gateway@127.0.0.1:1/keys"
    assert await store.get("abcdefabcdef") is None  # fails closed
    with pytest.raises(KeyStoreUnavailableError) as caught:
        store.list()
    assert "gateway@127.0.0.1:1/keys" in str(caught.value)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot read the API key store" in w for w in warnings)
    assert "hunter2" not in str(caught.value) and "hunter2" not in caplog.text


def _out_of_reach(store: KeyStore, location: Path | str, tmp_path: Path) -> KeyStore:
    """The store, made unreachable: a file there that is no database, or a dead server."""
    if isinstance(location, Path):
        location.rename(tmp_path / "elsewhere")
        location.mkdir()
        return store
    return KeyStore("postgresql://gateway@127.0.0.1:1/keys", cache_ttl=0)


async def test_lookup_tells_an_unreachable_store_from_an_unknown_key(
    key_store_location: Path | str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`lookup` says None only when the store was asked; an unreachable store
    raises, and the serving path (`get`) refuses the key with one warning."""
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    store = KeyStore(key_store_location, cache_ttl=0)
    record, _ = store.create(hasher, name="svc", scopes=["generate"])
    assert store.lookup("abcdefabcdef") is None  # asked: no such key
    assert store.lookup(record.id) == record
    caplog.set_level(logging.WARNING, logger="server.auth.keys")
    unreachable = _out_of_reach(store, key_store_location, tmp_path)
    with pytest.raises(KeyStoreUnavailableError):
        unreachable.lookup(record.id)
    for _ in range(3):
        assert await unreachable.get(record.id) is None  # refused like an unknown key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot read the API key store" in warnings[0], warnings


def test_auth_key_store_is_a_file_or_a_postgresql_url() -> None:
    dsn = "postgresql://gateway:hunter2-secret@db.internal:5432/keys"
    assert load_config(environ={}, overrides={"auth.key_store": dsn}).auth.key_store == dsn
    home = load_config(environ={}, overrides={"auth.key_store": "~/keys.sqlite3"})
    assert home.auth.key_store == Path.home() / "keys.sqlite3"
    with pytest.raises(ConfigError, match=r"auth\.key_store: .*not a mysql:// URL") as caught:
        load_config(environ={}, overrides={"auth.key_store": "mysql://gw:hunter2@db/keys"})
    assert "hunter2" not in str(caught.value)


async def test_the_command_line_names_an_unreachable_store_without_its_password() -> None:
    env = {"LLMGW_AUTH__KEY_STORE": "postgresql://gateway:hunter2-secret@127.0.0.1:1/keys"}
    for args in (("list",), ("revoke", "abcdefabcdef"), ("provider", "list")):
        code, out, err = await keys_cli(None, *args, env=env)
        assert code == 2 and not out, args
        assert "gateway@127.0.0.1:1/keys" in err and "hunter2" not in err, args
        assert "Traceback" not in err
