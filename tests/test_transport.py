"""The HTTP client under the SDK providers: aiohttp by default, httpx on request.

Both transports must behave the same where the gateway relies on them: one
kept-alive connection pool per provider instance, sized as configured; the
environment's proxy settings; a call's timeout; cancellation closing the
upstream connection; and every transport failure mapped to the same
GatewayError (the OpenAI SDK's aiohttp transport calls a dropped connection a
connect timeout). The provider, parity, error, retry and HTTP front door
tests run over either transport with LLMGW_TEST_HTTP_TRANSPORT=httpx|aiohttp
(tests/upstream_fixtures.py); this file covers what differs between them,
against small raw HTTP servers that count connections and see request lines.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from server.errors import DeadlineExceededError, GatewayError, UpstreamStreamInterruptedError
from server.providers._http1 import Http1Pool
from server.providers._sdk_provider import SdkProvider
from server.providers._transport import transport_failure
from server.providers.anthropic_messages import AnthropicProvider
from server.providers.openai_chat import OpenAIChatProvider
from server.schema import GenerationRequest, Message, Role, TextBlock

TRANSPORTS = ["aiohttp", "httpx"]
KINDS = ["anthropic", "openai"]

ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 3, "output_tokens": 1},
}
OPENAI_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An HTTP/1.1 server on 127.0.0.1 that records request lines and connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.targets: list[str] = []  # each request's target, as sent (absolute via a proxy)
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed = asyncio.Event()  # a connection ended
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request's body on this connection, or None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        self.targets.append(lines[0].split(" ")[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return await reader.readexactly(length)


def json_answer(body: dict[str, Any], delay_s: float = 0.0) -> Handler:
    """Answers every request on a connection with `body`, kept alive."""
    payload = json.dumps(body).encode()

    async def handle(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await server.read_request(reader) is not None:
            await asyncio.sleep(delay_s)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_1\r\n"
                b"x-request-id: req_1\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            await writer.drain()

    return handle


async def hang_up(server: RawServer, reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
    """Reads the request, then closes the connection without an answer."""
    await server.read_request(reader)


async def never_answer(
    server: RawServer, reader: asyncio.StreamReader, _: asyncio.StreamWriter
) -> None:
    await server.read_request(reader)
    await asyncio.sleep(30)


async def slow_stream(
    server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An Anthropic stream that sends a delta every 20 ms until the client leaves."""
    await server.read_request(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    start = {"type": "message_start", "message": {**ANTHROPIC_MESSAGE, "content": []}}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    events = [("message_start", start), ("content_block_start", block)]
    for i in range(1000):
        delta = {"type": "text_delta", "text": f"w{i} "}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    for name, data in events:
        event = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(0.02)


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listening.close()


def provider(kind: str, base_url: str, **settings: Any) -> SdkProvider[Any]:
    if kind == "anthropic":
        return AnthropicProvider.from_settings(  # type: ignore[return-value]
            "anthropic", {"api_key": "k", "base_url": base_url, **settings}
        )
    return OpenAIChatProvider.from_settings(  # type: ignore[return-value]
        "openai", {"api_key": "k", "base_url": base_url + "/v1", **settings}
    )


def request(
    model: str, *, incremental: bool = False, deadline: float | None = None
) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=[Message(Role.USER, [TextBlock("Hi")])],
        max_tokens=10,
        request_id="rid-transport",
        incremental=incremental,
        deadline=deadline,
    )


MODEL = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-6-sol"}
ANSWER = {"anthropic": ANTHROPIC_MESSAGE, "openai": OPENAI_COMPLETION}


async def generate(p: SdkProvider[Any], kind: str, **fields: Any) -> list[Any]:
    return [event async for event in p.stream(request(MODEL[kind], **fields))]


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_transport_is_the_sdks_aiohttp_client(kind: str) -> None:
    sdk = anthropic if kind == "anthropic" else openai
    default = provider(kind, "http://127.0.0.1:9")
    chosen = provider(kind, "http://127.0.0.1:9", http_transport="httpx")
    assert isinstance(default._sdk._base._client, sdk.DefaultAioHttpClient)
    assert isinstance(chosen._sdk._base._client, sdk.DefaultAsyncHttpxClient)
    assert not isinstance(chosen._sdk._base._client, sdk.DefaultAioHttpClient)


def test_an_unknown_transport_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="http_transport"):
        provider("anthropic", "http://127.0.0.1:9", http_transport="requests")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", KINDS)
async def test_calls_reuse_a_kept_alive_pool_of_the_configured_size(
    kind: str, transport: str
) -> None:
    async with raw_server(json_answer(ANSWER[kind], delay_s=0.1)) as server:
        p = provider(
            kind, f"http://127.0.0.1:{server.port}", http_transport=transport, max_connections=2
        )
        try:
            for _ in range(3):
                await generate(p, kind)
            assert server.connections == 1  # one connection, kept alive
            await asyncio.gather(*(generate(p, kind) for _ in range(5)))
            assert server.most_open == 2  # never more than the pool's size
            assert len(server.targets) == 8
        finally:
            await p.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", KINDS)
