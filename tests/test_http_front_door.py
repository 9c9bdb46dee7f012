"""The HTTP front door on the gateway's core, driven by the official `anthropic` SDK and httpx2.

What the Messages protocol tests (tests/test_http_messages.py) leave out:
keys and tokens in either header, one 401 for every failed credential and
the 403s; the gateway's own error statuses in Anthropic's error shape; the
usage ledger's rows for HTTP calls (edge, end user, refusals, a client that
went away); count_tokens; the `/anthropic` prefix; traces and metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import MessageParam
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llmgateway.v1 import token_pb2, token_pb2_grpc
from server.app import Gateway
from server.auth.cli import create_key
from server.auth.keys import KeyStore
from server.config import GatewayConfig, load_config
from server.identity import KeyLimits
from server.schema import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES
from server.token_estimate import count_text
from tests.anthropic_grammar import check_anthropic_stream
from tests.conftest import RunningGateway, request, started
from tests.fake_upstream import FakeUpstream, Reply, Text, Usage
from tests.http_fixtures import (
    SentLog,
    base_url,
    front_door_providers,
    sdk_client,
    start_front_door,
)
from tests.test_ledger import ledger_rows
from tests.test_metrics import samples, scrape, value
from tests.test_tracing import PARENT_SPAN_ID, TRACE_ID, in_memory_provider
from tests.upstream_fixtures import SINGLE_ATTEMPT

SAME_NAME = "claude-sonnet-5-5"  # its upstream id is its own: bodies compare byte for byte
HELLO: list[MessageParam] = [{"role": "user", "content": "hello there"}]
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
# claude-test's prices (tests/upstream_fixtures.py), in nanodollars per token.
INPUT_NANOS, OUTPUT_NANOS = 3_000, 15_000


def key_client(
    url: str, credential: str, header: str = "authorization", sent: SentLog | None = None
) -> anthropic.AsyncAnthropic:
    """The SDK with `credential` in one header.

    This SDK sends its api_key (and its auth_token) as `Authorization: Bearer`;
    `x-api-key`, what Claude Code and older SDKs send, goes as a default header.
    """
    hooks = {"request": [sent.hook]} if sent is not None else {}
    bearer = header == "authorization"
    return anthropic.AsyncAnthropic(
        base_url=url,
        api_key=credential if bearer else None,
        default_headers={} if bearer else {"x-api-key": credential},
        max_retries=0,
        http_client=httpx2.AsyncClient(event_hooks=hooks),
    )


async def post(url: str, path: str, body: bytes, **headers: str) -> httpx2.Response:
    async with httpx2.AsyncClient() as client:
        return await client.post(
            url + path,
            content=body,
            headers={
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
                **headers,
            },
            timeout=30,
        )


def message_body(model: str = "echo", **fields: Any) -> bytes:
    return json.dumps({"model": model, "max_tokens": 20, "messages": HELLO, **fields}).encode()


def gateway_error(response: httpx2.Response, status: int, error_type: str) -> str:
    """Checks an answer is the gateway's own error in Anthropic's shape; returns its message."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    document = response.json()
    assert set(document) == {"type", "error", "request_id"}
    assert document["type"] == "error"
    assert document["error"]["type"] == error_type
    assert document["request_id"] and document["request_id"] == response.headers["request-id"]
    message = document["error"]["message"]
    assert isinstance(message, str) and message
    return message


async def ledger_row(gateway: RunningGateway, request_id: str) -> dict[str, Any]:
    """The ledger row of a call, once the ledger's writer has flushed it."""
    path = Path(gateway.gateway.config.ledger.path or "")
    for _ in range(100):
        await asyncio.sleep(0.05)
        if await asyncio.to_thread(path.exists):
            row = (await asyncio.to_thread(ledger_rows, path)).get(request_id)
            if row is not None:
                return row
    raise AssertionError(f"no ledger row for request {request_id}")


def rid(name: str) -> str:
    """A request id unique to this run (ledger rows are looked up by it)."""
    return f"{name}-{os.urandom(4).hex()}"


# -- gateways --------------------------------------------------------------------------


@dataclass
class AuthedDoor:
    gateway: RunningGateway
    url: str
    keys: dict[str, str]  # name -> the key
    key_ids: dict[str, str]


