"""Authentication end to end: a gateway with auth on, called through real channels.

Success paths with an API key and with a token, every attack the issue lists
(each answered UNAUTHENTICATED, identically), permission checks, revocation,
and the local development mode. The helpers at the top also serve
tests/test_client_credentials.py and tests/test_tokens.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from llmgateway.v1 import token_pb2, token_pb2_grpc
from server.app import Gateway
from server.auth.cli import create_key
from server.auth.keys import KeyStore
from server.auth.tokens import load_signing_keys
from server.config import ConfigError, GatewayConfig, load_config
from server.identity import Identity, current_identity
from tests.conftest import (
    REPO_ROOT,
    TEST_CONFIG,
    RunningGateway,
    detail,
    request,
    rich_status,
    start_server_process,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


# -- helpers shared by the auth test modules ----------------------------------


@dataclass
class AuthedGateway:
    """An in-process gateway with auth on, its files under a temporary folder."""

    gateway: Gateway
    config: GatewayConfig
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationServiceStub
    tokens: token_pb2_grpc.TokenServiceStub

    def create_key(
        self, name: str = "test", scopes: Sequence[str] = ("generate",), models: Sequence[str] = ()
    ) -> tuple[str, str]:
        """A new key as (id, key)."""
        record, key = create_key(
            self.config.auth, name=name, scopes=scopes, models=tuple(models) or ("*",)
        )
        return record.id, key

    async def issue(self, key: str, lifetime: float | None = None) -> token_pb2.IssueTokenResponse:
        req = token_pb2.IssueTokenRequest()
        if lifetime:
            req.lifetime.FromMilliseconds(int(lifetime * 1000))
        return await self.tokens.IssueToken(req, metadata=bearer(key), timeout=10)

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The (kid, private key) new tokens are signed with."""
        signer = self.gateway.auth.ring.signer  # type: ignore[union-attr]
        assert signer is not None and signer.private_key is not None
        return signer.kid, signer.private_key

    async def close(self) -> None:
        await self.channel.close()
        await self.gateway.stop(grace=1)


def auth_config(directory: Path, **auth: Any) -> GatewayConfig:
    overrides = {key: value for key, value in TEST_CONFIG.items() if not key.startswith("auth.")}
    overrides.update(
        {
            "auth.key_store": str(directory / "keys.sqlite3"),
            "auth.secret_file": str(directory / "key-secret"),
            "auth.signing_keys_dir": str(directory / "signing-keys"),
            **{f"auth.{key}": value for key, value in auth.items()},
        }
    )
    return load_config(environ={}, overrides=overrides)


