"""The relay pool (server/providers/_http1.py): kept connections, limits, answers
read to their end or cut, and aiohttp's exceptions for each failure.

Each test talks to a raw asyncio server that reads one request at a time and
answers with the bytes the test gives, so every framing an upstream may use
(a length, chunks, a body that ends where the connection does) and every way
a connection may end are exercised on a real socket. The SDK-level behaviour
built on the pool (the bytes each SDK sends, error classes, cut streams,
cancellation, unread streams) is pinned by test_relay_send.py,
test_relay_direct.py, test_transport.py and test_slow_readers.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
import yarl

from server.providers import _http1
from server.providers._http1 import CHUNK, Http1Pool

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Answering = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Upstream:
    port: int
    connections: int = 0
    open: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: int = 0

    @property
    def url(self) -> yarl.URL:
        return yarl.URL(f"http://127.0.0.1:{self.port}/v1/messages")


@asynccontextmanager
async def upstream(answer: Answering) -> AsyncIterator[Upstream]:
    """A server that reads requests (head and Content-Length body) and lets `answer`
    write each reply; `answer` returns whether the connection stays open."""
    state = Upstream(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.open += 1
        state.most_open = max(state.most_open, state.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    state.closed_by_client += 1
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                state.requests.append(request)
                if not await answer(len(state.requests), request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            state.closed_by_client += 1
        finally:
            state.open -= 1
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()


def pool(limit: int = 10, keepalive_s: float = 30.0) -> Http1Pool:
    def make(address: tuple[object, ...]) -> socket.socket:
        return socket.socket(address[0], address[1], address[2])  # type: ignore[arg-type]

    return Http1Pool(limit=limit, keepalive_s=keepalive_s, ssl_context=None, socket_factory=make)


def head(url: yarl.URL, length: int) -> bytes:
    return (
        f"POST {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n"
        f"content-length: {length}\r\n\r\n"
    ).encode()


async def call(p: Http1Pool, up: Upstream, body: bytes = b"{}", seconds: float = 5.0) -> bytes:
    answer = await p.post(up.url, head(up.url, len(body)), body, seconds, None)
    return await answer.read()


async def write(raw: bytes) -> Answering:
    async def answer(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return True

    return answer


async def test_calls_one_after_another_share_one_connection_and_send_the_bytes_given() -> None:
    async with upstream(await write(OK)) as up:
        p = pool()
        for n in range(3):
            assert await call(p, up, f'{{"n":{n}}}'.encode()) == b"{}"
        assert up.connections == 1
        assert up.requests[2] == head(up.url, 7) + b'{"n":2}'
        await p.aclose()
        await asyncio.sleep(0.05)
        assert up.open == 0  # closing the pool closed the kept connection


async def test_no_more_connections_than_the_limit_and_every_call_served() -> None:
    async def slow(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(OK)
        return True

    async with upstream(slow) as up:
        p = pool(limit=2)
        answers = await asyncio.gather(*(call(p, up) for _ in range(8)))
        assert answers == [b"{}"] * 8
        assert up.most_open == 2
        await p.aclose()


async def test_a_call_that_finds_no_free_connection_in_time_gets_aiohttps_timeout() -> None:
    async def slow(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(1.0)
        writer.write(OK)
        return True

    async with upstream(slow) as up:
        p = pool(limit=1)
        first = asyncio.ensure_future(call(p, up))
        await asyncio.sleep(0.05)
        with pytest.raises(aiohttp.ConnectionTimeoutError):
            await call(p, up, seconds=0.2)
        assert await first == b"{}"
        assert up.connections == 1
        await p.aclose()


async def test_a_kept_connection_the_upstream_closed_is_not_used_again() -> None:
    async def once(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK)
        await writer.drain()
        return False  # the upstream hangs up after each answer (as a keep-alive expiry would)

    async with upstream(once) as up:
        p = pool()
        assert await call(p, up) == b"{}"
        await asyncio.sleep(0.05)
        assert await call(p, up) == b"{}"
        assert up.connections == 2
        await p.aclose()


async def test_idle_connections_are_closed_after_the_keepalive_expiry() -> None:
    async with upstream(await write(OK)) as up:
        p = pool(keepalive_s=0.1)
        await call(p, up)
        assert up.open == 1
        await asyncio.sleep(0.4)
        assert up.open == 0
        assert await call(p, up) == b"{}"
        assert up.connections == 2
        await p.aclose()


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
         b"abcde"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"{}"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "until-close", "interim-answer", "no-content"],
)  # fmt: skip
async def test_each_framing_of_a_body_is_read_whole(raw: bytes, body: bytes) -> None:
    async def answer(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return b"Connection: close" not in raw

    async with upstream(answer) as up:
        p = pool()
        assert await call(p, up) == body
        assert await call(p, up) == body  # and the connection is fit for the next call
        await p.aclose()


async def test_a_large_body_comes_in_chunks_no_larger_than_chunk() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    async with upstream(await write(raw)) as up:
        p = pool()
        answer = await p.post(up.url, head(up.url, 2), b"{}", 5.0, None)
        chunks = [chunk async for chunk in answer.chunks()]
        assert b"".join(chunks) == payload
        assert max(map(len, chunks)) <= CHUNK
        await p.aclose()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", aiohttp.ServerDisconnectedError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", aiohttp.ClientPayloadError),
        (b"NOT HTTP AT ALL\r\n\r\n", aiohttp.ClientResponseError),
    ],
    ids=["hung-up-before-answering", "cut-body", "not-http"],
)
async def test_each_failure_raises_what_aiohttp_raises(raw: bytes, error: type[Exception]) -> None:
    async def answer(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return False

    async with upstream(answer) as up:
        p = pool(limit=1)
        with pytest.raises(error):
            await call(p, up)
        assert p._open == 0  # the connection's place is free again
        await p.aclose()


async def test_a_silent_upstream_raises_aiohttps_read_timeout() -> None:
    async def stall(n: int, _: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(2)
        return False

    async with upstream(stall) as up:
        p = pool()
        answer = await p.post(up.url, head(up.url, 2), b"{}", 0.2, None)
        with pytest.raises(aiohttp.SocketTimeoutError):
            await answer.read()
        await p.aclose()


async def test_a_refused_connection_raises_aiohttps_connector_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    p = pool()
    url = yarl.URL(f"http://127.0.0.1:{port}/v1/messages")
    with pytest.raises(aiohttp.ClientConnectorError):
        await p.post(url, head(url, 2), b"{}", 1.0, None)
    assert p._open == 0
    await p.aclose()


async def test_an_answer_closed_before_its_end_closes_the_connection_at_once() -> None:
    async def endless(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with upstream(endless) as up:
        p = pool(limit=1)
        answer = await p.post(up.url, head(up.url, 2), b"{}", 5.0, None)
        async for chunk in answer.chunks():
            assert chunk.startswith(b"hello")
            break
        answer.close()
        for _ in range(100):
            if up.open == 0:
                break
            await asyncio.sleep(0.01)
        assert up.open == 0 and up.closed_by_client == 1
        assert p._open == 0
        await p.aclose()


# -- Addresses looked up as aiohttp's connector does (its DNS cache) ----------------


def counted_lookups(p: Http1Pool, *, failing: int = 0) -> list[str]:
    """Counts the pool's address lookups (each host looked up); the first `failing`
    of them fail as an unknown host does."""
    looked_up: list[str] = []
    real = p.lookup

    async def lookup(host: str, port: int, **kwargs: object) -> list[tuple[object, ...]]:
        looked_up.append(host)
        await asyncio.sleep(0.01)  # a lookup takes time: calls meanwhile share it
        if len(looked_up) <= failing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await real(host, port, **kwargs)

    p.lookup = lookup  # type: ignore[method-assign]
    return looked_up


async def test_the_new_connections_of_a_burst_share_one_address_lookup() -> None:
    async def slow(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        writer.write(OK)
        return True

    async with upstream(slow) as up:
        p = pool(limit=10)
        looked_up = counted_lookups(p)
        url = yarl.URL(f"http://localhost:{up.port}/v1/messages")
        answers = await asyncio.gather(
            *(p.post(url, head(url, 2), b"{}", 5.0, None) for _ in range(10))
        )
        assert [await a.read() for a in answers] == [b"{}"] * 10
        assert up.connections == 10
        assert looked_up == ["localhost"]
        await p.aclose()


async def test_addresses_are_looked_up_again_after_the_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_http1, "DNS_TTL_S", 0.05)

    async def once(_: int, __: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        await writer.drain()
        return False  # a new connection for each call

    async with upstream(once) as up:
        p = pool()
        looked_up = counted_lookups(p)
        url = yarl.URL(f"http://localhost:{up.port}/v1/messages")
        for pause in (0.0, 0.0, 0.1):
            await asyncio.sleep(pause)
            answer = await p.post(url, head(url, 2), b"{}", 5.0, None)
            assert await answer.read() == b"{}"
        # Three connections (the upstream closes each): looked up for the first and
        # once more after the TTL.
        assert (up.connections, looked_up) == (3, ["localhost", "localhost"])
        await p.aclose()


async def test_a_failed_lookup_and_addresses_that_did_not_answer_are_not_kept() -> None:
    async with upstream(await write(OK)) as up:
        p = pool()
        looked_up = counted_lookups(p, failing=1)
        url = yarl.URL(f"http://localhost:{up.port}/v1/messages")
        with pytest.raises(aiohttp.ClientConnectorError):
            await p.post(url, head(url, 2), b"{}", 5.0, None)
        answer = await p.post(url, head(url, 2), b"{}", 5.0, None)
        assert await answer.read() == b"{}"
        assert looked_up == ["localhost", "localhost"]  # the failure was not kept
        await p.aclose()
    # The upstream is gone: its kept addresses answer no more and are dropped.
    p = pool()
    looked_up = counted_lookups(p)
    url = yarl.URL(f"http://localhost:{up.port}/v1/messages")
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectorError):
            await p.post(url, head(url, 2), b"{}", 1.0, None)
    assert looked_up == ["localhost", "localhost"]
    await p.aclose()