# Keys made before the gateway starts (the first one makes the secret and signing key).
KEY_SPECS: dict[str, dict[str, Any]] = {
    "full": {},
    "echo_only": {"models": ("echo",)},
    "admin_only": {"scopes": ("admin",)},
    "two_per_minute": {"limits": KeyLimits(requests_per_minute=2)},
    "revoked": {},
}


@pytest.fixture(scope="module")
async def authed_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AuthedDoor]:
    directory = tmp_path_factory.mktemp("front-door-auth")
    auth = {
        "auth.enabled": True,
        "auth.key_store": str(directory / "keys.sqlite3"),
        "auth.secret_file": str(directory / "key-secret"),
        "auth.signing_keys_dir": str(directory / "signing-keys"),
    }
    config = load_config(environ={}, overrides={"server.host": "127.0.0.1", **auth}).auth
    keys, key_ids = {}, {}
    for name, spec in KEY_SPECS.items():
        record, keys[name] = create_key(config, name=name, **spec)
        key_ids[name] = record.id
    assert KeyStore(config.key_store).revoke(key_ids["revoked"])
    gateway = await start_front_door(fake_upstream, directory, **auth)
    yield AuthedDoor(gateway, base_url(gateway), keys, key_ids)
    await gateway.aclose()


@pytest.fixture(scope="module")
async def small_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    """A 1 KiB body limit, and a daily budget of 1,000 nanodollars (echo is free)."""
    limits = {"http.max_body_bytes": 1024, "budgets.default.daily_usd": 1e-6}
    gateway = await start_front_door(fake_upstream, tmp_path_factory.mktemp("small"), **limits)
    yield base_url(gateway)
    await gateway.aclose()


@pytest.fixture(scope="module")
async def retrying_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    """Two attempts per call, no breaker."""
    routing = {
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02},
        "breaker": {"enabled": False},
    }
    gateway = await start_front_door(
        fake_upstream, tmp_path_factory.mktemp("retrying"), routing=routing
    )
    yield base_url(gateway)
    await gateway.aclose()


def observed_config(fake: FakeUpstream, tmp: Path) -> GatewayConfig:
    """start_front_door's configuration, with metrics on (it takes no tracer provider)."""
    return load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": front_door_providers(fake),
            "routing": SINGLE_ATTEMPT,
            "ledger.path": str(tmp / "usage.sqlite3"),
            "metrics.enabled": True,
            "metrics.port": 0,
        },
    )


@pytest.fixture(scope="module")
async def observed_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[RunningGateway, InMemorySpanExporter]]:
    provider, exporter = in_memory_provider()
    config = observed_config(fake_upstream, tmp_path_factory.mktemp("observed"))
    gateway = await started(Gateway(config, tracer_provider=provider))
    yield gateway, exporter
    await gateway.aclose()


# -- auth: keys and tokens in either header -------------------------------------------


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
async def test_a_gateway_key_in_either_header(authed_door: AuthedDoor, header: str) -> None:
    sent = SentLog()
    key = authed_door.keys["full"]
    client = key_client(authed_door.url, key, header, sent)
    message = await client.messages.create(model="echo", max_tokens=20, messages=HELLO)
    assert message.content[0].text == "hello there"  # type: ignore[union-attr]
    assert message._request_id
    # The SDK sent exactly one credential, in the header under test.
    other = "authorization" if header == "x-api-key" else "x-api-key"
    assert sent.last.headers[header] in (key, f"Bearer {key}")
    assert other not in sent.last.headers


async def issue_token(door: AuthedDoor, key: str) -> str:
    tokens = token_pb2_grpc.TokenServiceStub(door.gateway.channel)
    issued = await tokens.IssueToken(
        token_pb2.IssueTokenRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=10
    )
    return str(issued.token)


@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
async def test_a_token_in_either_header(authed_door: AuthedDoor, header: str) -> None:
    token = await issue_token(authed_door, authed_door.keys["full"])
    assert not token.startswith("llmgw_")
    client = key_client(authed_door.url, token, header)
    async with client.messages.stream(model="echo", max_tokens=20, messages=HELLO) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "hello there"  # type: ignore[union-attr]


