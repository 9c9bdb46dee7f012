"""Gateway keys expire and rotate (issue 21, item 1).

An expired key, and the tokens issued from it, are refused like an unknown
key on both edges; a rotated key's old secret (and the tokens issued before
the rotation) work through the grace period and not after it, with the
clock moved rather than slept through; keys close to their expiry are
reported once a day, counted for the metric and shown by `keys list`; a
store from before expiries existed is migrated with its keys still working.
All but the migration (SQLite stores only: a PostgreSQL store is born with
expiries) run on both key store backends.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx2
import pytest

from server.auth.authenticator import Authenticator
from server.auth.expiry import ExpiryWatch
from server.auth.keys import DAY_S, KeyHasher, KeyStore, SecretFile, ensure_secret
from server.auth.tokens import SigningKeyRing, TokenIssuer, TokenVerifier, create_signing_key
from server.config import AuditConfig
from server.errors import UnauthenticatedError
from server.identity import Identity
from server.telemetry.audit import close_audit, configure_audit
from tests.conftest import REPO_ROOT, request
from tests.postgres_fixtures import store_sql
from tests.test_auth import AuthedGateway, bearer, expect_code, start_authed_gateway

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def authed(tmp_path: Path, key_store_location: Path | str) -> AsyncIterator[AuthedGateway]:
    # cache_ttl_s 0: each call reads the key's record, so a change is seen at once.
    running = await start_authed_gateway(tmp_path, cache_ttl_s=0, key_store=key_store_location)
    yield running
    await running.close()


def set_expiry(store: Path | str, key_id: str, expires_at: float) -> None:
    store_sql(store, "UPDATE api_keys SET expires_at = ? WHERE id = ?", (expires_at, key_id))


async def http_status(authed: AuthedGateway, credential: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{authed.gateway.http_port}/v1/messages"
    body = {"model": "echo", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.post(url, json=body, headers={"x-api-key": credential})
    message = response.json()["error"]["message"] if response.status_code != 200 else ""
    return response.status_code, message


async def test_a_key_that_expired_a_second_ago_is_refused_and_so_are_its_tokens(
    authed: AuthedGateway,
) -> None:
    key_id, key = authed.create_key("expiring")
    token = (await authed.issue(key)).token
    await authed.stub.Generate(request("hi"), metadata=bearer(key), timeout=10)
    await authed.stub.Generate(request("hi"), metadata=bearer(token), timeout=10)
    assert (await http_status(authed, key))[0] == 200

    set_expiry(authed.config.auth.key_store, key_id, time.time() - 1)
    unknown = await expect_code(
        UNAUTHENTICATED,
        authed.stub.Generate(request("hi"), metadata=bearer("llmgw_0123456789ab_" + "0" * 48)),
    )
    for credential in (key, token):
        refused = await expect_code(
            UNAUTHENTICATED, authed.stub.Generate(request("hi"), metadata=bearer(credential))
        )
        assert refused.details() == unknown.details()  # nothing tells it expired
    # No new token either, and the HTTP front door answers as for any bad key.
    await expect_code(UNAUTHENTICATED, authed.issue(key))
    expired_http = await http_status(authed, key)
    assert expired_http == await http_status(authed, "llmgw_0123456789ab_" + "0" * 48)
    assert expired_http[0] == 401


async def test_a_token_never_outlives_its_key(authed: AuthedGateway) -> None:
    key_id, key = authed.create_key("short-lived")
    set_expiry(authed.config.auth.key_store, key_id, time.time() + 60)
    issued = await authed.issue(key)  # asks the default 900 s
    assert issued.expire_time.seconds <= time.time() + 61


async def test_rotation_through_the_gateway_with_no_grace(authed: AuthedGateway) -> None:
    key_id, old = authed.create_key("rotated")
    old_token = (await authed.issue(old)).token
    await asyncio.sleep(1.1)  # tokens carry whole seconds: one from before the rotation's
    code, new, err = await keys_cli(authed, "rotate", key_id, "--grace", "0")
    assert code == 0, err
    assert new.strip().startswith(f"llmgw_{key_id}_") and new.strip() != old
    assert "no longer works" in err and new.strip() not in err
    for credential in (old, old_token):
        await expect_code(
            UNAUTHENTICATED, authed.stub.Generate(request("hi"), metadata=bearer(credential))
        )
    await authed.stub.Generate(request("hi"), metadata=bearer(new.strip()), timeout=10)
    new_token = (await authed.issue(new.strip())).token
    await authed.stub.Generate(request("hi"), metadata=bearer(new_token), timeout=10)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts(
    tmp_path: Path, key_store_location: Path | str
) -> tuple[KeyStore, Authenticator, TokenIssuer, KeyHasher, Clock]:
    clock = Clock()
    store = KeyStore(key_store_location, cache_ttl=0, wall_clock=clock)
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    create_signing_key(tmp_path / "signing")
    ring = SigningKeyRing(tmp_path / "signing")
    ring.load()
    verifier = TokenVerifier(ring, issuer="gw", audience="gw", leeway=0)
    issuer = TokenIssuer(
        ring, issuer="gw", audience="gw", ttl=900, clock=clock, key_valid_until=store.valid_until
    )
    authenticator = Authenticator(store, SecretFile(tmp_path / "secret"), verifier, clock=clock)
    return store, authenticator, issuer, hasher, clock


async def accepted(authenticator: Authenticator, credential: str) -> bool:
    try:
        await authenticator.authenticate(bearer(credential))
    except UnauthenticatedError:
        return False
    return True


async def test_rotation_keeps_the_old_secret_for_the_grace_only(
    parts: tuple[KeyStore, Authenticator, TokenIssuer, KeyHasher, Clock],
) -> None:
    store, authenticator, issuer, hasher, clock = parts
    record, old = store.create(hasher, name="svc", scopes=["generate"])
    identity = Identity(key_id=record.id, scopes=record.scopes)
    old_token = (await issuer.issue(identity)).token
    clock.now += 5
    rotated = store.rotate(hasher, record.id, grace_s=3600)
    assert rotated is not None
    after, new = rotated
    assert after.id == record.id and after.scopes == record.scopes
    assert after.limits == record.limits and after.created_at == record.created_at
    assert after.expires_at is not None and after.expires_at > clock.now + 89 * DAY_S

    clock.now += 3599  # inside the grace: both secrets, and the token issued before
    for credential in (old, new, old_token):
        assert await accepted(authenticator, credential), credential
    in_grace_token = await issuer.issue(identity)  # bounded by the grace it is issued in
    assert in_grace_token.expires_at <= clock.now + 1

    clock.now += 2  # the grace is over: only the new secret
    assert not await accepted(authenticator, old)
    assert not await accepted(authenticator, old_token)
    assert await accepted(authenticator, new)


async def test_a_token_names_its_secret_so_a_rotation_ends_it_however_late_it_was_issued(
    parts: tuple[KeyStore, Authenticator, TokenIssuer, KeyHasher, Clock],
) -> None:
    # A process that still holds the key's record from before the rotation
    # (auth.cache_ttl_s) accepts the old secret and issues a token after the
    # rotation's second: its issue time says nothing, the secret it names does.
    store, authenticator, issuer, hasher, _ = parts
    record, old = store.create(hasher, name="svc", scopes=["generate"])
    stale = await authenticator.authenticate(bearer(old))
    rotated = store.rotate(hasher, record.id, grace_s=0)
    assert rotated is not None
    new = rotated[1]
    # Issued in the rotation's own second (the verifier checks iat against the
    # real clock, so the test's clock stays put): its time cannot tell.
    late_token = (await issuer.issue(stale)).token
    assert not await accepted(authenticator, late_token)
    fresh = await authenticator.authenticate(bearer(new))
    assert fresh.secret and fresh.secret != stale.secret
    assert await accepted(authenticator, (await issuer.issue(fresh)).token)


async def test_a_token_for_the_old_secret_lives_through_the_grace_and_not_after(
    parts: tuple[KeyStore, Authenticator, TokenIssuer, KeyHasher, Clock],
) -> None:
    store, authenticator, issuer, hasher, clock = parts
    record, old = store.create(hasher, name="svc", scopes=["generate"])
    token = (await issuer.issue(await authenticator.authenticate(bearer(old)))).token
    assert store.rotate(hasher, record.id, grace_s=60) is not None
    clock.now += 59
    assert await accepted(authenticator, token)
    clock.now += 2
    assert not await accepted(authenticator, token)


async def test_an_expired_key_and_its_token_are_refused_by_the_clock(
    parts: tuple[KeyStore, Authenticator, TokenIssuer, KeyHasher, Clock],
) -> None:
    store, authenticator, issuer, hasher, clock = parts
    record, key = store.create(hasher, name="svc", scopes=["generate"], expires_in_s=60)
    token = (await issuer.issue(Identity(key_id=record.id, scopes=record.scopes))).token
    assert await accepted(authenticator, key) and await accepted(authenticator, token)
    clock.now += 61
    assert not await accepted(authenticator, key)
    assert not await accepted(authenticator, token)


async def test_expiring_keys_are_warned_of_once_a_day_audited_and_counted(
    tmp_path: Path, key_store_location: Path | str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llmgw.keys")
    store = KeyStore(key_store_location)
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    soon, _ = store.create(hasher, name="soon", scopes=["generate"], expires_in_s=3 * DAY_S)
    store.create(hasher, name="later", scopes=["generate"])
    audit = tmp_path / "audit.jsonl"
    sink = configure_audit(AuditConfig(path=audit))
    monotonic = [0.0]
    watch = ExpiryWatch(store, monotonic=lambda: monotonic[0])
    try:
        for _ in range(50):  # as if on every authenticated call
            watch.check_if_due()
            await asyncio.sleep(0)
        await asyncio.sleep(0.3)
        monotonic[0] += 3600
        for _ in range(50):
            watch.check_if_due()
        await asyncio.sleep(0.3)
        warnings = [r for r in caplog.records if r.name == "llmgw.keys"]
        assert len(warnings) == 1
        assert warnings[0].key_id == soon.id
        assert 2.9 < warnings[0].days_left <= 3.0
        monotonic[0] += DAY_S  # a day later: once more
        watch.check_if_due()
        await asyncio.sleep(0.3)
        assert len([r for r in caplog.records if r.name == "llmgw.keys"]) == 2
    finally:
        close_audit(sink)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    expiring = [e for e in events if e["event"] == "key.expiring"]
    assert [e["key_id"] for e in expiring] == [soon.id, soon.id]
    counts = watch.counts()
    assert counts["lt_7"] == 1 and counts["lt_90"] == 1 and counts["expired"] == 0


async def keys_cli(
    authed: AuthedGateway | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    if env is None:
        assert authed is not None
        auth = authed.config.auth
        env = {
            "LLMGW_AUTH__KEY_STORE": str(auth.key_store),
            "LLMGW_AUTH__SECRET_FILE": str(auth.secret_file),
            "LLMGW_AUTH__SIGNING_KEYS_DIR": str(auth.signing_keys_dir),
        }
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


async def test_keys_list_shows_expiry_and_never_needs_the_config(
    tmp_path: Path, key_store_location: Path | str
) -> None:
    env = {
        "LLMGW_AUTH__KEY_STORE": str(key_store_location),
        "LLMGW_AUTH__SECRET_FILE": str(tmp_path / "key-secret"),
        "LLMGW_AUTH__SIGNING_KEYS_DIR": str(tmp_path / "signing-keys"),
    }
    code, _, err = await keys_cli(None, "create", "--name", "soon", "--expires-in", "3d", env=env)
    assert code == 0, err
    code, _, err = await keys_cli(None, "create", "--name", "default", env=env)
    assert code == 0, err
    code, _, err = await keys_cli(None, "create", "--name", "x", "--expires-in", "never", env=env)
    assert code == 2 and "allow_keys_without_expiry" in err
    allowing = {**env, "LLMGW_AUTH__ALLOW_KEYS_WITHOUT_EXPIRY": "true"}
    code, _, err = await keys_cli(
        None, "create", "--name", "forever", "--expires-in", "never", env=allowing
    )
    assert code == 0, err

    code, table, err = await keys_cli(None, "list", env=env)
    assert code == 0, err
    header, *rows = table.splitlines()
    assert "EXPIRES" in header
    by_name = {row.split()[1]: row for row in rows}
    assert "rotate)" in by_name["soon"] and "in 3.0 d" in by_name["soon"]
    assert "rotate)" not in by_name["default"] and "never" in by_name["forever"]
    code, listed, _ = await keys_cli(None, "list", "--json", env=env)
    described = {row["name"]: row for row in map(json.loads, listed.splitlines())}
    assert described["forever"]["expires"] is None
    expires = calendar.timegm(time.strptime(described["default"]["expires"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(expires - (time.time() + 90 * DAY_S)) < 120


LEGACY_SCHEMA = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL, scopes TEXT NOT NULL,
    models TEXT NOT NULL, requests_per_minute INTEGER, tokens_per_minute INTEGER,
    budget_nanos INTEGER, created_at REAL NOT NULL, revoked_at REAL
)
"""


