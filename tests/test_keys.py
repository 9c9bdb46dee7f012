"""API keys: format, keyed hashing, the store and `python -m server keys`.

The store's tests, and the command line's with a gateway serving what it
made, run on both backends (SQLite and PostgreSQL: `key_store_location`).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import grpc
import pytest

from server.auth.key_store_backend import KeyStoreUnavailableError
from server.auth.keys import (
    KeyHasher,
    KeyStore,
    SecretFile,
    SecretUnavailableError,
    ensure_secret,
    key_id_of,
    new_api_key,
)
from tests.conftest import REPO_ROOT, request, start_server_process
from tests.postgres_fixtures import store_text
from tests.test_auth import bearer, expect_code


def test_key_format_has_a_prefix_an_id_and_at_least_128_random_bits() -> None:
    key_id, key = new_api_key()
    assert re.fullmatch(r"llmgw_[0-9a-f]{12}_[0-9a-f]{48}", key)
    assert key_id_of(key) == key_id
    assert new_api_key()[1] != key
    assert key_id_of("llmgw_" + key_id) is None
    assert key_id_of(key + "0") is None


def test_hash_is_keyed_and_compared_in_constant_time(tmp_path: Path) -> None:
    _, key = new_api_key()
    one = KeyHasher(ensure_secret(tmp_path / "one"))
    two = KeyHasher(ensure_secret(tmp_path / "two"))
    assert one.hash(key) != two.hash(key)  # a store alone does not let guesses be tested
    assert one.matches(key, one.hash(key))
    assert not one.matches(key + "x", one.hash(key))
    assert (tmp_path / "one").stat().st_mode & 0o077 == 0
    assert ensure_secret(tmp_path / "one") == ensure_secret(tmp_path / "one")  # kept, not remade


def test_short_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("short")
    with pytest.raises(SecretUnavailableError):
        asyncio.run(SecretFile(tmp_path / "secret").hasher())


def test_store_keeps_no_key(tmp_path: Path, key_store_location: Path | str) -> None:
    store = KeyStore(key_store_location)
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    record, key = store.create(hasher, name="n", scopes=["generate"], models=["echo"])
    dump = store_text(key_store_location)
    assert record.key_hash.encode() in dump  # what is stored is scanned
    assert key.encode() not in dump and key.split("_")[2].encode() not in dump
    assert "llmgw_" not in repr(record) and record.key_hash not in repr(record)
    assert store.lookup(record.id) == record
    if isinstance(key_store_location, Path):
        assert key_store_location.stat().st_mode & 0o077 == 0


async def test_serving_side_never_creates_a_store(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "none" / "keys.sqlite3")
    assert await store.get("abcdefabcdef") is None  # refused, and no outage logged
    with pytest.raises(KeyStoreUnavailableError):  # not "no such key": nothing was asked
        store.lookup("abcdefabcdef")
    assert store.list() == []
    assert not (tmp_path / "none").exists()


async def test_store_cache_serves_lookups_for_its_ttl(
    tmp_path: Path, key_store_location: Path | str
) -> None:
    now = [0.0]
    store = KeyStore(key_store_location, cache_ttl=5, clock=lambda: now[0])
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    record, _ = store.create(hasher, name="n", scopes=["generate"])
    assert await store.get(record.id) == record
    KeyStore(key_store_location).revoke(record.id)  # another process
    now[0] = 4.9
    cached = await store.get(record.id)
    assert cached is not None and not cached.revoked
    now[0] = 5.1
    refreshed = await store.get(record.id)
    assert refreshed is not None and refreshed.revoked


async def _keys(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "keys",
        *args,
        cwd=REPO_ROOT,
        env={**env, "PATH": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def auth_env(tmp_path: Path, key_store_location: Path | str) -> dict[str, str]:
    """The command line's and the gateway's configuration, on each key store backend."""
    return {
        "LLMGW_AUTH__KEY_STORE": str(key_store_location),
        "LLMGW_AUTH__SECRET_FILE": str(tmp_path / "key-secret"),
        "LLMGW_AUTH__SIGNING_KEYS_DIR": str(tmp_path / "signing-keys"),
    }


async def test_cli_create_list_revoke_and_serve(auth_env: dict[str, str]) -> None:
    code, out, err = await _keys(
        auth_env, "create", "--name", "billing", "--models", "echo", "tiny*", "--rpm", "60"
    )
    assert code == 0, err
    key = out.strip()
    key_id = key_id_of(key)
    assert key_id is not None and out.count("llmgw_") == 1  # the key, once, alone on stdout
    assert key_id in err and key not in err

    code, listed, err = await _keys(auth_env, "list", "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in listed.splitlines()]
    assert row["id"] == key_id and row["name"] == "billing"
    assert row["models"] == ["echo", "tiny*"] and row["scopes"] == ["generate"]
    assert row["requests_per_minute"] == 60 and row["revoked"] is None
    code, table, _ = await _keys(auth_env, "list")
    store = KeyStore(auth_env["LLMGW_AUTH__KEY_STORE"])
    (record,) = store.list()
    for shown in (listed, table):
        assert "llmgw_" not in shown and key.split("_")[2] not in shown
        assert record.key_hash not in shown

    # The gateway serves the key just made (and checks it against the same files).
    server = await start_server_process(env={**auth_env, "LLMGW_AUTH__ENABLED": "true"})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from llmgateway.v1 import generation_pb2_grpc as pb_grpc

            stub = pb_grpc.GenerationServiceStub(channel)
            await stub.Generate(request(), metadata=bearer(key), timeout=10)
            code, _, err = await _keys(auth_env, "revoke", key_id)
            assert code == 0, err
            await asyncio.sleep(5.5)  # the gateway's cache TTL (auth.cache_ttl_s)
            await expect_code(
                grpc.StatusCode.UNAUTHENTICATED,
                stub.Generate(request(), metadata=bearer(key), timeout=10),
            )
    finally:
        server.process.terminate()
        await server.process.wait()
        assert server.process.stderr is not None
        log = "".join(server.log) + (await server.process.stderr.read()).decode()
    assert key not in log and key.split("_")[2] not in log and record.key_hash not in log

    code, listed, _ = await _keys(auth_env, "list", "--json")
    assert json.loads(listed)["revoked"] is not None
    code, _, err = await _keys(auth_env, "revoke", key_id)
    assert code == 2 and "no active key" in err


async def test_cli_refuses_unknown_scopes(auth_env: dict[str, str]) -> None:
    code, out, err = await _keys(auth_env, "create", "--name", "x", "--scopes", "root")
    assert code == 2 and "--scopes" in err and not out