async def test_every_credential_failure_is_the_same_401(authed_door: AuthedDoor) -> None:
    full, echo_only = authed_door.keys["full"], authed_door.keys["echo_only"]
    token = await issue_token(authed_door, full)
    failures = {
        "missing": {},
        "not a key": {"x-api-key": "not-a-gateway-key"},
        "wrong secret": {"x-api-key": full[:-4] + ("0000" if full[-4:] != "0000" else "1111")},
        "revoked": {"x-api-key": authed_door.keys["revoked"]},
        "not bearer": {"authorization": f"Basic {full}"},
        "two keys": {"x-api-key": full, "authorization": f"Bearer {echo_only}"},
        "key and token": {"x-api-key": full, "authorization": f"Bearer {token}"},
        "forged token": {"authorization": f"Bearer {token[:-6]}AAAAAA"},
    }
    messages = set()
    for headers in failures.values():
        response = await post(authed_door.url, "/v1/messages", message_body(), **headers)
        messages.add(gateway_error(response, 401, "authentication_error"))
    assert len(messages) == 1, messages
    # The SDK raises its own class, for one header and for two that disagree.
    two = anthropic.AsyncAnthropic(
        base_url=authed_door.url, api_key=full, default_headers={"x-api-key": echo_only}
    )
    for client in (key_client(authed_door.url, "llmgw_000000000000_nope"), two):
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await client.messages.create(model="echo", max_tokens=20, messages=HELLO)
        assert refused.value.status_code == 401 and refused.value.request_id


async def test_a_model_outside_the_keys_allow_list_is_a_403(authed_door: AuthedDoor) -> None:
    client = key_client(authed_door.url, authed_door.keys["echo_only"], "x-api-key")
    assert (await client.messages.create(model="echo", max_tokens=20, messages=HELLO)).content
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await client.messages.create(model="claude-test", max_tokens=20, messages=HELLO)
    assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert "claude-test" in refused.value.message


async def test_a_key_without_the_generate_scope_is_a_403(authed_door: AuthedDoor) -> None:
    response = await post(
        authed_door.url,
        "/v1/messages",
        message_body(),
        **{"x-api-key": authed_door.keys["admin_only"]},
    )
    gateway_error(response, 403, "permission_error")
    client = key_client(authed_door.url, authed_door.keys["admin_only"])
    with pytest.raises(anthropic.PermissionDeniedError):
        await client.messages.create(model="echo", max_tokens=20, messages=HELLO)


async def test_health_endpoints_answer_without_credentials(authed_door: AuthedDoor) -> None:
    async with httpx2.AsyncClient(base_url=authed_door.url, timeout=10) as client:
        for path in ("/healthz", "/readyz", "/anthropic/health"):
            response = await client.get(path)
            assert (response.status_code, response.json()) == (200, {"status": "ok"}), path
        for path in ("/", "/api/hello"):
            response = await client.head(path)
            assert response.status_code == 200 and response.content == b"", path
        anthropic_client = {"anthropic-version": "2023-06-01"}
        gateway_error(
            await client.get("/v1/models", headers=anthropic_client), 401, "authentication_error"
        )
        # Without `anthropic-version` the client is taken for an OpenAI one.
        response = await client.get("/v1/models")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


async def test_models_lists_what_the_key_may_use(authed_door: AuthedDoor) -> None:
    listed = await key_client(authed_door.url, authed_door.keys["full"]).models.list()
    ids = [m.id for m in listed.data]
    assert {"echo", "claude-test", "gpt-test", SAME_NAME} <= set(ids)
    assert all(m.type == "model" and m.display_name and m.created_at for m in listed.data)
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{authed_door.url}/v1/models", headers={"x-api-key": authed_door.keys["echo_only"]}
        )
    assert response.status_code == 200
    document = response.json()
    assert [m["id"] for m in document["data"]] == ["echo"]
    [echo] = document["data"]
    assert (echo["type"], echo["display_name"]) == ("model", "Echo (offline)")
    assert isinstance(echo["created_at"], str) and echo["created_at"].endswith("Z")
    assert (document["has_more"], document["first_id"], document["last_id"]) == (
        False,
        "echo",
        "echo",
    )


async def test_a_keys_requests_per_minute_limit_is_a_429_recorded_in_the_ledger(
    authed_door: AuthedDoor,
) -> None:
    key = {"x-api-key": authed_door.keys["two_per_minute"]}
    for _ in range(2):
        assert (
            await post(authed_door.url, "/v1/messages", message_body(), **key)
        ).status_code == 200
    refused_id = rid("rpm")
    response = await post(
        authed_door.url, "/v1/messages", message_body(), **key, **{"x-request-id": refused_id}
    )
    gateway_error(response, 429, "rate_limit_error")
    assert 1 <= int(response.headers["retry-after"]) <= 61
    assert response.headers.get("x-should-retry") != "false"  # retrying later helps
    row = await ledger_row(authed_door.gateway, refused_id)
    assert (row["status"], row["edge"], row["method"]) == (
        "RESOURCE_EXHAUSTED",
        "http",
        "anthropic.messages",
    )
    assert row["key_id"] == authed_door.key_ids["two_per_minute"]
    assert row["output_tokens"] == 0 and row["cost_nanos"] == 0