async def start_authed_gateway(
    directory: Path, *, interceptors: Iterable[grpc.aio.ServerInterceptor] = (), **auth: Any
) -> AuthedGateway:
    config = auth_config(directory, **auth)
    # A first key makes the secret and the signing key, as `keys create` does.
    create_key(config.auth, name="bootstrap")
    gateway = Gateway(config, interceptors=list(interceptors))
    port = await gateway.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    return AuthedGateway(
        gateway,
        config,
        address,
        channel,
        pb_grpc.GenerationServiceStub(channel),
        token_pb2_grpc.TokenServiceStub(channel),
    )


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A compact JWT with any header, signed by `sign(signing_input)` (empty: unsigned)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def claims_for(key_id: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "llm-gateway",
        "aud": "llm-gateway",
        "sub": key_id,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": "test",
        "scope": "generate",
        "models": ["*"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def expect_code(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    running = await start_authed_gateway(tmp_path_factory.mktemp("auth"))
    yield running
    await running.close()


@pytest.fixture(scope="session")
def api_key(authed: AuthedGateway) -> str:
    return authed.create_key("svc")[1]


# -- success paths ---------------------------------------------------------------


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
async def test_api_key_generate_and_stream(
    authed: AuthedGateway, api_key: str, header: str
) -> None:
    metadata = ((header, api_key),) if header == "x-api-key" else bearer(api_key)
    response = await authed.stub.Generate(request("hello there"), metadata=metadata)
    assert response.content[0].text == "hello there"
    events = [e async for e in authed.stub.StreamGenerate(request("hi"), metadata=metadata)]
    assert events[0].HasField("message_start") and events[-1].HasField("message_stop")


async def test_token_generate_and_stream(authed: AuthedGateway, api_key: str) -> None:
    issued = await authed.issue(api_key)
    assert 890 <= issued.lifetime.ToTimedelta().total_seconds() <= 901  # 15 minutes by default
    assert abs(issued.expire_time.seconds - time.time() - 900) < 5
    response = await authed.stub.Generate(request("with a token"), metadata=bearer(issued.token))
    assert response.content[0].text == "with a token"
    events = [
        e async for e in authed.stub.StreamGenerate(request("x y"), metadata=bearer(issued.token))
    ]
    assert events[-1].HasField("message_stop")


async def test_token_has_the_claims_and_header_the_issue_asks_for(
    authed: AuthedGateway,
) -> None:
    key_id, key = authed.create_key("claims", models=["echo", "tiny*"])
    token = (await authed.issue(key)).token
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "EdDSA"
    assert header["kid"] == authed.signing_key()[0]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) >= {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "scope", "models"}
    assert claims["sub"] == key_id and claims["scope"] == "generate"
    assert claims["models"] == ["echo", "tiny*"]


async def test_requested_lifetime_is_honoured_and_capped(
    authed: AuthedGateway, api_key: str
) -> None:
    short = await authed.issue(api_key, lifetime=30)
    assert 30 <= short.lifetime.ToTimedelta().total_seconds() <= 31
    long = await authed.issue(api_key, lifetime=86400)
    assert long.lifetime.ToTimedelta().total_seconds() <= 901


async def test_health_and_reflection_need_no_credentials(authed: AuthedGateway) -> None:
    health = health_pb2_grpc.HealthStub(authed.channel)
    for service in ("", "llmgateway.v1.GenerationService", "llmgateway.v1.TokenService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_generation_method_needs_credentials(authed: AuthedGateway) -> None:
    await expect_code(UNAUTHENTICATED, authed.stub.Generate(request()))
    await expect_code(UNAUTHENTICATED, authed.stub.ListModels(pb.ListModelsRequest()))
    count = pb.CountTokensRequest(model="echo", messages=[request().messages[0]])
    await expect_code(UNAUTHENTICATED, authed.stub.CountTokens(count))
    stream = authed.stub.StreamGenerate(request())
    await expect_code(UNAUTHENTICATED, stream.read())
    await expect_code(UNAUTHENTICATED, authed.tokens.IssueToken(token_pb2.IssueTokenRequest()))


# -- attacks: each one UNAUTHENTICATED, with the same message ---------------------


def _attacks(authed: AuthedGateway, key_id: str, valid: str) -> dict[str, str]:
    kid, private = authed.signing_key()
    header = {"alg": "EdDSA", "typ": "at+jwt", "kid": kid}

    def signed(claims: dict[str, Any], head: dict[str, Any] | None = None) -> str:
        return forge(head or header, claims, private.sign)

    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = Ed25519PrivateKey.generate()
    head, payload, signature = valid.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["models"] = ["*"]
    tampered["scope"] = "generate admin"
    return {
        "alg_none": forge({"alg": "none", "typ": "at+jwt", "kid": kid}, claims_for(key_id)),
        "alg_none_signature_kept": forge(
            {"alg": "none", "typ": "at+jwt", "kid": kid}, claims_for(key_id), private.sign
        ),
        # Algorithm confusion: an HMAC keyed with the (public) verification key.
        "hs256_with_public_key": forge(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid},
            claims_for(key_id),
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "expired": signed(claims_for(key_id, iat=time.time() - 1000, exp=int(time.time()) - 120)),
        "not_yet_valid": signed(claims_for(key_id, nbf=int(time.time()) + 600)),
        "issued_in_the_future": signed(claims_for(key_id, iat=int(time.time()) + 600)),
        "wrong_audience": signed(claims_for(key_id, aud="someone-else")),
        "audience_list": signed(claims_for(key_id, aud=["llm-gateway", "x"])),
        "wrong_issuer": signed(claims_for(key_id, iss="https://evil.example")),
        "missing_exp": signed(claims_for(key_id, exp=None)),
        "missing_nbf": signed(claims_for(key_id, nbf=None)),
        "missing_iat": signed(claims_for(key_id, iat=None)),
        "missing_aud": signed(claims_for(key_id, aud=None)),
        "missing_iss": signed(claims_for(key_id, iss=None)),
        "wrong_typ": signed(claims_for(key_id), {**header, "typ": "JWT"}),
        "missing_typ": signed(claims_for(key_id), {"alg": "EdDSA", "kid": kid}),
        "tampered_payload": f"{head}.{b64(json.dumps(tampered).encode())}.{signature}",
        "tampered_signature": f"{head}.{payload}.{signature[:-4]}AAAA",
        "unknown_kid": forge({**header, "kid": "not-ours"}, claims_for(key_id), stranger.sign),
        "missing_kid": signed(claims_for(key_id), {"alg": "EdDSA", "typ": "at+jwt"}),
        "stranger_key_with_our_kid": forge(header, claims_for(key_id), stranger.sign),
        "unknown_subject": signed(claims_for("000000000000")),
        "garbage": "!!!not a token!!!",
        "two_segments": f"{head}.{payload}",
        "empty": "",
        "wrong_api_key": "llmgw_" + key_id + "_" + "0" * 48,
        "malformed_api_key": "llmgw_short",
    }


ATTACKS = [
    "alg_none",
    "alg_none_signature_kept",
    "hs256_with_public_key",
    "expired",
    "not_yet_valid",
    "issued_in_the_future",
    "wrong_audience",
    "audience_list",
    "wrong_issuer",
    "missing_exp",
    "missing_nbf",
    "missing_iat",
    "missing_aud",
    "missing_iss",
    "wrong_typ",
    "missing_typ",
    "tampered_payload",
    "tampered_signature",
    "unknown_kid",
    "missing_kid",
    "stranger_key_with_our_kid",
    "unknown_subject",
    "garbage",
    "two_segments",
    "empty",
    "wrong_api_key",
    "malformed_api_key",
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_attack_is_unauthenticated(authed: AuthedGateway, attack: str) -> None:
    key_id, key = authed.create_key("victim", models=["echo"])
    valid = (await authed.issue(key)).token
    token = _attacks(authed, key_id, valid)[attack]
    error = await expect_code(
        UNAUTHENTICATED, authed.stub.Generate(request(), metadata=bearer(token))
    )
    # The same words whatever failed: nothing tells the attacker which check it was.
    assert error.details() == "missing or invalid credentials"
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "UNAUTHENTICATED"
    stream = authed.stub.StreamGenerate(request(), metadata=bearer(token))
    await expect_code(UNAUTHENTICATED, stream.read())
    # The genuine token still works: the attacks changed nothing.
    await authed.stub.Generate(request(), metadata=bearer(valid))


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer    "),),
        (("authorization", "Token abc"),),
        (("x-api-key", ""),),
        (("authorization-bin", b"\x00\x01"),),
    ],
)
async def test_garbage_in_the_header_is_unauthenticated(
    authed: AuthedGateway, metadata: tuple[tuple[str, Any], ...]
) -> None:
    await expect_code(UNAUTHENTICATED, authed.stub.Generate(request(), metadata=metadata))


async def test_two_credentials_are_refused(authed: AuthedGateway, api_key: str) -> None:
    other = authed.create_key("other")[1]
    metadata = (("x-api-key", api_key), ("authorization", f"Bearer {other}"))
    await expect_code(UNAUTHENTICATED, authed.stub.Generate(request(), metadata=metadata))


async def test_a_token_cannot_renew_itself(authed: AuthedGateway, api_key: str) -> None:
    token = (await authed.issue(api_key)).token
    await expect_code(PERMISSION_DENIED, authed.issue(token))


# -- permissions -----------------------------------------------------------------


@pytest.mark.parametrize("credential", ["api_key", "token"])
async def test_disallowed_model_is_permission_denied(
    authed: AuthedGateway, credential: str
) -> None:
    _, key = authed.create_key("echo-only", models=["echo"])
    secret = key if credential == "api_key" else (await authed.issue(key)).token
    await authed.stub.Generate(request(model="echo"), metadata=bearer(secret))
    error = await expect_code(
        PERMISSION_DENIED, authed.stub.Generate(request(model="tiny"), metadata=bearer(secret))
    )
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_ALLOWED" and info.metadata["model"] == "tiny"
    stream = authed.stub.StreamGenerate(request(model="tiny"), metadata=bearer(secret))
    await expect_code(PERMISSION_DENIED, stream.read())
    count = pb.CountTokensRequest(model="tiny", messages=[request().messages[0]])
    await expect_code(PERMISSION_DENIED, authed.stub.CountTokens(count, metadata=bearer(secret)))


async def test_model_patterns_and_aliases(authed: AuthedGateway) -> None:
    _, key = authed.create_key("tiny-family", models=["tiny*"])
    # "tiny-latest" is an alias of "tiny": both names match the pattern.
    for model in ("tiny", "tiny-latest"):
        await authed.stub.Generate(request(model=model), metadata=bearer(key))
    _, by_id = authed.create_key("tiny-by-id", models=["tiny"])
    await authed.stub.Generate(request(model="tiny-latest"), metadata=bearer(by_id))
    await expect_code(
        PERMISSION_DENIED, authed.stub.Generate(request(model="echo"), metadata=bearer(by_id))
    )


async def test_list_models_shows_only_what_the_key_may_use(authed: AuthedGateway) -> None:
    _, everything = authed.create_key("all-models")
    _, echo_only = authed.create_key("echo-only-list", models=["echo"])
    _, by_alias = authed.create_key("tiny-by-alias", models=["tiny-latest"])

    async def listed(key: str) -> set[str]:
        response = await authed.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key))
        return {m.id for m in response.models}

    assert {"echo", "tiny"} <= await listed(everything)
    assert await listed(echo_only) == {"echo"}
    assert await listed(by_alias) == {"tiny"}  # an allowed alias shows its model


