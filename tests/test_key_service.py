"""KeyService end to end: a gateway with auth on, called through a real channel.

Every method, its permission checks (no key, a key without `admin`, a
revoked admin key), its INVALID_ARGUMENT field violations and NOT_FOUND;
the secret shown once and never by ListKeys or GetKey; what UpdateKey,
RotateKey and RevokeKey change in what authentication accepts, at once in
this process; and the audit trail naming the admin key that acted. The
other processes' side of revocation is tests/test_key_revocation.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2

from llmgateway.v1 import keys_pb2 as pb
from llmgateway.v1 import keys_pb2_grpc
from server.auth.cli import create_key
from server.config import AuditConfig
from server.telemetry.audit import close_audit, configure_audit
from tests.conftest import RunningGateway, detail, field_violations, request, rich_status
from tests.test_auth import AuthedGateway, bearer, expect_code, start_authed_gateway
from tests.test_grpcurl import grpcurl

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
HOUR = 3600


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    # A long cache TTL: every "at once" below is the service dropping the
    # cached record, not the record expiring.
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("key-service"), cache_ttl_s=60)
    yield gateway
    await gateway.close()


@pytest.fixture(scope="module")
def admin_key(authed: AuthedGateway) -> str:
    return authed.create_key("root", scopes=("admin",))[1]


@pytest.fixture
def keys(authed: AuthedGateway) -> keys_pb2_grpc.KeyServiceStub:
    return keys_pb2_grpc.KeyServiceStub(authed.channel)


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit.jsonl"
    configure_audit(AuditConfig(path=path))
    yield path
    close_audit()


def as_admin(admin_key: str) -> dict[str, Any]:
    return {"metadata": bearer(admin_key), "timeout": 10}


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def create(
    keys: keys_pb2_grpc.KeyServiceStub, admin_key: str, **fields: Any
) -> pb.CreateKeyResponse:
    fields.setdefault("name", "svc")
    response: pb.CreateKeyResponse = await keys.CreateKey(
        pb.CreateKeyRequest(**fields), **as_admin(admin_key)
    )
    return response


async def generate_code(authed: AuthedGateway, secret: str, model: str = "echo") -> Any:
    try:
        await authed.stub.Generate(request(model=model), metadata=bearer(secret), timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# -- CreateKey, GetKey, ListKeys -------------------------------------------------------


async def test_create_returns_the_secret_once_and_nothing_else_does(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    lifetime = 30 * 86400
    created = await create(
        keys,
        admin_key,
        name="billing",
        models=["echo"],
        limits=pb.ApiKeyLimits(requests_per_minute=100, budget_nanos=5_000_000_000),
        lifetime=seconds(lifetime),
    )
    key = created.key
    assert created.secret.startswith(f"llmgw_{key.id}_")
    assert (key.name, list(key.scopes), list(key.models)) == ("billing", ["generate"], ["echo"])
    assert key.state == pb.API_KEY_STATE_ACTIVE
    assert key.limits.requests_per_minute == 100 and key.limits.budget_nanos == 5_000_000_000
    assert not key.limits.HasField("tokens_per_minute")  # unset: no limit of its own
    life = key.expire_time.ToSeconds() - key.create_time.ToSeconds()
    assert abs(life - lifetime) <= 1
    assert not key.HasField("revoke_time") and not key.HasField("rotate_time")
    assert await generate_code(authed, created.secret) == grpc.StatusCode.OK

    stored = authed.gateway.auth.store.lookup(key.id)  # type: ignore[union-attr]
    assert stored is not None
    got = await keys.GetKey(pb.GetKeyRequest(key_id=key.id), **as_admin(admin_key))
    assert got.key == key
    listed = await keys.ListKeys(pb.ListKeysRequest(page_size=1000), **as_admin(admin_key))
    assert key in listed.keys
    for response in (got, listed):
        wire = response.SerializeToString()
        for secret in (created.secret, stored.key_hash, created.secret.rsplit("_", 1)[1]):
            assert secret.encode() not in wire


async def test_create_defaults_to_generate_every_model_and_the_configured_lifetime(
    keys: keys_pb2_grpc.KeyServiceStub, admin_key: str, authed: AuthedGateway
) -> None:
    key = (await create(keys, admin_key)).key
    assert (list(key.scopes), list(key.models)) == (["generate"], ["*"])
    days = (key.expire_time.ToSeconds() - key.create_time.ToSeconds()) / 86400
    assert abs(days - authed.config.auth.key_ttl_days) < 0.001


async def test_keys_made_on_the_command_line_are_listed_and_paged(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    made = [create_key(authed.config.auth, name=f"page-{i}")[0].id for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await keys.ListKeys(
            pb.ListKeysRequest(page_size=2, page_token=token), **as_admin(admin_key)
        )
        assert len(page.keys) <= 2
        seen += [k.id for k in page.keys]
        if len(seen) == 2:  # a key created between two pages is listed once, at the end
            made.append(create_key(authed.config.auth, name="late")[0].id)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert [k for k in seen if k in made] == made  # oldest first, none missing
    stamps = [(await keys.GetKey(pb.GetKeyRequest(key_id=k), **as_admin(admin_key))) for k in seen]
    assert [s.key.create_time.ToNanoseconds() for s in stamps] == sorted(
        s.key.create_time.ToNanoseconds() for s in stamps
    )


# -- permissions ---------------------------------------------------------------------


def every_call(keys: keys_pb2_grpc.KeyServiceStub, key_id: str) -> dict[str, Any]:
    """One well-formed call per method, not yet made."""
    return {
        "CreateKey": lambda **kw: keys.CreateKey(pb.CreateKeyRequest(name="x"), **kw),
        "ListKeys": lambda **kw: keys.ListKeys(pb.ListKeysRequest(), **kw),
        "GetKey": lambda **kw: keys.GetKey(pb.GetKeyRequest(key_id=key_id), **kw),
        "RotateKey": lambda **kw: keys.RotateKey(pb.RotateKeyRequest(key_id=key_id), **kw),
        "UpdateKey": lambda **kw: keys.UpdateKey(
            pb.UpdateKeyRequest(key=pb.ApiKey(id=key_id, name="y"), update_mask=mask("name")),
            **kw,
        ),
        "RevokeKey": lambda **kw: keys.RevokeKey(pb.RevokeKeyRequest(key_id=key_id), **kw),
    }


async def test_every_method_needs_an_admin_key(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub
) -> None:
    victim_id, victim = authed.create_key("victim")
    _, generate_only = authed.create_key("app", scopes=("generate",))
    revoked_admin_id, revoked_admin = authed.create_key("old-root", scopes=("admin",))
    assert await authed.gateway.auth.store.revoke_async(revoked_admin_id)  # type: ignore[union-attr]
    admin_token = await authed.issue(authed.create_key("ops", scopes=("admin", "generate"))[1])
    for method, call in every_call(keys, victim_id).items():
        await expect_code(UNAUTHENTICATED, call(timeout=10))
        await expect_code(UNAUTHENTICATED, call(metadata=bearer(revoked_admin), timeout=10))
        denied = await expect_code(PERMISSION_DENIED, call(metadata=bearer(generate_only)))
        info = detail(rich_status(denied), error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo), method
        assert (info.reason, info.metadata["scope"]) == ("MISSING_SCOPE", "admin"), method
    # Nothing above changed the victim; a token of an admin key is an admin.
    got = await keys.GetKey(pb.GetKeyRequest(key_id=victim_id), **as_admin(admin_token.token))
    assert got.key.name == "victim" and got.key.state == pb.API_KEY_STATE_ACTIVE
    assert await generate_code(authed, victim) == grpc.StatusCode.OK


async def test_key_service_without_auth_says_so(running: RunningGateway) -> None:
    stub = keys_pb2_grpc.KeyServiceStub(running.channel)
    error = await expect_code(FAILED_PRECONDITION, stub.ListKeys(pb.ListKeysRequest()))
    assert "auth.enabled: false" in (error.details() or "")


# -- bad input -----------------------------------------------------------------------


async def invalid(call: Any) -> dict[str, str]:
    return field_violations(await expect_code(INVALID_ARGUMENT, call))


async def test_bad_input_names_the_field(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    kw = as_admin(admin_key)
    create_cases = {
        "name": pb.CreateKeyRequest(name="  "),
        "scopes": pb.CreateKeyRequest(name="x", scopes=["generate", "root"]),
        "models": pb.CreateKeyRequest(name="x", models=["echo", ""]),
        "limits.requests_per_minute": pb.CreateKeyRequest(
            name="x", limits=pb.ApiKeyLimits(requests_per_minute=-1)
        ),
        "lifetime": pb.CreateKeyRequest(name="x", lifetime=seconds(0)),
        "never_expires": pb.CreateKeyRequest(name="x", never_expires=True),
    }
    for field, create_request in create_cases.items():
        assert field in await invalid(keys.CreateKey(create_request, **kw)), field
    both = pb.CreateKeyRequest(name="x", never_expires=True, lifetime=seconds(60))
    assert "never_expires" in await invalid(keys.CreateKey(both, **kw))

    for key_id in ("", "ABC", "0123456789abcdef"):
        assert "key_id" in await invalid(keys.GetKey(pb.GetKeyRequest(key_id=key_id), **kw))
    unknown = await expect_code(NOT_FOUND, keys.GetKey(pb.GetKeyRequest(key_id="0" * 12), **kw))
    info = detail(rich_status(unknown), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "KEY_NOT_FOUND"
    for call in (
        keys.RevokeKey(pb.RevokeKeyRequest(key_id="0" * 12), **kw),
        keys.RotateKey(pb.RotateKeyRequest(key_id="0" * 12), **kw),
        keys.UpdateKey(
            pb.UpdateKeyRequest(key=pb.ApiKey(id="0" * 12, name="n"), update_mask=mask("name")),
            **kw,
        ),
    ):
        await expect_code(NOT_FOUND, call)

    key_id = authed.create_key("target")[0]
    rotate = pb.RotateKeyRequest(key_id=key_id, grace_period=seconds(-1))
    assert "grace_period" in await invalid(keys.RotateKey(rotate, **kw))

    def update(*paths: str, **fields: Any) -> Any:
        return keys.UpdateKey(
            pb.UpdateKeyRequest(key=pb.ApiKey(id=key_id, **fields), update_mask=mask(*paths)),
            **kw,
        )

    assert "update_mask" in await invalid(update())
    assert "update_mask" in await invalid(update("id"))
    assert "update_mask" in await invalid(update("*"))
    assert "key.models" in await invalid(update("models"))  # '*' must be said
    assert "key.scopes" in await invalid(update("scopes"))
    assert "key.name" in await invalid(update("name"))
    assert "key.expire_time" in await invalid(update("expire_time"))  # never: not allowed here
    past = pb.ApiKey(id=key_id)
    past.expire_time.FromSeconds(1)
    assert "key.expire_time" in await invalid(
        keys.UpdateKey(pb.UpdateKeyRequest(key=past, update_mask=mask("expire_time")), **kw)
    )
    assert "page_size" in await invalid(keys.ListKeys(pb.ListKeysRequest(page_size=-1), **kw))
    assert "page_token" in await invalid(keys.ListKeys(pb.ListKeysRequest(page_token="x"), **kw))
    token = (await keys.ListKeys(pb.ListKeysRequest(page_size=1), **kw)).next_page_token
    assert token
    other_filter = pb.ListKeysRequest(page_size=1, page_token=token, show_revoked=True)
    assert "page_token" in await invalid(keys.ListKeys(other_filter, **kw))
    # None of it changed the key.
    got = await keys.GetKey(pb.GetKeyRequest(key_id=key_id), **kw)
    assert (got.key.name, list(got.key.models)) == ("target", ["*"])


# -- UpdateKey -------------------------------------------------------------------------


async def test_update_changes_what_authentication_enforces_at_once(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    created = await create(
        keys,
        admin_key,
        name="narrowing",
        models=["echo", "tiny"],
        limits=pb.ApiKeyLimits(requests_per_minute=100, tokens_per_minute=1_000_000),
    )
    key_id, secret = created.key.id, created.secret
    assert await generate_code(authed, secret, "tiny") == grpc.StatusCode.OK  # cached as valid

    changed = pb.ApiKey(id=key_id, name="narrowed", models=["echo"])
    changed.limits.tokens_per_minute = 500_000  # and requests_per_minute unset: cleared
    changed.limits.ClearField("requests_per_minute")
    updated = await keys.UpdateKey(
        pb.UpdateKeyRequest(
            key=changed,
            update_mask=mask("name", "models", "limits.requests_per_minute"),
        ),
        **as_admin(admin_key),
    )
    key = updated.key
    assert (key.name, list(key.models)) == ("narrowed", ["echo"])
    # Only the limit named changed: tokens_per_minute stays, not 500,000.
    assert not key.limits.HasField("requests_per_minute")
    assert key.limits.tokens_per_minute == 1_000_000
    assert await generate_code(authed, secret, "tiny") == PERMISSION_DENIED
    assert await generate_code(authed, secret, "echo") == grpc.StatusCode.OK

    later = pb.ApiKey(id=key_id, scopes=["generate", "admin"])
    later.expire_time.FromSeconds(int(created.key.expire_time.ToSeconds() - 86400))
    updated = await keys.UpdateKey(
        pb.UpdateKeyRequest(key=later, update_mask=mask("scopes", "expire_time")),
        **as_admin(admin_key),
    )
    assert sorted(updated.key.scopes) == ["admin", "generate"]
    assert updated.key.expire_time == later.expire_time
    # Widened to admin by an admin: it may now manage keys itself.
    await keys.GetKey(pb.GetKeyRequest(key_id=key_id), **as_admin(secret))


# -- RotateKey -------------------------------------------------------------------------


async def test_rotate_with_grace_then_without(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    created = await create(keys, admin_key, name="rotating")
    key_id, first = created.key.id, created.secret
    assert await generate_code(authed, first) == grpc.StatusCode.OK

    rotated = await keys.RotateKey(
        pb.RotateKeyRequest(key_id=key_id, grace_period=seconds(HOUR)), **as_admin(admin_key)
    )
    second = rotated.secret
    assert second.startswith(f"llmgw_{key_id}_") and second != first
    assert rotated.key.HasField("rotate_time")
    grace_left = (
        rotated.key.previous_secret_expire_time.ToSeconds() - rotated.key.rotate_time.ToSeconds()
    )
    assert abs(grace_left - HOUR) <= 1
    for secret in (first, second):  # both inside the grace
        assert await generate_code(authed, secret) == grpc.StatusCode.OK

    again = await keys.RotateKey(
        pb.RotateKeyRequest(key_id=key_id, grace_period=seconds(0)), **as_admin(admin_key)
    )
    assert not again.key.HasField("previous_secret_expire_time")
    assert await generate_code(authed, second) == UNAUTHENTICATED  # at once, no grace
    assert await generate_code(authed, first) == UNAUTHENTICATED
    assert await generate_code(authed, again.secret) == grpc.StatusCode.OK
    # A rotation keeps the id, and so the key's settings.
    got = await keys.GetKey(pb.GetKeyRequest(key_id=key_id), **as_admin(admin_key))
    assert (got.key.name, got.key.create_time) == ("rotating", created.key.create_time)


# -- RevokeKey ------------------------------------------------------------------------


async def test_revoke_refuses_the_key_and_its_tokens_at_once(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, admin_key: str
) -> None:
    created = await create(keys, admin_key, name="leaked")
    key_id, secret = created.key.id, created.secret
    token = (await authed.issue(secret)).token
    for credential in (secret, token):  # both cached as valid, for 60 s
        assert await generate_code(authed, credential) == grpc.StatusCode.OK

    revoked = await keys.RevokeKey(pb.RevokeKeyRequest(key_id=key_id), **as_admin(admin_key))
    assert revoked.key.state == pb.API_KEY_STATE_REVOKED and revoked.key.HasField("revoke_time")
    for credential in (secret, token):
        assert await generate_code(authed, credential) == UNAUTHENTICATED

    again = await keys.RevokeKey(pb.RevokeKeyRequest(key_id=key_id), **as_admin(admin_key))
    assert again.key == revoked.key  # idempotent
    for call in (
        keys.RotateKey(pb.RotateKeyRequest(key_id=key_id), **as_admin(admin_key)),
        keys.UpdateKey(
            pb.UpdateKeyRequest(key=pb.ApiKey(id=key_id, name="back"), update_mask=mask("name")),
            **as_admin(admin_key),
        ),
    ):
        error = await expect_code(FAILED_PRECONDITION, call)
        info = detail(rich_status(error), error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "KEY_REVOKED"

    active = await keys.ListKeys(pb.ListKeysRequest(page_size=1000), **as_admin(admin_key))
    assert key_id not in {k.id for k in active.keys}
    everything = await keys.ListKeys(
        pb.ListKeysRequest(page_size=1000, show_revoked=True), **as_admin(admin_key)
    )
    assert revoked.key in everything.keys


# -- the audit trail -------------------------------------------------------------------


async def test_changes_are_audited_with_the_admin_that_made_them(
    authed: AuthedGateway, keys: keys_pb2_grpc.KeyServiceStub, audit_file: Path
) -> None:
    admin_id, admin = authed.create_key("auditor", scopes=("admin",))
    created = await create(keys, admin, name="new-root", scopes=["admin"])
    key_id = created.key.id
    await keys.UpdateKey(
        pb.UpdateKeyRequest(key=pb.ApiKey(id=key_id, name="renamed"), update_mask=mask("name")),
        **as_admin(admin),
    )
    rotated = await keys.RotateKey(pb.RotateKeyRequest(key_id=key_id), **as_admin(admin))
    await keys.RevokeKey(pb.RevokeKeyRequest(key_id=key_id), **as_admin(admin))

    text = audit_file.read_text()  # noqa: ASYNC240
    for secret in (created.secret, rotated.secret):
        assert secret not in text
    found = [json.loads(line) for line in text.splitlines()]
    mine = [e for e in found if e.get("key_id") == key_id]
    assert [e["event"] for e in mine] == [
        "key.created",
        "key.updated",
        "key.rotated",
        "key.revoked",
    ]
    for event in mine:
        assert event["actor_key_id"] == admin_id
        assert event["via"] == "llmgateway.v1.KeyService"
        assert str(event["peer"]).startswith("ipv4:127.0.0.1:")
    # An admin key made by an admin: allowed, and said so.
    assert mine[0]["scopes"] == ["admin"]
    assert mine[1]["fields"] == ["name"]


async def test_a_key_store_out_of_reach_is_unavailable_not_not_found(tmp_path: Path) -> None:
    gateway = await start_authed_gateway(tmp_path, cache_ttl_s=60)
    try:
        keys = keys_pb2_grpc.KeyServiceStub(gateway.channel)
        admin_key = gateway.create_key("root", scopes=("admin",))[1]
        key_id = (await create(keys, admin_key)).key.id  # the admin key is cached now
        store = gateway.config.auth.key_store
        assert isinstance(store, Path)
        store.rename(tmp_path / "elsewhere")
        try:
            request = pb.GetKeyRequest(key_id=key_id)
            error = await expect_code(
                grpc.StatusCode.UNAVAILABLE, keys.GetKey(request, **as_admin(admin_key))
            )
            assert str(tmp_path) not in (error.details() or "")
        finally:
            (tmp_path / "elsewhere").rename(store)
        assert (await keys.GetKey(request, **as_admin(admin_key))).key.id == key_id
    finally:
        await gateway.close()


async def test_the_readme_grpcurl_calls(authed: AuthedGateway, admin_key: str) -> None:
    """The admin API as the README shows it: grpcurl through reflection, JSON in and out."""
    header = ("-H", f"authorization: Bearer {admin_key}")

    async def call(method: str, body: dict[str, Any]) -> dict[str, Any]:
        output = await grpcurl(
            "-plaintext", *header, "-d", json.dumps(body), authed.address,
            f"llmgateway.v1.KeyService/{method}",
        )  # fmt: skip
        answer: dict[str, Any] = json.loads(output)
        return answer

    created = await call(
        "CreateKey", {"name": "billing-service", "models": ["echo"], "lifetime": "2592000s"}
    )
    key_id, secret = created["key"]["id"], created["secret"]
    assert created["key"]["state"] == "API_KEY_STATE_ACTIVE"
    updated = await call(
        "UpdateKey",
        {
            "key": {"id": key_id, "models": ["echo", "tiny"], "limits": {"requestsPerMinute": 60}},
            "updateMask": {"paths": ["models", "limits.requests_per_minute"]},
        },
    )
    assert updated["key"]["models"] == ["echo", "tiny"]
    assert updated["key"]["limits"] == {"requests_per_minute": "60"}  # grpcurl: proto names
    listed = await call("ListKeys", {"pageSize": 1000})
    assert key_id in {k["id"] for k in listed["keys"]} and secret not in json.dumps(listed)
    rotated = await call("RotateKey", {"keyId": key_id, "gracePeriod": "3600s"})
    assert rotated["secret"] != secret and "previous_secret_expire_time" in rotated["key"]
    revoked = await call("RevokeKey", {"keyId": key_id})
    assert revoked["key"]["state"] == "API_KEY_STATE_REVOKED"
    assert await generate_code(authed, rotated["secret"]) == UNAUTHENTICATED