async def test_the_environments_proxy_is_used(
    kind: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with raw_server(json_answer(ANSWER[kind])) as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        # A host only the proxy can reach.
        p = provider(kind, "http://upstream.invalid", http_transport=transport)
        try:
            events = await generate(p, kind)
        finally:
            await p.aclose()
        assert events
        path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
        assert proxy.targets == [f"http://upstream.invalid{path}"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_proxy_is_honoured(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with raw_server(json_answer(ANTHROPIC_MESSAGE)) as upstream:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        p = provider("anthropic", f"http://127.0.0.1:{upstream.port}", http_transport=transport)
        try:
            assert await generate(p, "anthropic")
        finally:
            await p.aclose()
        assert upstream.targets == ["/v1/messages"]


FAILURES: list[tuple[str, Handler | None, type[GatewayError]]] = [
    ("refused", None, UpstreamStreamInterruptedError),
    ("hung up", hang_up, UpstreamStreamInterruptedError),
    ("silent", never_answer, DeadlineExceededError),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("case", "handler", "expected"), FAILURES, ids=[f[0] for f in FAILURES])
@pytest.mark.parametrize("incremental", [False, True], ids=["unary", "stream"])
async def test_transport_failures_map_alike(
    kind: str,
    transport: str,
    case: str,
    handler: Handler | None,
    expected: type[GatewayError],
    incremental: bool,
) -> None:
    async with raw_server(handler or hang_up) as server:
        # Refused: a port nothing listens on.
        port = server.port if handler is not None else _closed_port()
        p = provider(kind, f"http://127.0.0.1:{port}", http_transport=transport)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(GatewayError) as caught:
                await generate(p, kind, incremental=incremental, deadline=started + 0.5)
        finally:
            await p.aclose()
        assert type(caught.value) is expected, repr(caught.value.__cause__)
        assert caught.value.metadata["provider"] == kind
        assert loop.time() - started < 2.0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_closing_a_stream_closes_its_connection_at_once(transport: str) -> None:
    async with raw_server(slow_stream) as server:
        p = provider("anthropic", f"http://127.0.0.1:{server.port}", http_transport=transport)
        try:
            events = p.stream(request(MODEL["anthropic"], incremental=True))
            for _ in range(5):
                await anext(events)
            loop = asyncio.get_running_loop()
            closed_at = loop.time()
            await events.aclose()  # type: ignore[attr-defined]
            await asyncio.wait_for(server.closed.wait(), 1.0)
            assert loop.time() - closed_at < 1.0
        finally:
            await p.aclose()


def test_transport_failure_reads_the_chain_to_the_aiohttp_error() -> None:
    def chained(*errors: BaseException) -> BaseException:
        for outer, inner in itertools.pairwise(errors):
            outer.__cause__ = inner
        return errors[0]

    request_ = httpx2.Request("POST", "http://x")
    dropped = aiohttp.ServerDisconnectedError()
    # What the OpenAI SDK's aiohttp transport and the SDK make of a dropped connection.
    said_timeout = chained(
        openai.APITimeoutError(request=request_), httpx2.ConnectTimeout("x"), dropped
    )
    assert transport_failure(said_timeout) == "connection"
    read_timeout = chained(httpx2.ReadTimeout("x"), aiohttp.SocketTimeoutError())
    assert transport_failure(read_timeout) == "timeout"
    assert transport_failure(httpx2.ReadTimeout("x")) == "timeout"
    assert transport_failure(httpx2.RemoteProtocolError("x")) == "connection"
    assert transport_failure(aiohttp.ClientPayloadError("x")) == "connection"
    assert transport_failure(openai.APIConnectionError(request=request_)) is None
    assert transport_failure(ValueError("x")) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "via a proxy"])
async def test_aiohttp_connections_keep_alive_and_read_little_ahead(
    proxied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TCP keepalive as the SDK's httpx transport sets it, and bounded read-ahead."""
    import socket

    from server.providers._transport import READ_BUFSIZE, RECEIVE_BUFFER

    async with raw_server(json_answer(ANTHROPIC_MESSAGE)) as server:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        if proxied:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
        base = "http://upstream.invalid" if proxied else f"http://127.0.0.1:{server.port}"
        p = provider("anthropic", base)
        try:
            await generate(p, "anthropic")
            client = p._sdk._base._client
            transports = [client._transport, *(t for t in client._mounts.values() if t)]
            if proxied:  # through the SDK's aiohttp session (a proxy is its to speak)
                sessions = [
                    t.client for t in transports if isinstance(t.client, aiohttp.ClientSession)
                ]
                assert len(sessions) == 1  # the route the call took
                session = sessions[0]
                assert session._read_bufsize == READ_BUFSIZE
                connector = session.connector
                assert connector is not None and connector.limit == 1000
                (held,) = [c for conns in connector._conns.values() for c, _ in conns]
                sock = held.transport.get_extra_info("socket")
            else:  # through the relay pool (server/providers/_http1.py)
                pools = [t.relay_pool for t in transports if isinstance(t.relay_pool, Http1Pool)]
                assert len(pools) == 1
                assert pools[0]._limit == 1000
                (kept,) = [c for idle in pools[0]._idle.values() for c in idle]
                assert kept.transport is not None
                sock = kept.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            # Linux doubles what it is given, for its own bookkeeping.
            assert (
                RECEIVE_BUFFER
                <= sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                <= 2 * RECEIVE_BUFFER
            )
        finally:
            await p.aclose()
