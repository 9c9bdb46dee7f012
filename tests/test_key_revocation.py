"""Key changes reach every gateway process at once through a real Redis.

A second gateway, a real `python -m server` process sharing the key store
and the Redis of the in-process one, caches key records for 60 s; a
revocation, rotation or update made through KeyService (or `keys revoke` on
the command line) must be refused there within a second or two, which only
the published message can do. And a Redis that is down stops nothing:
authentication goes on, the change holds in the process that made it, the
failure is logged once, and the listener comes back with Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from llmgateway.v1 import keys_pb2 as pb
from llmgateway.v1 import keys_pb2_grpc, token_pb2_grpc
from server.app import Gateway
from server.auth.cli import create_key, run_keys_command
from server.auth.keys import KeyStore
from server.auth.revocation import KeyChangeFeed, channel_of
from server.config import load_config
from tests.conftest import REPO_ROOT, TEST_CONFIG, free_port, request, start_server_process
from tests.redis_fixtures import RedisServer, _start_redis, redis_server
from tests.test_auth import AuthedGateway, bearer
from tests.test_key_service import mask

CACHE_TTL_S = 60
# Far inside the cache TTL: only the published change can be this quick.
AT_ONCE_S = 3.0
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


async def code_of(stub: pb_grpc.GenerationServiceStub, secret: str, model: str = "echo") -> Any:
    try:
        await stub.Generate(request(model=model), metadata=bearer(secret), timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return OK


async def becomes(expected: Any, probe: Callable[[], Awaitable[Any]], within: float) -> float:
    """Seconds until `probe()` returns `expected` (fails the test after `within`)."""
    started = time.monotonic()
    while True:
        got = await probe()
        elapsed = time.monotonic() - started
        if got == expected:
            return elapsed
        assert elapsed < within, f"still {got} after {elapsed:.1f} s (wanted {expected})"
        await asyncio.sleep(0.05)


async def subscribers(url: str, channel: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(channel)
        return int(count)
    finally:
        await client.aclose()


@asynccontextmanager
async def authed_with_redis(
    directory: Path, redis_url: str, key_store: Path | str | None = None
) -> AsyncIterator[AuthedGateway]:
    """An in-process gateway with auth on (records cached 60 s) and the shared Redis;
    its keys in `key_store` (an SQLite file in `directory` by default)."""
    overrides = {key: value for key, value in TEST_CONFIG.items() if not key.startswith("auth.")}
    overrides.update(
        {
            "auth.key_store": str(key_store or directory / "keys.sqlite3"),
            "auth.secret_file": str(directory / "key-secret"),
            "auth.signing_keys_dir": str(directory / "signing-keys"),
            "auth.cache_ttl_s": CACHE_TTL_S,
            "redis.url": redis_url,
            "redis.timeout_s": 2.0,
        }
    )
    config = load_config(environ={}, overrides=overrides)
    create_key(config.auth, name="bootstrap")  # the secret and the signing key
    gateway = Gateway(config)
    port = await gateway.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    running = AuthedGateway(
        gateway,
        config,
        address,
        channel,
        pb_grpc.GenerationServiceStub(channel),
        token_pb2_grpc.TokenServiceStub(channel),
    )
    try:
        yield running
    finally:
        await running.close()


def process_env(gateway: AuthedGateway, redis_url: str) -> dict[str, str]:
    auth = gateway.config.auth
    return {
        "LLMGW_AUTH__ENABLED": "true",
        "LLMGW_AUTH__KEY_STORE": str(auth.key_store),
        "LLMGW_AUTH__SECRET_FILE": str(auth.secret_file),
        "LLMGW_AUTH__SIGNING_KEYS_DIR": str(auth.signing_keys_dir),
        "LLMGW_AUTH__CACHE_TTL_S": str(CACHE_TTL_S),
        "LLMGW_REDIS__URL": redis_url,
        "LLMGW_REDIS__TIMEOUT_S": "2",
        "LLMGW_LEDGER__ENABLED": "false",
    }


async def test_a_second_gateway_process_refuses_a_revoked_key_at_once(
    tmp_path: Path, key_store_location: Path | str
) -> None:
    """Two replicas sharing one key store, SQLite (one host) or PostgreSQL."""
    async with (
        redis_server(tmp_path) as redis,
        authed_with_redis(tmp_path / "one", redis.url, key_store_location) as one,
    ):
        assert one.gateway.key_changes is not None
        other = await start_server_process(env=process_env(one, redis.url))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
        try:
            elsewhere = pb_grpc.GenerationServiceStub(channel)
            keys = keys_pb2_grpc.KeyServiceStub(one.channel)
            admin = {"metadata": bearer(one.create_key("root", scopes=("admin",))[1])}
            channel_name = channel_of(one.config.redis)
            await becomes(2, lambda: subscribers(redis.url, channel_name), within=10)

            # Revoked: the key and its token, both cached as valid over there.
            revoked = await keys.CreateKey(pb.CreateKeyRequest(name="leaked"), **admin)
            token = (await one.issue(revoked.secret)).token
            for credential in (revoked.secret, token):
                assert await code_of(elsewhere, credential) == OK
            await keys.RevokeKey(pb.RevokeKeyRequest(key_id=revoked.key.id), **admin)
            for credential in (revoked.secret, token):
                await becomes(
                    UNAUTHENTICATED, lambda c=credential: code_of(elsewhere, c), AT_ONCE_S
                )

            # Rotated without grace: the old secret is refused over there too.
            rotating = await keys.CreateKey(pb.CreateKeyRequest(name="rotating"), **admin)
            assert await code_of(elsewhere, rotating.secret) == OK
            rotated = await keys.RotateKey(
                pb.RotateKeyRequest(key_id=rotating.key.id, grace_period={}), **admin
            )
            await becomes(UNAUTHENTICATED, lambda: code_of(elsewhere, rotating.secret), AT_ONCE_S)
            assert await code_of(elsewhere, rotated.secret) == OK

            # Updated: a model taken away is refused over there.
            narrowing = await keys.CreateKey(
                pb.CreateKeyRequest(name="narrowing", models=["echo", "tiny"]), **admin
            )
            assert await code_of(elsewhere, narrowing.secret, "echo") == OK
            await keys.UpdateKey(
                pb.UpdateKeyRequest(
                    key=pb.ApiKey(id=narrowing.key.id, models=["tiny"]), update_mask=mask("models")
                ),
                **admin,
            )
            await becomes(
                PERMISSION_DENIED, lambda: code_of(elsewhere, narrowing.secret, "echo"), AT_ONCE_S
            )
        finally:
            await channel.close()
            other.process.terminate()
            await other.process.wait()


async def test_keys_revoke_on_the_command_line_is_announced(tmp_path: Path) -> None:
    async with (
        redis_server(tmp_path) as redis,
        authed_with_redis(tmp_path / "one", redis.url) as one,
    ):
        feed = one.gateway.key_changes
        assert feed is not None
        await asyncio.wait_for(feed.subscribed.wait(), 10)
        key_id, key = one.create_key("svc")
        assert await code_of(one.stub, key) == OK  # cached as valid for 60 s
        env = {
            **os.environ,
            **process_env(one, redis.url),
        }
        revoke = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "keys",
            "revoke",
            key_id,
            cwd=REPO_ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await revoke.communicate()
        assert revoke.returncode == 0, err.decode()
        await becomes(UNAUTHENTICATED, lambda: code_of(one.stub, key), AT_ONCE_S)


async def test_a_dead_redis_stops_nothing_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there yet
    url = f"redis://127.0.0.1:{port}/0"
    caplog.set_level(logging.INFO, logger="server.auth.revocation")
    async with authed_with_redis(tmp_path / "one", url) as one:
        feed = one.gateway.key_changes
        assert feed is not None
        keys = keys_pb2_grpc.KeyServiceStub(one.channel)
        admin = {"metadata": bearer(one.create_key("root", scopes=("admin",))[1])}
        for name in ("first", "second"):
            created = await keys.CreateKey(pb.CreateKeyRequest(name=name), **admin)
            assert await code_of(one.stub, created.secret) == OK
            started = time.monotonic()
            await keys.RevokeKey(pb.RevokeKeyRequest(key_id=created.key.id), **admin)
            assert time.monotonic() - started < 2, "the revocation waited on the dead Redis"
            assert await code_of(one.stub, created.secret) == UNAUTHENTICATED  # here: at once
        await asyncio.sleep(0.5)  # a few reconnection attempts
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("cannot publish" in w for w in warnings) == 1, warnings
        assert sum("not listening" in w for w in warnings) == 1, warnings
        assert not feed.subscribed.is_set()

        # Redis comes up: the listener subscribes within its backoff (at most 5 s).
        folder = tmp_path / "redis"
        folder.mkdir()
        server = RedisServer(port, await _start_redis(port, folder), folder)
        try:
            await asyncio.wait_for(feed.subscribed.wait(), 10)
            assert any(
                "listening for key changes on Redis again" in r.getMessage() for r in caplog.records
            )
            key_id, key = one.create_key("after")
            assert await code_of(one.stub, key) == OK
            # As another process would: the store changes, then the message
            # drops this process's cached record (60 s TTL) at once.
            assert KeyStore(one.config.auth.key_store).revoke(key_id)
            assert await feed.publish(key_id, "revoked")
            await becomes(UNAUTHENTICATED, lambda: code_of(one.stub, key), AT_ONCE_S)
        finally:
            await server.stop()


async def test_a_lookup_overtaken_by_a_change_is_not_cached(tmp_path: Path) -> None:
    """A record read just before another process's change was announced must not
    stay cached for the TTL after the announcement dropped it."""
    config = load_config(
        environ={},
        overrides={
            "auth.key_store": str(tmp_path / "keys.sqlite3"),
            "auth.secret_file": str(tmp_path / "key-secret"),
            "auth.signing_keys_dir": str(tmp_path / "signing-keys"),
        },
    )
    record, _ = create_key(config.auth, name="svc")
    store = KeyStore(config.auth.key_store, cache_ttl=CACHE_TTL_S)
    reading, announced = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    lookup = store.lookup

    def slow_lookup(key_id: str) -> Any:
        found = lookup(key_id)  # the record before the change
        loop.call_soon_threadsafe(reading.set)
        asyncio.run_coroutine_threadsafe(announced.wait(), loop).result(10)
        return found

    store.lookup = slow_lookup  # type: ignore[method-assign]
    getting = asyncio.create_task(store.get(record.id))
    await reading.wait()
    assert KeyStore(config.auth.key_store).revoke(record.id)  # elsewhere
    store.forget(record.id)  # the announcement
    announced.set()
    stale = await getting
    assert stale is not None and not stale.revoked  # that call began before the change
    store.lookup = lookup  # type: ignore[method-assign]
    fresh = await store.get(record.id)
    assert fresh is not None and fresh.revoked


async def test_a_malformed_message_is_ignored(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as redis:
        forgotten: list[str | None] = []
        config = load_config(environ={}, overrides={"redis.url": redis.url}).redis
        feed = KeyChangeFeed(config, forgotten.append)
        feed.start()
        try:
            await asyncio.wait_for(feed.subscribed.wait(), 10)
            assert forgotten == [None]  # subscribing drops everything cached
            client = aioredis.Redis.from_url(redis.url)
            try:
                for garbage in ("", "{", '{"key_id": 5}', '{"key_id": "../etc"}', "[]"):
                    await client.publish(channel_of(config), garbage)
            finally:
                await client.aclose()
            assert await feed.publish("0123456789ab", "updated")
            await becomes(2, lambda: asyncio.sleep(0, len(forgotten)), within=AT_ONCE_S)
            assert forgotten == [None, "0123456789ab"] and feed.received == 1
        finally:
            await feed.aclose()


async def test_keys_revoke_and_rotate_say_how_the_gateways_learn_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At once when published on Redis; within auth.cache_ttl_s, saying why, when
    no Redis is configured or the publish failed."""
    base = {
        "LLMGW_AUTH__KEY_STORE": str(tmp_path / "keys.sqlite3"),
        "LLMGW_AUTH__SECRET_FILE": str(tmp_path / "key-secret"),
        "LLMGW_AUTH__SIGNING_KEYS_DIR": str(tmp_path / "signing-keys"),
        "LLMGW_AUTH__CACHE_TTL_S": "7",
    }
    async with redis_server(tmp_path) as redis:
        cases = {
            "up": ({**base, "LLMGW_REDIS__URL": redis.url}, "published on Redis"),
            "none": (base, "No Redis is configured"),
            "down": (
                {
                    **base,
                    "LLMGW_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
                    "LLMGW_REDIS__TIMEOUT_S": "1",
                },
                "Publishing the change on Redis failed",
            ),
        }
        for case, (environ, expected) in cases.items():
            config = load_config(environ=environ)
            for command in ("rotate", "revoke"):
                key_id = create_key(config.auth, name=f"{case}-{command}")[0].id
                args = argparse.Namespace(
                    keys_command=command, id=key_id, grace="1h", expires_in=None
                )
                capsys.readouterr()
                assert run_keys_command(args, config) == 0
                said = capsys.readouterr().err
                assert expected in said, (case, command, said)
                if case == "up":
                    assert "at once" in said and "within auth.cache_ttl_s (7 s)" in said
                else:
                    assert "at once" not in said and "published" not in said, (case, said)
                    assert "gateways see" in said and "within auth.cache_ttl_s (7 s)" in said
