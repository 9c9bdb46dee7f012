"""The HTTP/1.1 connection pool a relayed call is sent through.

`send_relayed` (_relay.py) sends every provider call of a client built by
_transport.py: a POST of bytes already in memory to the one upstream of a
deployment, over kept-alive connections, its answer read as it comes. That
is a small part of what aiohttp's client does (cookies, redirects, proxies,
auth, tracing hooks, multipart and compressed bodies, its request and
response objects), and aiohttp's client was the largest single cost of a
relayed call: on the benchmark's fake upstream, one call at a time, a round
trip through `ClientSession.request` costs about 220-290 µs of CPU and
0.37-0.54 ms, through this pool about 40 µs and 0.14-0.20 ms (issue 15's
notes have the measurement). The response is parsed by httptools, the
llhttp parser uvicorn serves the front door with.

What it keeps of aiohttp, so that nothing above it can tell: the request's
bytes (aiohttp's Host header and its default headers when the SDK gives
none), the connection limit and keep-alive expiry of the transport's pool,
its TLS context and tuned sockets, the read-ahead bound (a stream nobody
reads stops being read from the upstream: tests/test_slow_readers.py), and
the exceptions aiohttp raises for each failure (the SDKs' transports map
those to httpx2's, and _transport.transport_failure reads them back), with
aiohttp's timeouts: `connect` for a pooled connection or a new one,
`sock_read` between two reads, and aiohttp's DNS cache: a host's addresses
are looked up once for DNS_TTL_S, the new connections of a burst share one
lookup (the loop's getaddrinfo runs in a small thread pool), and a host none
of whose addresses answered is looked up again. A proxy, or anything else only aiohttp does,
stays on the SDK's own path (_relay._direct_transport).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httptools
import yarl

# A streamed answer's bytes the pool reads ahead of its reader before it stops
# reading the socket, and the most a reader gets at once (aiohttp's: twice its
# read_bufsize, _transport.READ_BUFSIZE, and the SDK transport's chunk): what an
# unread stream holds stays small, and so does what its reader holds at a time.
READ_AHEAD = 32 * 1024
CHUNK = 16 * 1024
# How long a host's looked-up addresses are used (aiohttp's TCPConnector's
# default `ttl_dns_cache`).
DNS_TTL_S = 10.0

Addresses = list[tuple[Any, ...]]  # what getaddrinfo answers


class _Connection(asyncio.Protocol):
    """One kept-alive connection, and the answer it is reading, if any."""

    def __init__(self, pool: Http1Pool, key: tuple[str, int, bool]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.busy = self.closed = self.paused = False
        self.counted = False  # holds one of the pool's places
        self.idle_since = 0.0
        self.body: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.read_at = 0.0  # when bytes last came, for the read timeout
        self._no_answer()

    def _no_answer(self) -> None:
        """The state of the answer being read, before its first byte."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body.clear()
        self.buffered = 0
        self.has_headers = self.complete = self.reusable = False
        self.error: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: the connection cannot be trusted
            self.close()
            return
        self.read_at = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.fail(aiohttp.ClientResponseError(_info(), (), message=f"Invalid answer: {err}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.busy or self.complete:
            return
        if self.has_headers and self._ends_at_close():
            self.on_message_complete()  # a body that ends where the connection does
            self.reusable = False
        elif self.has_headers:
            self.fail(aiohttp.ClientPayloadError("Response payload is not completed"))
        elif exc is not None:
            self.fail(aiohttp.ClientOSError(*(exc.args or (0, str(exc)))))
        else:
            self.fail(aiohttp.ServerDisconnectedError())

    # -- httptools callbacks -------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.reason, self.headers = b"", []
            return
        self.has_headers = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > READ_AHEAD and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if not self.has_headers:
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive()
        self.wake()

    # -- reading the answer ----------------------------------------------------------------

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.wake()

    async def wait(self, seconds: float) -> None:
        """Until the parser has more to say, or `seconds` pass without a byte."""
        loop = self.pool.loop
        self.waiter = waiter = loop.create_future()
        timer = loop.call_at(self.read_at + seconds, self._check_read, waiter, seconds)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def _check_read(self, waiter: asyncio.Future[None], seconds: float) -> None:
        if waiter.done():
            return
        due = self.read_at + seconds
        if self.pool.loop.time() < due:  # bytes came since: wait the rest
            self.pool.loop.call_at(due, self._check_read, waiter, seconds)
            return
        self.fail(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))

    def take(self) -> bytes:
        """Up to CHUNK bytes of what was read of the body and not yet taken; the
        socket read again once little is left."""
        body = self.body
        first = body[0]
        if len(first) > CHUNK:
            data = first[:CHUNK]
            body[0] = first[CHUNK:]
        elif len(body) == 1 or len(first) + len(body[1]) > CHUNK:
            data = body.popleft()
        else:
            pieces, size = [], 0
            while body and size + len(body[0]) <= CHUNK:
                size += len(body[0])
                pieces.append(body.popleft())
            data = b"".join(pieces)
        self.buffered -= len(data)
        if self.paused and self.buffered <= CHUNK and not self.closed:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def _ends_at_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def reset(self) -> None:
        """Ready for the next request: the last answer forgotten, the socket read."""
        self.busy = False
        self._no_answer()
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool.forget(self)


def _info() -> aiohttp.RequestInfo:
    url = yarl.URL("http://upstream/")
    return aiohttp.RequestInfo(url, "POST", {}, url)  # type: ignore[arg-type]


class Answer:
    """An upstream's answer: its status line and headers read, its body as it comes."""

    __slots__ = ("_connection", "_done", "_seconds", "raw_headers", "reason", "status")

    def __init__(self, connection: _Connection, seconds: float) -> None:
        self._connection, self._seconds = connection, seconds
        self.status = connection.status
        self.reason = connection.reason.decode("latin-1")
        self.raw_headers = tuple(connection.headers)
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case)."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as it is read: what came since the last chunk, up to CHUNK bytes
        at a time."""
        connection = self._connection
        while True:
            if connection.buffered:
                yield connection.take()
                continue
            if connection.complete:
                self.close()
                return
            error = connection.error
            if error is not None:
                self.close()
                raise error
            await connection.wait(self._seconds)

    async def read(self) -> bytes:
        pieces = [chunk async for chunk in self.chunks()]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        """Done with the answer: its connection goes back to the pool if it was read to
        its end and may be kept, and is closed otherwise (the upstream sees the call end)."""
        if self._done:
            return
        self._done = True
        self._connection.pool.release(self._connection)


class Http1Pool:
    """Kept-alive HTTP/1.1 connections to the upstreams of one SDK client's transport."""

    def __init__(
        self,
        *,
        limit: int | None,
        keepalive_s: float | None,
        ssl_context: ssl.SSLContext | None,
        socket_factory: Callable[[tuple[Any, ...]], socket.socket],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._limit = limit or 0
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._socket = socket_factory
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        # (host, port) -> (when the addresses expire, the addresses), and the
        # lookups under way; `lookup` is the loop's getaddrinfo (tests count it).
        self._addresses: dict[tuple[str, int], tuple[float, Addresses]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Future[Addresses]] = {}
        self.lookup: Callable[..., Awaitable[Addresses]] = self.loop.getaddrinfo

    async def post(
        self,
        url: yarl.URL,
        head: bytes,
        body: bytes,
        seconds: float,
        server_hostname: str | None,
    ) -> Answer:
        """POSTs `body` after `head` (the request line and headers) and returns the
        answer once its headers are read."""
        secure = url.scheme == "https"
        key = (url.raw_host or "", url.port or (443 if secure else 80), secure)
        connection = await self._acquire(key, seconds, server_hostname)
        connection.busy = True
        connection.read_at = self.loop.time()
        transport = connection.transport
        assert transport is not None
        try:
            transport.writelines((head, body))  # one send for both
            while not connection.has_headers:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(seconds)
        except BaseException:
            connection.close()
            raise
        return Answer(connection, seconds)

    async def _acquire(
        self, key: tuple[str, int, bool], seconds: float, server_hostname: str | None
    ) -> _Connection:
        """A kept connection to `key`, a new one if there is room, or the first one
        freed within `seconds` (aiohttp's `connect` timeout covers both waits)."""
        deadline = self.loop.time() + seconds
        while True:
            if self.closed:
                raise aiohttp.ClientConnectionError("Connector is closed.")
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()
                if not connection.closed and not self._expired(connection):
                    return connection
                connection.close()
            if not self._limit or self._open < self._limit:
                break
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            timer = self.loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # the place it was woken for goes to the next
                raise
            finally:
                timer.cancel()
                if not waiter.done():
                    waiter.cancel()
        self._open += 1
        try:
            async with asyncio.timeout_at(deadline):
                connection = await self._connect(key, server_hostname)
        except TimeoutError as err:
            self._freed()
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {key[0]}:{key[1]}"
            ) from err
        except OSError as err:
            self._freed()
            if isinstance(err, ssl.SSLError):
                raise aiohttp.ClientConnectorSSLError(_connection_key(key), err) from err
            raise aiohttp.ClientConnectorError(_connection_key(key), err) from err
        except BaseException:
            self._freed()
            raise
        connection.counted = True
        return connection

    async def _connect(
        self, key: tuple[str, int, bool], server_hostname: str | None
    ) -> _Connection:
        host, port, secure = key
        addresses = await self._addresses_of(host, port)
        error: OSError = OSError(f"Cannot resolve {host}")
        for address in addresses:
            sock = self._socket(address)
            sock.setblocking(False)
            try:
                await self.loop.sock_connect(sock, address[4])
            except OSError as err:
                sock.close()
                error = err
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self, key),
                sock=sock,
                ssl=(self._ssl or True) if secure else None,
                server_hostname=(server_hostname or host) if secure else None,
            )
            return connection
        self._addresses.pop((host, port), None)  # none answered: look them up again
        raise error

    async def _addresses_of(self, host: str, port: int) -> Addresses:
        """The host's addresses, as looked up less than DNS_TTL_S ago, or by the
        lookup under way, or by a new one."""
        known = self._addresses.get((host, port))
        if known is not None and known[0] > self.loop.time():
            return known[1]
        lookup = self._lookups.get((host, port))
        if lookup is None:
            # A task of its own: a caller that gives up does not cancel the
            # lookup the others wait for.
            lookup = self._lookups[host, port] = self.loop.create_task(self._look_up(host, port))
            lookup.add_done_callback(_retrieved)
        return await asyncio.shield(lookup)

    async def _look_up(self, host: str, port: int) -> Addresses:
        try:
            addresses = await self.lookup(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            self._addresses[host, port] = (self.loop.time() + DNS_TTL_S, addresses)
            return addresses
        finally:
            del self._lookups[host, port]

    def release(self, connection: _Connection) -> None:
        """Takes back a connection whose answer is done with."""
        reusable = connection.complete and connection.reusable and not connection.closed
        connection.reset()
        if reusable and not self.closed:
            connection.idle_since = self.loop.time()
            self._idle.setdefault(connection.key, []).append(connection)
            self._schedule_sweep()
            self._wake_one()
        else:
            connection.close()

    def forget(self, connection: _Connection) -> None:
        """A connection that closed: its place in the pool is free."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.counted:
            connection.counted = False
            self._freed()

    def _freed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expired(self, connection: _Connection) -> bool:
        return (
            self._keepalive_s is not None
            and self.loop.time() - connection.idle_since > self._keepalive_s
        )

    def _schedule_sweep(self) -> None:
        if self._sweep is None and self._keepalive_s:
            self._sweep = self.loop.call_later(self._keepalive_s, self._close_expired)

    def _close_expired(self) -> None:
        self._sweep = None
        for idle in list(self._idle.values()):
            for connection in [c for c in idle if self._expired(c)]:
                connection.close()
        if any(self._idle.values()):
            self._schedule_sweep()

    async def aclose(self) -> None:
        """Closes the kept connections; answers being read end when they are closed."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.close()
        self._idle.clear()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks a failed lookup's exception seen: each caller that waited for it got it."""
    if not task.cancelled():
        task.exception()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(aiohttp.ConnectionTimeoutError("Timeout waiting for a connection"))


def _connection_key(key: tuple[str, int, bool]) -> Any:
    from aiohttp.client_reqrep import ConnectionKey

    host, port, secure = key
    return ConnectionKey(host, port, secure, secure, None, None, None)