# -- the gateway's own error statuses -------------------------------------------------


async def test_malformed_json_is_a_400(url: str) -> None:
    response = await post(url, "/v1/messages", b'{"model": "echo", "max_tokens": ')
    assert "JSON" in gateway_error(response, 400, "invalid_request_error")


async def test_a_wrong_content_type_is_a_400(url: str) -> None:
    response = await post(url, "/v1/messages", message_body(), **{"content-type": "text/plain"})
    assert "content-type" in gateway_error(response, 400, "invalid_request_error")


async def test_missing_model_and_max_tokens_are_one_400_naming_both(url: str) -> None:
    response = await post(url, "/v1/messages", json.dumps({"messages": HELLO}).encode())
    message = gateway_error(response, 400, "invalid_request_error")
    assert "model" in message and "max_tokens" in message


async def test_an_unknown_model_and_an_unknown_path_are_404s(url: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await sdk_client(url).messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no-such-model" in unknown.value.message
    headers = {"anthropic-version": "2023-06-01"}
    async with httpx2.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        gateway_error(await client.get("/v1/nothing"), 404, "not_found_error")
        gateway_error(await client.post("/v2/messages", content=b"{}"), 404, "not_found_error")
        gateway_error(await client.delete("/v1/messages"), 404, "not_found_error")


async def test_a_body_over_the_limit_is_a_413_before_it_is_read(small_door: str) -> None:
    port = int(small_door.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Ten megabytes announced, none sent: the answer comes anyway.
        writer.write(
            b"POST /v1/messages HTTP/1.1\r\nhost: gateway\r\n"
            b"content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        # The connection closes after it: the unread body is not read and discarded.
        assert headers["connection"] == "close"
        size = int(headers["content-length"])
        body = await asyncio.wait_for(reader.readexactly(size), 5)
    finally:
        writer.close()
    assert lines[0].startswith("HTTP/1.1 413")
    document = json.loads(body)
    assert document["error"]["type"] == "request_too_large"
    assert document["request_id"] == headers["request-id"]
    # A body sent whole, without a Content-Length, is cut off at the limit too.

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * 512

    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.post(
            small_door + "/v1/messages",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    gateway_error(response, 413, "request_too_large")
    # Just under the limit is served.
    small = message_body(metadata={"user_id": "x" * 700})
    assert len(small) < 1024
    assert (await post(small_door, "/v1/messages", small)).status_code == 200


@pytest.mark.parametrize(
    ("path", "protocol"),
    [
        ("/v1/messages", ANTHROPIC_MESSAGES),
        ("/v1/chat/completions", OPENAI_CHAT),
        ("/v1/responses", OPENAI_RESPONSES),
    ],
)
@pytest.mark.usefixtures("_openai_key_in_environment")
async def test_a_body_over_the_limit_is_recorded_as_a_refused_call(
    fake_upstream: FakeUpstream,
    tmp_path: Path,
    path: str,
    protocol: str,
) -> None:
    """Refused before it is read, it is a call all the same: a ledger row
    (RESOURCE_EXHAUSTED, as grpc answers a message over its limit), the call
    log and the metrics, like a body that does not parse."""
    gateway = await start_front_door(fake_upstream, tmp_path, **{"http.max_body_bytes": 1024})
    try:
        request_id = rid("too-large")
        headers = {
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-request-id": request_id,
        }
        async with httpx2.AsyncClient(timeout=10) as client:
            response = await client.post(
                base_url(gateway) + path, content=b" " * 2048, headers=headers
            )
        assert response.status_code == 413
        assert response.headers["x-should-retry"] == "false"
        row = await ledger_row(gateway, request_id)
        assert (row["status"], row["error_reason"]) == ("RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE")
        assert (row["edge"], row["method"]) == ("http", protocol)
    finally:
        await gateway.aclose()


async def test_an_exhausted_budget_is_a_429_not_worth_retrying(
    small_door: str, fake: FakeUpstream
) -> None:
    with pytest.raises(anthropic.RateLimitError) as refused:
        await sdk_client(small_door).messages.create(
            model="claude-test", max_tokens=100, messages=HELLO
        )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "budget" in refused.value.message
    assert "retry-after" in refused.value.response.headers
    assert not fake.requests  # refused before any upstream call


async def test_an_openai_upstream_failing_every_attempt(
    retrying_door: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(status=500), Reply(status=500))
    response = await post(retrying_door, "/v1/messages", message_body("gpt-test"))
    assert (response.status_code, response.json()["error"]["type"]) in {
        (529, "overloaded_error"),
        (500, "api_error"),
    }
    gateway_error(response, response.status_code, response.json()["error"]["type"])
    assert len([r for r in fake.requests if r.path == "/v1/chat/completions"]) == 2


async def test_an_anthropic_upstream_overloaded_on_every_attempt(
    retrying_door: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(status=529), Reply(status=529))
    with pytest.raises(anthropic.APIStatusError) as failed:
        await sdk_client(retrying_door).messages.create(
            model=SAME_NAME, max_tokens=5, messages=HELLO
        )
    assert failed.value.status_code == 529
    assert failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert len([r for r in fake.requests if r.path == "/v1/messages"]) == 2


# -- the usage ledger -------------------------------------------------------------------


async def test_a_pass_through_calls_ledger_row(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(usage=Usage(input_tokens=12, output_tokens=7)))
    call_id = rid("ok")
    headers = {"x-request-id": call_id, "x-claude-code-session-id": "session-1234"}
    await sdk_client(url).messages.create(
        model="claude-test", max_tokens=50, messages=HELLO, extra_headers=headers
    )
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "anthropic.messages", "OK")
    assert (row["model_requested"], row["provider"]) == ("claude-test", "anthropic")
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)
    assert row["cost_nanos"] == 12 * INPUT_NANOS + 7 * OUTPUT_NANOS
    assert row["end_user"] == "session-1234"
    assert row["usage_estimated"] == 0


async def test_a_refused_bad_request_has_its_row(front_door: RunningGateway, url: str) -> None:
    call_id = rid("bad")
    body = json.dumps({"model": "echo", "messages": HELLO}).encode()
    response = await post(url, "/v1/messages", body, **{"x-request-id": call_id})
    gateway_error(response, 400, "invalid_request_error")
    assert response.headers["request-id"] == call_id
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"], row["output_tokens"]) == ("INVALID_ARGUMENT", "http", 0)


async def test_grpc_calls_still_have_the_grpc_edge(front_door: RunningGateway) -> None:
    call_id = rid("grpc")
    await front_door.stub.Generate(request("hello", request_id=call_id))  # type: ignore[misc]
    row = await ledger_row(front_door, call_id)
    assert (row["edge"], row["method"], row["status"]) == ("grpc", "Generate", "OK")


# -- cancellation -------------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_closes_the_upstream_and_pays_for_the_output(
    front_door: RunningGateway, url: str, fake: FakeUpstream
) -> None:
    words = " ".join(f"word{i}" for i in range(60))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.1))
    call_id = rid("gone")
    received = b""
    async with httpx2.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            url + "/v1/messages",
            content=message_body("claude-test", stream=True),
            headers={"content-type": "application/json", "x-request-id": call_id},
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                received += chunk
                if received.count(b"event: content_block_delta") >= 3:
                    break
        left_at = time.monotonic()
    events = check_anthropic_stream(received, partial=True)
    deltas = sum(1 for name, _ in events if name == "content_block_delta")
    assert deltas >= 3
    upstream = fake.last("/v1/messages")
    await asyncio.wait_for(upstream.finished.wait(), 1.0)
    assert upstream.disconnected
    assert time.monotonic() - left_at < 1.0
    row = await ledger_row(front_door, call_id)
    assert (row["status"], row["edge"]) == ("CANCELLED", "http")
    assert row["output_tokens"] >= deltas
    assert row["cost_nanos"] >= row["output_tokens"] * OUTPUT_NANOS