async def test_a_store_from_before_expiry_is_migrated_and_its_keys_keep_working(
    tmp_path: Path,
) -> None:
    path, now = tmp_path / "keys.sqlite3", time.time()
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    keys = {"young": ("aaaaaaaaaaaa", now - DAY_S), "old": ("bbbbbbbbbbbb", now - 400 * DAY_S)}
    with sqlite3.connect(path) as db:
        db.execute(LEGACY_SCHEMA)
        for name, (key_id, created) in keys.items():
            key = f"llmgw_{key_id}_{'1' * 48}"
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, '[\"generate\"]', '[\"*\"]',"
                " NULL, NULL, NULL, ?, NULL)",
                (key_id, name, hasher.hash(key), created),
            )
    store = KeyStore(path)
    young, old = (store.lookup(key_id) for key_id, _ in keys.values())
    assert young is not None and old is not None
    # Their own lifetime from creation, but never sooner than the warning window.
    assert young.expires_at == pytest.approx(now - DAY_S + 90 * DAY_S, abs=5)
    assert old.expires_at == pytest.approx(now + 14 * DAY_S, abs=5)
    create_signing_key(tmp_path / "signing")
    ring = SigningKeyRing(tmp_path / "signing")
    verifier = TokenVerifier(ring, issuer="gw", audience="gw", leeway=0)
    authenticator = Authenticator(store, SecretFile(tmp_path / "secret"), verifier)
    assert await accepted(authenticator, f"llmgw_bbbbbbbbbbbb_{'1' * 48}")
    assert KeyStore(path).lookup("bbbbbbbbbbbb") == old  # migrated once, not again


def test_the_metric_counts_keys_by_days_left(
    tmp_path: Path, key_store_location: Path | str
) -> None:
    from prometheus_client import generate_latest

    from server.telemetry.metrics import GatewayMetrics

    store = KeyStore(key_store_location)
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    store.create(hasher, name="soon", scopes=["generate"], expires_in_s=0.5 * DAY_S)
    store.create(hasher, name="default", scopes=["generate"])
    metrics = GatewayMetrics(process_metrics=False)
    metrics.watch_key_expiry(ExpiryWatch(store).counts)
    scraped = generate_latest(metrics.registry).decode()
    assert 'llmgw_api_keys{days_left="lt_1"} 1.0' in scraped
    assert 'llmgw_api_keys{days_left="lt_90"} 1.0' in scraped
    assert 'llmgw_api_keys{days_left="expired"} 0.0' in scraped
