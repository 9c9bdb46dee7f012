"""`python -m server keys copy-store --to LOCATION`: a key store moved without new keys.

An SQLite store is copied to a real PostgreSQL database (and one back to a
file), and a gateway reading the copy serves the keys made before it: live
ones work, revoked ones stay refused, a rotated key's old secret keeps its
grace, and a stored provider key still decrypts (its envelope binds its
table, row and field, not the database). A second copy is refused; with
--merge, identical rows are skipped and different ones reported, never
overwritten. The command runs in process (run_keys_command), as
`python -m server keys` would run it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.auth.cli import run_keys_command
from server.auth.envelope import KekRing, load_ring
from server.auth.key_admin import create_key, rotate_key
from server.auth.keys import KeyRecord, KeyStore
from server.auth.provider_keys import ProviderKeyStore
from server.config import GatewayConfig
from server.identity import KeyLimits
from tests.conftest import request
from tests.postgres_fixtures import store_sql
from tests.test_auth import auth_config, bearer, expect_code
from tests.test_stored_provider_keys import ring_text

PROVIDER_SECRET = "sk-ant-test-" + "x" * 40
# One key-encryption key for the whole module: the source's and the target's readers share it.
RING = ring_text("kek-1")


def copy_store(
    config: GatewayConfig, to: str, capsys: pytest.CaptureFixture[str], *, merge: bool = False
) -> tuple[int, str]:
    """`keys copy-store --to TO [--merge]` with `config`: its exit status and stderr."""
    capsys.readouterr()
    args = argparse.Namespace(keys_command="copy-store", to=to, merge=merge)
    code = run_keys_command(args, config)
    out, err = capsys.readouterr()
    assert not out  # stdout carries keys only
    return code, err


def ring() -> KekRing:
    return load_ring(None, environ={"LLMGW_ENCRYPTION_KEYS": RING})


def with_password(dsn: str) -> str:
    """The DSN with a password in it (the test server trusts every local connection)."""
    return dsn.replace("postgresql://postgres@", "postgresql://postgres:hunter2-secret@", 1)


def records(location: Path | str) -> dict[str, KeyRecord]:
    store = KeyStore(location)
    try:
        return {record.id: record for record in store.list()}
    finally:
        store.close()


async def test_a_sqlite_store_copied_to_postgresql_serves_the_same_keys(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = auth_config(tmp_path)
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=10_000, budget_nanos=5 * 10**12)
    live = create_key(source.auth, name="live", models=["echo", "tiny*"], limits=limits)
    revoked = create_key(source.auth, name="revoked")
    assert KeyStore(source.auth.key_store).revoke(revoked[0].id)
    rotated_record, old_secret = create_key(source.auth, name="rotated")
    rotated_id = rotated_record.id
    in_grace = rotate_key(source.auth, rotated_id, grace_s=3600)
    assert in_grace is not None
    rotated = rotate_key(source.auth, live[0].id, grace_s=0)
    assert rotated is not None  # `live` rotated with no grace: only its new secret works
    live_secret = rotated[1]
    providers = ProviderKeyStore(KeyStore(source.auth.key_store), ring())
    providers.set("anthropic", PROVIDER_SECRET)

    target = with_password(postgres_dsn)
    code, said = copy_store(source, target, capsys)
    assert code == 0, said
    assert "copied 3 key(s) and 1 stored provider key(s)" in said
    assert "postgres@127.0.0.1" in said and "hunter2" not in said

    # Every field, the secrets' hashes and the rotation's grace included.
    copied, original = records(postgres_dsn), records(source.auth.key_store)
    assert copied == original and len(copied) == 3
    assert copied[rotated_id].previous_key_hash is not None
    assert copied[rotated_id].previous_valid_until == original[rotated_id].previous_valid_until
    assert copied[live[0].id].limits == limits
    assert store_sql(postgres_dsn, "SELECT name FROM provider_keys") == [("anthropic",)]
    # The envelope opens in its new database: it binds table, row and field only.
    assert ProviderKeyStore(KeyStore(postgres_dsn), ring()).get("anthropic") == PROVIDER_SECRET

    # A gateway reading the copy, with the same secret file and signing keys.
    served = auth_config(tmp_path, key_store=postgres_dsn)
    gateway = Gateway(served)
    port = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for secret in (live_secret, old_secret, in_grace[1]):  # old_secret: in its grace
                await stub.Generate(request(), metadata=bearer(secret), timeout=10)
            for secret in (revoked[1], live[1]):  # revoked; rotated out with no grace
                await expect_code(
                    grpc.StatusCode.UNAUTHENTICATED,
                    stub.Generate(request(), metadata=bearer(secret), timeout=10),
                )
    finally:
        await gateway.stop(grace=1)

    # Again: refused, naming the ids already there, and nothing written.
    code, said = copy_store(source, target, capsys)
    assert code == 2 and "already holds key id(s)" in said and live[0].id in said
    assert "provider key(s) anthropic" in said and "--merge" in said and "hunter2" not in said
    assert records(postgres_dsn) == original

    # --merge: the identical rows are skipped, a new key is copied.
    added = create_key(source.auth, name="added")
    code, said = copy_store(source, target, capsys, merge=True)
    assert code == 0, said
    assert "copied 1 key(s) and 0 stored provider key(s)" in said
    assert "identical, skipped: 3 key(s), 1 stored provider key(s)" in said
    assert records(postgres_dsn) == records(source.auth.key_store)

    # A row that differs (revoked in the source since) is a conflict, not overwritten.
    assert KeyStore(source.auth.key_store).revoke(added[0].id)
    providers.set("anthropic", PROVIDER_SECRET + "-new")
    code, said = copy_store(source, target, capsys, merge=True)
    assert code == 1, said
    assert f"key {added[0].id}" in said and "stored provider key anthropic" in said
    assert "identical, skipped: 3 key(s), 0 stored provider key(s)" in said
    assert not records(postgres_dsn)[added[0].id].revoked
    assert ProviderKeyStore(KeyStore(postgres_dsn), ring()).get("anthropic") == PROVIDER_SECRET


async def test_a_postgresql_store_copies_back_to_a_file(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = auth_config(tmp_path, key_store=postgres_dsn)
    made = create_key(source.auth, name="svc", scopes=["generate", "admin"])
    rotated = rotate_key(source.auth, made[0].id, grace_s=600)
    assert rotated is not None
    ProviderKeyStore(KeyStore(postgres_dsn), ring()).set("openai", PROVIDER_SECRET)

    file = tmp_path / "copy" / "keys.sqlite3"
    code, said = copy_store(source, str(file), capsys)
    assert code == 0, said
    assert "copied 1 key(s) and 1 stored provider key(s)" in said
    assert file.stat().st_mode & 0o077 == 0
    assert records(file) == records(postgres_dsn)
    assert ProviderKeyStore(KeyStore(file), ring()).get("openai") == PROVIDER_SECRET


async def test_copy_store_refuses_a_bad_target_and_a_missing_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = auth_config(tmp_path)
    code, said = copy_store(config, str(tmp_path / "copy.sqlite3"), capsys)
    assert code == 2 and "no key store at" in said and "nothing to copy" in said
    assert not (tmp_path / "copy.sqlite3").exists()

    create_key(config.auth, name="svc")
    code, said = copy_store(config, "mysql://gw:hunter2@db/keys", capsys)
    assert code == 2 and "not a mysql:// URL" in said and "hunter2" not in said
    store = Path(config.auth.key_store)
    for itself in (str(store), str(store.parent / ".." / store.parent.name / store.name)):
        code, said = copy_store(config, itself, capsys)
        assert code == 2 and "the configured key store itself" in said
    code, said = copy_store(config, "postgresql://gw:hunter2@127.0.0.1:1/keys", capsys)
    assert code == 2 and "gw@127.0.0.1:1/keys" in said and "hunter2" not in said
