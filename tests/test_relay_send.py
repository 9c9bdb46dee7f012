"""send_relayed sends what `client.post` sends and raises what it raises.

server/providers/_relay.py's `send_relayed` reuses the request the SDK built
for a client and path instead of having the SDK build it again for every
relayed call. The upstream must not see the difference: for each SDK, each
path and streaming or not, the fake upstream receives the same method, path,
query, headers (the per-call ones included: the forwarded headers, the
request id, the timeout) and body both ways; an error status raises the same
SDK exception with the same body, and an upstream that cannot be reached the
same connection error. A client the SDK changes requests for per call (here:
with retries) is sent through `client.post` itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from server.providers._relay import relayed_options, send_relayed
from server.providers._transport import http_client
from server.schema import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES, Passthrough
from tests.fake_upstream import FakeUpstream
from tests.fake_upstream.script import Reply

BODIES = {
    "/v1/messages": {"model": "claude-test", "max_tokens": 64, "messages": []},
    "/chat/completions": {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]},
    "/responses": {"model": "gpt-test", "input": "Hi"},
}
CALLS = [
    ("anthropic", "/v1/messages", ANTHROPIC_MESSAGES),
    ("openai", "/chat/completions", OPENAI_CHAT),
    ("openai", "/responses", OPENAI_RESPONSES),
]


async def sdk_client(kind: str, base_url: str, *, max_retries: int = 0) -> Any:
    if kind == "anthropic":
        clients: Any = {"aiohttp": anthropic.DefaultAioHttpClient}
        transport = http_client("aiohttp", clients, max_connections=10, keepalive_s=5, timeout_s=60)
        return anthropic.AsyncAnthropic(
            api_key="sk-ant-test", base_url=base_url, max_retries=max_retries,
            http_client=transport,
        )  # fmt: skip
    transport = http_client(
        "aiohttp", {"aiohttp": openai.DefaultAioHttpClient}, max_connections=10,
        keepalive_s=5, timeout_s=60,
    )  # fmt: skip
    return openai.AsyncOpenAI(
        api_key="sk-test", base_url=base_url, max_retries=max_retries, http_client=transport
    )


@pytest.fixture
async def clients(fake: FakeUpstream) -> AsyncIterator[dict[str, Any]]:
    made = {
        "anthropic": await sdk_client("anthropic", fake.anthropic_url),
        "openai": await sdk_client("openai", fake.openai_url),
    }
    yield made
    for client in made.values():
        await client.close()


def arguments(kind: str, path: str, protocol: str, stream: bool) -> tuple[bytes, dict[str, Any]]:
    document = {**BODIES[path], **({"stream": True} if stream else {})}
    body = json.dumps(document).encode()
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "a,b"}
    if kind == "openai":
        headers = {"openai-beta": "assistants=v2"}
    passthrough = Passthrough(protocol, body, document, headers, "beta=true&x=1")
    options = relayed_options(passthrough, 42.5, "req-123")
    if kind == "openai":
        options["security"] = {"bearer_auth": True}
    return body, options


async def through_post(
    client: Any, path: str, body: bytes, options: dict[str, Any], stream: bool
) -> bytes:
    response = await client.post(
        path, content=body, options=options, cast_to=httpx2.Response, stream=stream
    )
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def through_send(
    client: Any, path: str, body: bytes, options: dict[str, Any], stream: bool
) -> bytes:
    response = await send_relayed(client, path, body, options, stream=stream)
    try:
        return await response.aread()
    finally:
        await response.aclose()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("kind", "path", "protocol"), CALLS)
async def test_the_upstream_receives_what_client_post_sends(
    fake: FakeUpstream, clients: dict[str, Any], kind: str, path: str, protocol: str, stream: bool
) -> None:
    client = clients[kind]
    received = []
    answers = []
    # Twice each: the second send_relayed call copies the request built by the first.
    for send in (through_post, through_send, through_post, through_send):
        body, options = arguments(kind, path, protocol, stream)
        answers.append(await send(client, path, body, options, stream))
        received.append(fake.requests[-1])
    for recorded in received:
        recorded.headers.pop("x-stainless-retry-count", None)  # both "0"
    first = received[0]
    assert first.headers["x-request-id"] == "req-123"
    assert first.headers["x-stainless-read-timeout"] == "42.5"
    assert first.query == "beta=true&x=1"
    for recorded in received[1:]:
        assert recorded.method == first.method
        assert recorded.path == first.path
        assert recorded.query == first.query
        assert recorded.headers == first.headers
        assert recorded.raw == first.raw
    assert all(len(answer) > 0 for answer in answers)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("kind", "path", "protocol"), CALLS)
async def test_an_error_status_raises_what_client_post_raises(
    fake: FakeUpstream, clients: dict[str, Any], kind: str, path: str, protocol: str, stream: bool
) -> None:
    client = clients[kind]
    raised = []
    for send in (through_post, through_send):
        fake.enqueue(Reply(status=429, error_message="slow down", headers={"retry-after": "3"}))
        body, options = arguments(kind, path, protocol, stream)
        with pytest.raises(
            anthropic.APIStatusError if kind == "anthropic" else openai.APIStatusError
        ) as caught:
            await send(client, path, body, options, stream)
        raised.append(caught.value)
    post_error, send_error = raised
    assert type(send_error) is type(post_error)
    assert send_error.status_code == post_error.status_code == 429
    assert send_error.body == post_error.body
    assert send_error.response.headers["retry-after"] == "3"


@pytest.mark.parametrize(("kind", "path", "protocol"), CALLS)
async def test_an_unreachable_upstream_raises_what_client_post_raises(
    kind: str, path: str, protocol: str
) -> None:
    with ClosedPort() as port:
        base = f"http://127.0.0.1:{port}" + ("" if kind == "anthropic" else "/v1")
        client = await sdk_client(kind, base)
        try:
            raised = []
            for send in (through_post, through_send):
                body, options = arguments(kind, path, protocol, False)
                with pytest.raises((anthropic.APIError, openai.APIError)) as caught:
                    await send(client, path, body, options, False)
                raised.append(caught.value)
        finally:
            await client.close()
    assert type(raised[1]) is type(raised[0])
    assert isinstance(raised[0], anthropic.APIConnectionError | openai.APIConnectionError)


async def test_a_client_with_retries_goes_through_client_post(fake: FakeUpstream) -> None:
    client = await sdk_client("anthropic", fake.anthropic_url, max_retries=1)
    try:
        fake.enqueue(Reply(status=529), Reply())
        body, options = arguments("anthropic", "/v1/messages", ANTHROPIC_MESSAGES, False)
        await through_send(client, "/v1/messages", body, options, False)
    finally:
        await client.close()
    # The SDK retried the overloaded answer, as it would have for client.post.
    assert len(fake.requests) == 2


class ClosedPort:
    """A local port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    def __exit__(self, *args: object) -> None:
        return None
