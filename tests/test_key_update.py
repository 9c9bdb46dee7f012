"""KeyStore.update: change a key's name, models, scopes, limits or expiry in place.

The admin API's UpdateKey (issue 21, item 4) calls it; these tests pin what
it promises that API: only the fields given change, the secret stays, the
cache forgets the key at once, "never" needs the configuration's consent,
and the audit trail names what changed. Each runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.auth.keys import DAY_S, KeyHasher, KeyStore, ensure_secret
from server.config import AuditConfig
from server.identity import ALL_MODELS, KeyLimits
from server.telemetry.audit import close_audit, configure_audit


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit.jsonl"
    sink = configure_audit(AuditConfig(path=path))
    yield path
    close_audit(sink)


@pytest.fixture
def hasher(tmp_path: Path) -> KeyHasher:
    return KeyHasher(ensure_secret(tmp_path / "secret"))


def test_update_changes_only_the_fields_given(
    key_store_location: Path | str, hasher: KeyHasher
) -> None:
    store = KeyStore(key_store_location)
    record, _ = store.create(
        hasher, name="svc", scopes=["generate"], models=["echo"], limits=KeyLimits(60, 1000, 5)
    )
    renamed = store.update(record.id, name="billing")
    assert renamed is not None and renamed.name == "billing"
    assert renamed.models == ("echo",) and renamed.limits == KeyLimits(60, 1000, 5)
    assert store.lookup(record.id) == renamed

    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=50, budget_nanos=10**9)
    expiry = record.created_at + 7 * DAY_S
    updated = store.update(
        record.id,
        models=["claude-*", "gpt-4o"],
        scopes=["generate", "admin"],
        limits=limits,
        expires_at=expiry,
    )
    assert updated is not None
    assert updated.name == "billing"
    assert updated.models == ("claude-*", "gpt-4o")
    assert updated.scopes == frozenset({"generate", "admin"})
    assert updated.limits == limits and updated.expires_at == expiry
    # The secret, its creation and its history are not the update's business.
    assert updated.key_hash == record.key_hash and updated.created_at == record.created_at
    assert store.lookup(record.id) == updated
    assert store.update(record.id, models=[]) is not None
    assert store.lookup(record.id).models == ALL_MODELS  # type: ignore[union-attr]


def test_update_of_an_unknown_or_revoked_key_is_none(
    key_store_location: Path | str, hasher: KeyHasher
) -> None:
    store = KeyStore(key_store_location)
    assert store.update("abcdefabcdef", name="x") is None  # no store at all yet
    record, _ = store.create(hasher, name="svc", scopes=["generate"])
    assert store.update("abcdefabcdef", name="x") is None
    assert store.revoke(record.id)
    assert store.update(record.id, name="x") is None
    assert store.lookup(record.id).name == "svc"  # type: ignore[union-attr]


def test_never_needs_the_configuration_s_consent(
    key_store_location: Path | str, hasher: KeyHasher
) -> None:
    store = KeyStore(key_store_location)
    record, _ = store.create(hasher, name="svc", scopes=["generate"])
    with pytest.raises(ValueError, match="allow_keys_without_expiry"):
        store.update(record.id, expires_at=None)
    assert store.lookup(record.id).expires_at == record.expires_at  # type: ignore[union-attr]
    lenient = KeyStore(key_store_location, allow_keys_without_expiry=True)
    forever = lenient.update(record.id, expires_at=None)
    assert forever is not None and forever.expires_at is None
    assert store.lookup(record.id).expires_at is None  # type: ignore[union-attr]


def test_update_refuses_bad_values(key_store_location: Path | str, hasher: KeyHasher) -> None:
    store = KeyStore(key_store_location)
    record, _ = store.create(hasher, name="svc", scopes=["generate"])
    for bad, said in (
        ({"scopes": []}, "scopes"),
        ({"scopes": ["x"]}, "scopes"),
        ({"name": ""}, "name"),
    ):
        with pytest.raises(ValueError, match=said):
            store.update(record.id, **bad)  # type: ignore[arg-type]
    assert store.lookup(record.id) == record


async def test_update_drops_the_cached_record_at_once(
    key_store_location: Path | str, hasher: KeyHasher
) -> None:
    clock = Clock()
    store = KeyStore(key_store_location, cache_ttl=60, clock=clock)
    record, _ = store.create(hasher, name="svc", scopes=["generate"], models=["echo"])
    assert await store.get(record.id) == record  # now cached for a minute
    store.update(record.id, models=["gpt-*"])
    cached = await store.get(record.id)
    assert cached is not None and cached.models == ("gpt-*",)


def test_update_is_audited_with_the_fields_changed(
    key_store_location: Path | str, hasher: KeyHasher, audit_file: Path
) -> None:
    store = KeyStore(key_store_location)
    record, key = store.create(hasher, name="svc", scopes=["generate"], models=["echo"])
    store.update(record.id, name="svc", models=["gpt-*"], limits=KeyLimits(budget_nanos=7))
    store.update(record.id, name="svc")  # nothing changed: no event
    text = audit_file.read_text()
    updates = [e for e in map(json.loads, text.splitlines()) if e["event"] == "key.updated"]
    assert len(updates) == 1
    assert updates[0]["key_id"] == record.id and updates[0]["name"] == "svc"
    assert updates[0]["fields"] == ["models", "limits"]
    assert key not in text and record.key_hash not in text