# -- count_tokens ---------------------------------------------------------------------


async def test_count_tokens_of_an_anthropic_model_is_the_upstreams(
    url: str, fake: FakeUpstream
) -> None:
    sent = SentLog()
    fake.enqueue(Reply(count_tokens=1234))
    counted = await sdk_client(url, sent).messages.count_tokens(
        model=SAME_NAME,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=HELLO,
        extra_headers={"anthropic-beta": "token-counting-2024-11-01"},
    )
    assert counted.input_tokens == 1234
    forwarded = fake.last("/v1/messages/count_tokens")
    assert forwarded.raw == sent.last.content
    assert forwarded.headers["anthropic-beta"] == "token-counting-2024-11-01"


async def test_count_tokens_of_a_translated_model_never_undercounts(
    url: str, fake: FakeUpstream
) -> None:
    text = " ".join(f"{word}{i}," for i, word in enumerate(["alpha", "beta", "gamma"] * 200))
    counted = await sdk_client(url).messages.count_tokens(
        model="echo", messages=[{"role": "user", "content": text}]
    )
    # Never below what the gateway itself estimates for the context-window check.
    assert counted.input_tokens >= max(len(text) / 4, count_text(text))
    assert not fake.requests  # estimated by the gateway, no upstream asked


# -- the /anthropic prefix -------------------------------------------------------------