async def test_missing_scope_is_permission_denied(authed: AuthedGateway) -> None:
    _, admin_only = authed.create_key("admin-only", scopes=["admin"])
    token = (await authed.issue(admin_only)).token  # IssueToken needs no scope
    for secret in (admin_only, token):
        error = await expect_code(
            PERMISSION_DENIED, authed.stub.Generate(request(), metadata=bearer(secret))
        )
        info = detail(rich_status(error), error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo)
        assert info.reason == "MISSING_SCOPE" and info.metadata["scope"] == "generate"


# -- revocation --------------------------------------------------------------------


async def test_revoking_a_key_rejects_it_and_its_tokens_at_once(authed: AuthedGateway) -> None:
    key_id, key = authed.create_key("to-revoke")
    token = (await authed.issue(key)).token
    await authed.stub.Generate(request(), metadata=bearer(token))  # now cached as valid
    assert await authed.gateway.auth.store.revoke_async(key_id)  # type: ignore[union-attr]
    for secret in (key, token):
        await expect_code(UNAUTHENTICATED, authed.stub.Generate(request(), metadata=bearer(secret)))
    await expect_code(UNAUTHENTICATED, authed.issue(key))


async def test_revocation_by_another_process_is_seen_within_the_cache_ttl(
    tmp_path: Path, key_store_location: Path | str
) -> None:
    # On each key store backend: a shared PostgreSQL database is how replicas see it.
    running = await start_authed_gateway(tmp_path, cache_ttl_s=0.5, key_store=key_store_location)
    try:
        key_id, key = running.create_key("elsewhere")
        token = (await running.issue(key)).token
        await running.stub.Generate(request(), metadata=bearer(token))
        # What `python -m server keys revoke` does: another store object, same store.
        assert KeyStore(running.config.auth.key_store).revoke(key_id)
        await asyncio.sleep(0.6)
        await expect_code(UNAUTHENTICATED, running.stub.Generate(request(), metadata=bearer(token)))
    finally:
        await running.close()


