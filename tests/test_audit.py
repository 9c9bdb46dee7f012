"""The audit trail: security events as JSON lines in their own append-only file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmgateway.v1 import token_pb2, token_pb2_grpc
from server.auth.cli import create_key
from server.auth.keys import KeyStore
from server.config import AuditConfig
from server.telemetry.audit import (
    BUDGET_ALERT,
    audit_enabled,
    audit_event,
    close_audit,
    configure_audit,
)
from tests.conftest import request
from tests.test_auth import auth_config, bearer, start_authed_gateway

Event = dict[str, object]


def events(path: Path) -> list[Event]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit" / "audit.jsonl"
    configure_audit(AuditConfig(path=path))
    yield path
    close_audit()


def test_no_path_no_audit(tmp_path: Path) -> None:
    assert configure_audit(AuditConfig()) is None
    assert not audit_enabled()
    audit_event(BUDGET_ALERT, key_id="k")  # a no-op, not an error


def test_key_lifecycle_is_audited(tmp_path: Path, audit_file: Path) -> None:
    config = auth_config(tmp_path)
    record, key = create_key(config.auth, name="svc", scopes=("generate",), models=("gpt-*",))
    assert KeyStore(config.auth.key_store).revoke(record.id)
    assert not KeyStore(config.auth.key_store).revoke(record.id)  # already revoked: no event
    audit_event(BUDGET_ALERT, key_id=record.id, budget_nanos=100, spent_nanos=90)
    found = events(audit_file)
    kinds = [e["event"] for e in found]
    assert kinds == [
        "signing_key.created",
        "key.created",
        "key.revoked",
        "budget.alert",
    ]
    created = found[1]
    assert created["key_id"] == record.id and created["name"] == "svc"
    assert created["scopes"] == ["generate"] and created["models"] == ["gpt-*"]
    assert all("time" in e for e in found)
    assert key not in audit_file.read_text()
    assert audit_file.stat().st_mode & 0o777 == 0o600


async def test_serving_events_carry_the_peer_and_no_content(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    gw = await start_authed_gateway(tmp_path, **{})
    try:
        # The gateway opens the configured sink itself (worker processes, tests).
        configure_audit(AuditConfig(path=path))
        _, key = gw.create_key(name="svc")
        key_id, gpt_only = gw.create_key(name="gpt-only", models=("gpt-*",))
        _, admin_less = gw.create_key(name="no-scope", scopes=("admin",))
        tokens = token_pb2_grpc.TokenServiceStub(gw.channel)
        issued = await tokens.IssueToken(token_pb2.IssueTokenRequest(), metadata=bearer(key))
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Generate(request("a private prompt"), metadata=bearer(key + "x"))
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Generate(request("a private prompt"), metadata=())
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Generate(
                request("a private prompt", model="echo"), metadata=bearer(gpt_only)
            )
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Generate(request("a private prompt"), metadata=bearer(admin_less))
        with pytest.raises(grpc.aio.AioRpcError):
            await tokens.IssueToken(token_pb2.IssueTokenRequest(), metadata=bearer(issued.token))
    finally:
        await gw.close()
        close_audit()
    text = path.read_text()
    assert "a private prompt" not in text
    assert key not in text and issued.token not in text
    found = events(path)
    by_kind: dict[str, list[Event]] = {}
    for event in found:
        by_kind.setdefault(str(event["event"]), []).append(event)
    (token_issued,) = by_kind["token.issued"]
    assert str(token_issued["peer"]).startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert float(str(token_issued["expires_at"])) > 0
    failures = by_kind["auth.failed"]
    assert len(failures) == 2
    for failure in failures:
        assert failure["method"] == "/llmgateway.v1.GenerationService/Generate"
        assert str(failure["peer"]).startswith(("ipv4:127.0.0.1:", "ipv6:"))
        assert failure["reason"] == "UNAUTHENTICATED"
    denials = {str(e["reason"]): e for e in by_kind["permission.denied"]}
    assert denials["MODEL_NOT_ALLOWED"]["key_id"] == key_id
    assert denials["MODEL_NOT_ALLOWED"]["model"] == "echo"
    assert "key_id" in denials["MISSING_SCOPE"] and denials["MISSING_SCOPE"]["peer"]
    assert denials["TOKEN_CANNOT_RENEW"]["method"] == "IssueToken"
