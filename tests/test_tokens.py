"""Token signing and checking: rotation without downtime, leeway, the key ring."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc
import jwt
import pytest

from server.auth.tokens import (
    SigningKeyRing,
    TokenIssuer,
    TokenRejectedError,
    TokenVerifier,
    create_signing_key,
    new_kid,
)
from server.config import ConfigError, load_config
from server.identity import Identity
from tests.conftest import REPO_ROOT, request
from tests.test_auth import bearer, expect_code, start_authed_gateway


async def test_rotation_old_tokens_work_until_expiry_new_tokens_use_the_new_key(
    tmp_path: Path,
) -> None:
    running = await start_authed_gateway(tmp_path, leeway_s=0)
    try:
        _, key = running.create_key("rotating")
        old_kid = running.signing_key()[0]
        old_short = (await running.issue(key, lifetime=2)).token
        old_long = (await running.issue(key)).token
        assert jwt.get_unverified_header(old_short)["kid"] == old_kid

        # What `python -m server keys rotate-signing-key` does; the gateway
        # notices within its reload interval, here at once.
        new = create_signing_key(running.config.auth.signing_keys_dir)
        await running.gateway.auth.ring.reload()  # type: ignore[union-attr]

        fresh = (await running.issue(key)).token
        assert jwt.get_unverified_header(fresh)["kid"] == new != old_kid
        for token in (old_short, old_long, fresh):  # no downtime: all three work
            await running.stub.Generate(request(), metadata=bearer(token))

        await asyncio.sleep(3.1)  # the short old token expires...
        await expect_code(
            grpc.StatusCode.UNAUTHENTICATED,
            running.stub.Generate(request(), metadata=bearer(old_short)),
        )
        # ...while the long one still works until the old key is retired.
        await running.stub.Generate(request(), metadata=bearer(old_long))
        (running.config.auth.signing_keys_dir / f"{old_kid}.pem").unlink()
        await running.gateway.auth.ring.reload()  # type: ignore[union-attr]
        await expect_code(
            grpc.StatusCode.UNAUTHENTICATED,
            running.stub.Generate(request(), metadata=bearer(old_long)),
        )
        await running.stub.Generate(request(), metadata=bearer(fresh))
    finally:
        await running.close()


async def test_rotate_signing_key_command(tmp_path: Path) -> None:
    env = {
        "LLMGW_AUTH__SIGNING_KEYS_DIR": str(tmp_path / "signing"),
        "LLMGW_AUTH__KEY_STORE": str(tmp_path / "keys.sqlite3"),
        "LLMGW_AUTH__SECRET_FILE": str(tmp_path / "secret"),
    }
    kids = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "keys",
            "rotate-signing-key",
            cwd=REPO_ROOT,
            env={**env, "PATH": ""},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        kids.append(out.decode().strip())
    assert sorted(kids) == kids and kids[0] != kids[1]
    ring = SigningKeyRing(tmp_path / "signing")
    ring.load()
    assert ring.kids == kids
    assert ring.signer is not None and ring.signer.kid == kids[1]  # the newest signs


def _identity() -> Identity:
    return Identity(key_id="abc123abc123", scopes=frozenset({"generate"}))


async def test_ring_picks_up_a_new_key_in_the_background(tmp_path: Path) -> None:
    first = create_signing_key(tmp_path)
    ring = SigningKeyRing(tmp_path, reload_interval=0.05)
    ring.load()
    assert ring.signer is not None and ring.signer.kid == first
    second = create_signing_key(tmp_path)
    await asyncio.sleep(0.1)
    ring.refresh_if_due()
    for _ in range(50):
        if ring.signer is not None and ring.signer.kid == second:
            break
        await asyncio.sleep(0.02)
    assert ring.signer is not None and ring.signer.kid == second
    assert ring.public_key(first) is not None  # still verifies


async def test_pinned_signing_key(tmp_path: Path) -> None:
    first = create_signing_key(tmp_path)
    create_signing_key(tmp_path)
    ring = SigningKeyRing(tmp_path, pinned_kid=first)
    ring.load()
    assert ring.signer is not None and ring.signer.kid == first


async def test_leeway_tolerates_small_skew_only(tmp_path: Path) -> None:
    create_signing_key(tmp_path)
    ring = SigningKeyRing(tmp_path)
    ring.load()
    now = time.time()
    late = TokenIssuer(ring, issuer="i", audience="a", ttl=5, clock=lambda: now - 35)
    token = (await late.issue(_identity())).token  # expired ~30 s ago
    assert TokenVerifier(ring, issuer="i", audience="a", leeway=60).verify(token)
    with pytest.raises(TokenRejectedError) as rejected:
        TokenVerifier(ring, issuer="i", audience="a", leeway=0).verify(token)
    assert rejected.value.reason == "expired"


def test_leeway_above_a_minute_is_refused_by_config() -> None:
    with pytest.raises(ConfigError, match=r"auth\.leeway_s"):
        load_config(environ={}, overrides={"auth.leeway_s": 120})


def test_kids_sort_by_creation_time() -> None:
    kids = [new_kid(1_700_000_000 + i / 1000) for i in range(5)]
    assert sorted(kids) == kids


async def test_no_signing_key_means_no_token_and_no_valid_token(tmp_path: Path) -> None:
    ring = SigningKeyRing(tmp_path / "missing")
    ring.load()
    issuer = TokenIssuer(ring, issuer="i", audience="a", ttl=60)
    from server.auth.tokens import NoSigningKeyError

    with pytest.raises(NoSigningKeyError):
        await issuer.issue(_identity())