async def test_a_valid_token_costs_no_database_round_trip(
    authed: AuthedGateway, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = (await authed.issue(api_key)).token
    await authed.stub.Generate(request(), metadata=bearer(token))  # warms the cache
    store = authed.gateway.auth.store  # type: ignore[union-attr]
    lookups: list[str] = []
    original = store.lookup
    monkeypatch.setattr(store, "lookup", lambda key_id: lookups.append(key_id) or original(key_id))
    for _ in range(20):
        await authed.stub.Generate(request(), metadata=bearer(token))
    assert lookups == []


# -- local development mode ------------------------------------------------------


def test_auth_is_on_by_default() -> None:
    assert load_config(environ={}).auth.enabled


async def test_auth_disabled_refuses_a_non_loopback_host() -> None:
    config = load_config(
        environ={},
        overrides={
            "server.host": "0.0.0.0",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
        },
    )
    gateway = Gateway(config)
    with pytest.raises(ConfigError, match=r"auth\.enabled"):
        await gateway.start()


async def test_no_auth_flag_serves_on_loopback_with_a_warning() -> None:
    server = await start_server_process("--no-auth", env={"LLMGW_AUTH__ENABLED": "true"})
    try:
        assert "authentication is DISABLED" in "".join(server.log)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = await pb_grpc.GenerationServiceStub(channel).Generate(request("ok"))
        assert response.content[0].text == "ok"
    finally:
        server.process.terminate()
        await server.process.wait()


async def test_no_auth_on_all_interfaces_stops_start_up() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--no-auth",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"auth.enabled" in err and b"Traceback" not in err


def test_signing_keys_are_ed25519_files(authed: AuthedGateway) -> None:
    keys = load_signing_keys(authed.config.auth.signing_keys_dir)
    assert keys and all(key.private_key is not None for key in keys.values())
    for path in authed.config.auth.signing_keys_dir.glob("*.pem"):
        assert path.stat().st_mode & 0o077 == 0


async def test_issue_token_without_auth_says_so(running: RunningGateway) -> None:
    tokens = token_pb2_grpc.TokenServiceStub(running.channel)
    error = await expect_code(
        grpc.StatusCode.FAILED_PRECONDITION, tokens.IssueToken(token_pb2.IssueTokenRequest())
    )
    assert "disabled" in error.details()


class IdentityRecorder(grpc.aio.ServerInterceptor):
    """An interceptor after auth (where a rate limiter goes): what identity does it see?"""

    def __init__(self) -> None:
        self.seen: list[Identity | None] = []

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.seen.append(current_identity())
        return await continuation(handler_call_details)


async def test_later_interceptors_see_the_identity(tmp_path: Path) -> None:
    recorder = IdentityRecorder()
    running = await start_authed_gateway(tmp_path, interceptors=[recorder])
    try:
        key_id, key = running.create_key("seen")
        await running.stub.Generate(request(), metadata=bearer(key))
        await expect_code(UNAUTHENTICATED, running.stub.Generate(request()))
        first, refused = recorder.seen
        assert first is not None and first.key_id == key_id and first.credential == "api_key"
        assert refused is None
    finally:
        await running.close()
