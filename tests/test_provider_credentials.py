"""The SDK-backed providers read their API key through a refreshable credential source.

A key from a file, a command or the environment is what reaches the
upstream; a rotated key is sent once the source's TTL has passed, and at
once after the upstream refused the old one, all without a restart; and
no key ever reaches a log line or a caller.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import grpc
import openai
import pytest
from google.rpc import error_details_pb2

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import ConfigError, load_config
from server.providers._upstream import KeyedClient
from server.routing import Router, build_providers
from tests.conftest import RunningGateway, detail, rich_status, started
from tests.fake_upstream import FakeUpstream, Reply
from tests.upstream_fixtures import ask

PROVIDERS = ["anthropic", "openai"]
MODEL = {"anthropic": "claude-cred", "openai": "gpt-cred"}
OLD_KEY = "sk-rotating-old-Hq39-never-log-me"
NEW_KEY = "sk-rotating-new-Vb72-never-log-me"
KEY_ENV = "UPSTREAM_TEST_ROTATING_KEY"
TTL_S = 0.2

GatewayFactory = Callable[[str, dict[str, Any]], Awaitable[pb_grpc.GenerationServiceStub]]


def key_sent(fake: FakeUpstream) -> str:
    """The API key the last upstream request carried."""
    headers = fake.last().headers
    if "x-api-key" in headers:
        return headers["x-api-key"]
    return headers["authorization"].removeprefix("Bearer ")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def assert_no_key_in(error: grpc.aio.AioRpcError) -> None:
    wire = bytes(rich_status(error).SerializeToString()) + (error.details() or "").encode()
    assert OLD_KEY.encode() not in wire
    assert NEW_KEY.encode() not in wire


@pytest.fixture
async def make_gateway(fake: FakeUpstream) -> AsyncIterator[GatewayFactory]:
    """Builds a gateway with one provider of a kind, its key settings given; stopped after."""
    running: list[RunningGateway] = []

    async def make(kind: str, key_settings: dict[str, Any]) -> pb_grpc.GenerationServiceStub:
        base_url = fake.anthropic_url if kind == "anthropic" else fake.openai_url
        config = load_config(
            environ={},
            overrides={
                "server.host": "127.0.0.1",
                "server.port": 0,
                "http.port": 0,
                "server.coalesce_stream_deltas": False,
                "auth.enabled": False,
                "providers": {
                    kind: {
                        "type": kind,
                        "base_url": base_url,
                        "models": [{"id": MODEL[kind]}],
                        **key_settings,
                    }
                },
                # One attempt: each call below is one upstream request.
                "routing": {"retry": {"max_attempts": 1}, "breaker": {"enabled": False}},
            },
        )
        running.append(await started(Gateway(config, router=Router.from_config(config))))
        return running[-1].stub

    yield make
    for gw in running:
        await gw.aclose()


def rotating_source(
    kind: str, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], Callable[[str], None]]:
    """Key settings of a kind, and a function that rotates the key they hold."""
    if kind == "env":
        monkeypatch.setenv(KEY_ENV, OLD_KEY)
        return {"api_key_env": KEY_ENV}, lambda key: monkeypatch.setenv(KEY_ENV, key)
    key_file.write_text(OLD_KEY + "\n")
    if kind == "file":
        settings: dict[str, Any] = {"api_key_file": str(key_file)}
    else:
        script = "import sys; print(open(sys.argv[1]).read().strip())"
        settings = {"api_key_command": [sys.executable, "-c", script, str(key_file)]}
    return settings, lambda key: key_file.write_text(key + "\n")


@pytest.mark.parametrize("source", ["file", "command", "env"])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_rotated_key_is_sent_once_the_ttl_has_passed(
    make_gateway: GatewayFactory,
    fake: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    provider: str,
    source: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings, rotate = rotating_source(source, tmp_path / "key", monkeypatch)
    stub = await make_gateway(provider, {**settings, "api_key_ttl_s": TTL_S})
    await stub.Generate(ask(MODEL[provider], "Hi"))
    assert key_sent(fake) == OLD_KEY

    # (tests/test_credentials.py checks that a key is held for its TTL.)
    rotate(NEW_KEY)
    await asyncio.sleep(TTL_S * 1.5)
    await stub.Generate(ask(MODEL[provider], "Hi"))
    assert key_sent(fake) == NEW_KEY  # no restart
    assert OLD_KEY not in caplog.text
    assert NEW_KEY not in caplog.text


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refused_key_is_re_read_by_the_next_call(
    make_gateway: GatewayFactory,
    fake: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    provider: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "key"
    key_file.write_text(OLD_KEY)
    # A TTL far longer than the test: only the 401 makes the provider re-read.
    stub = await make_gateway(provider, {"api_key_file": str(key_file), "api_key_ttl_s": 3600})
    await stub.Generate(ask(MODEL[provider], "Hi"))
    key_file.write_text(NEW_KEY)

    # An upstream that quotes the refused key back must not leak it either.
    fake.enqueue(Reply(status=401, error_message=f"invalid key {OLD_KEY}"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(ask(MODEL[provider], "Hi"))
    assert key_sent(fake) == OLD_KEY
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(caught.value).reason == "UPSTREAM_AUTH_FAILED"
    assert_no_key_in(caught.value)

    await stub.Generate(ask(MODEL[provider], "Hi"))
    assert key_sent(fake) == NEW_KEY
    await stub.Generate(ask(MODEL[provider], "Hi"))
    assert key_sent(fake) == NEW_KEY
    assert len(fake.requests) == 4
    assert OLD_KEY not in caplog.text
    assert NEW_KEY not in caplog.text


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_key_that_cannot_be_read_fails_the_call_as_internal(
    make_gateway: GatewayFactory,
    fake: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    provider: str,
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(OLD_KEY)
    stub = await make_gateway(provider, {"api_key_file": str(key_file)})
    key_file.unlink()  # after start-up, before the first call read it
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(ask(MODEL[provider], "Hi"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert error_info(caught.value).reason == "UPSTREAM_CREDENTIAL_UNAVAILABLE"
    assert str(key_file) not in (caught.value.details() or "")  # only the log says where
    assert str(key_file) in caplog.text
    assert OLD_KEY not in caplog.text
    assert fake.requests == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"api_key_file": "/nonexistent/key"},
            "providers.x.api_key_file: Value error, cannot read",
        ),
        ({"api_key_command": ["/nonexistent/vault"]}, "providers.x.api_key_command: Value error"),
        ({"api_key_command": []}, "providers.x.api_key_command"),
        ({"api_key_env": "UPSTREAM_TEST_UNSET_VARIABLE"}, "providers.x.api_key: Value error"),
        (
            {"api_key": "k", "api_key_env": "HOME"},
            "providers.x.api_key: Value error, give one source for the API key,"
            " not both api_key_env and api_key",
        ),
        (
            {"api_key_env": "HOME", "api_key_file": "/etc/hostname"},
            "providers.x.api_key_file: Value error, give one source",
        ),
        ({"api_key_env": "HOME", "api_key_ttl_s": 0}, "providers.x.api_key_ttl_s"),
    ],
)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_usable_key_source_fails_at_start_up_naming_the_key(
    tmp_path: Path, provider: str, settings: dict[str, Any], message: str
) -> None:
    config = load_config(environ={}, overrides={"providers": {"x": {"type": provider, **settings}}})
    with pytest.raises(ConfigError) as caught:
        build_providers(config)
    assert message in str(caught.value)


async def test_an_empty_key_file_fails_at_start_up(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("\n")
    config = load_config(
        environ={},
        overrides={"providers": {"x": {"type": "anthropic", "api_key_file": str(key_file)}}},
    )
    with pytest.raises(ConfigError, match=r"providers\.x\.api_key_file: .* is empty"):
        build_providers(config)


@pytest.mark.parametrize("sdk_class", [anthropic.AsyncAnthropic, openai.AsyncOpenAI])
async def test_a_new_key_reuses_the_sdk_clients_connection_pool(sdk_class: Any) -> None:
    """What KeyedClient relies on in both SDKs: `with_options` shares the HTTP client."""
    key = {"value": OLD_KEY}

    class Source:
        async def get(self) -> str:
            return key["value"]

        def invalidate(self) -> None:
            pass

    base = sdk_class(api_key="placeholder", base_url="http://127.0.0.1:9/v1", max_retries=0)
    keyed = KeyedClient("p", base, Source())
    try:
        first = await keyed.current()
        assert await keyed.current() is first  # unchanged key: no new client
        key["value"] = NEW_KEY
        second = await keyed.current()
        assert second is not first
        assert second.api_key == NEW_KEY
        assert second._client is first._client is base._client
        assert str(second.base_url) == str(base.base_url)
        assert second.max_retries == 0
    finally:
        await keyed.aclose()
    assert base._client.is_closed