async def test_the_anthropic_prefix_serves_the_same_endpoints(url: str, fake: FakeUpstream) -> None:
    client = sdk_client(url + "/anthropic")
    message = await client.messages.create(model=SAME_NAME, max_tokens=20, messages=HELLO)
    assert message.content[0].text == "Hello from the fake upstream."  # type: ignore[union-attr]
    assert fake.last().path == "/v1/messages"
    assert (await client.messages.count_tokens(model=SAME_NAME, messages=HELLO)).input_tokens == 42
    response = await post(url, "/anthropic/v1/messages", message_body(stream=True))
    events = check_anthropic_stream(response.content)
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "hello there"


# -- traces and metrics ----------------------------------------------------------------


async def test_a_traceparent_continues_the_callers_trace(
    observed_door: tuple[RunningGateway, InMemorySpanExporter], fake: FakeUpstream
) -> None:
    gateway, exporter = observed_door
    exporter.clear()
    await sdk_client(base_url(gateway)).messages.create(
        model="claude-test",
        max_tokens=20,
        messages=HELLO,
        extra_headers={"traceparent": TRACEPARENT},
    )
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind is SpanKind.SERVER and s.name == "POST /v1/messages"]
    assert server.context is not None and server.parent is not None
    assert server.context.trace_id == int(TRACE_ID, 16)
    assert server.parent.span_id == int(PARENT_SPAN_ID, 16)
    assert server.attributes is not None
    assert server.attributes["gen_ai.usage.output_tokens"] == 7
    [attempt] = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id


async def test_metrics_count_http_calls_by_edge(
    observed_door: tuple[RunningGateway, InMemorySpanExporter],
) -> None:
    gateway, _ = observed_door
    port = gateway.gateway.telemetry.metrics_port
    labels = {"edge": "http", "method": "anthropic.messages", "code": "OK"}
    before = value(samples(await scrape(port)), "llmgw_rpcs_total", **labels)
    await sdk_client(base_url(gateway)).messages.create(model="echo", max_tokens=9, messages=HELLO)
    after = samples(await scrape(port))
    assert value(after, "llmgw_rpcs_total", **labels) == before + 1
    assert value(after, "llmgw_rpcs_total", **{**labels, "edge": "grpc"}) == 0
    assert value(after, "llmgw_calls_in_flight") == 0


async def test_a_model_name_no_ledger_can_store_is_refused_and_recorded(
    front_door: RunningGateway, url: str
) -> None:
    # A lone surrogate is valid JSON but not UTF-8: refused, and its refusal's
    # row must not break the ledger's writer (later calls are still recorded).
    body = b'{"model":"bad\\ud800","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    headers = {"content-type": "application/json", "x-request-id": "surrogate-model"}
    async with httpx2.AsyncClient(timeout=10) as client:
        refused = await client.post(f"{url}/v1/messages", content=body, headers=headers)
        assert refused.status_code == 400
        later = await client.post(
            f"{url}/v1/messages",
            content=json.dumps(
                {"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
            ).encode(),
            headers={"content-type": "application/json", "x-request-id": "after-surrogate"},
        )
        assert later.status_code == 200
    assert (await ledger_row(front_door, "surrogate-model"))["status"] == "INVALID_ARGUMENT"
    assert (await ledger_row(front_door, "after-surrogate"))["status"] == "OK"
