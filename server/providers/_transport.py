"""The HTTP client under an SDK provider, and what a failure to reach the upstream was.

Each SDK-backed provider instance owns one HTTP client, and so one connection
pool to its upstream, shared by every call and by the copies a rotated key
makes. Two transports, chosen per instance (`http_transport`):

- `aiohttp` (the default): the SDKs' own `DefaultAioHttpClient`, their
  documented aiohttp transport (the vendored httpx-aiohttp). About 40% less
  CPU per call than their default (issue 19 has the measurements).
- `httpx`: the SDKs' `DefaultAsyncHttpxClient`, what they use by default.

Both are httpx2 clients to the SDK, so requests are built the same way, to the
byte (tests/test_sdk_call_parity.py). Both read HTTP(S)_PROXY, ALL_PROXY and
NO_PROXY from the environment (httpx2 picks the proxy per URL and hands it to
the transport; aiohttp's own `trust_env` stays off, so nothing is read twice)
and SSL_CERT_FILE / SSL_CERT_DIR. A call's timeout (what is left of the
caller's deadline) bounds connecting, waiting for a pooled connection and
each read, as httpx2 does.

The aiohttp transport re-raises aiohttp's errors as httpx2's, and the SDK
wraps those in its own; the OpenAI SDK's copy maps every
`aiohttp.ClientConnectionError`, an upstream that hung up included, to
`httpx2.ConnectTimeout`. `transport_failure` reads the chain back to the
error that happened, so that a dropped connection is not taken for a timeout.
The few aiohttp errors the transport does not map arrive as they are: the
providers catch `aiohttp.ClientError` beside httpx2's errors.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any, Literal

import aiohttp
import httpx2

from server.providers._http1 import Http1Pool

HttpTransport = Literal["aiohttp", "httpx"]


def http_client(
    transport: HttpTransport,
    clients: dict[HttpTransport, Callable[..., httpx2.AsyncClient]],
    *,
    max_connections: int,
    keepalive_s: float,
    timeout_s: float,
) -> httpx2.AsyncClient:
    """The SDK's client class for `transport`, with this instance's pool and timeout."""
    limits = httpx2.Limits(
        max_connections=max_connections,
        # Every pooled connection may stay open: aiohttp has no separate cap.
        max_keepalive_connections=max_connections,
        keepalive_expiry=keepalive_s,
    )
    client_class = clients[transport]
    if transport == "aiohttp":
        client_class = _tuned(client_class)
    return client_class(limits=limits, timeout=timeout_s)


# What a connection to an upstream reads ahead of the gateway. aiohttp reads
# until twice `read_bufsize` waits unread, and one socket read takes whatever
# the kernel holds (uvloop reads up to 256 KiB), whose receive buffer grows by
# autotuning: bounded, a stream nobody reads costs the gateway about 200 KiB,
# not 550 (tests/test_slow_readers.py). A 64 KiB window still carries a model's
# stream many times over; a large unary answer takes a round trip per 64 KiB.
READ_BUFSIZE = 16 * 1024
RECEIVE_BUFFER = 64 * 1024
# TCP keepalive probes, as the SDKs' own httpx transport sends them: a long
# silent stream (a model thinking) is not dropped by a NAT or load balancer.
_KEEPALIVE = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    *[
        (socket.IPPROTO_TCP, option, value)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5))
        if (option := getattr(socket, name, None)) is not None
    ],
]


def _tuned(client_class: Callable[..., httpx2.AsyncClient]) -> Callable[..., httpx2.AsyncClient]:
    """The SDK's aiohttp client class, its connections' sockets and read-ahead tuned.

    httpx-aiohttp builds one AiohttpTransport per proxy route (httpx2 reads the
    proxies from the environment); each takes a factory for its aiohttp
    session (its documented `client` argument), called on first use.
    """

    class TunedAioHttpClient(client_class):  # type: ignore[misc,valid-type]
        def _init_transport(self, *args: Any, **kwargs: Any) -> Any:
            return _with_tuned_session(super()._init_transport(*args, **kwargs))

        def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> Any:
            return _with_tuned_session(super()._init_proxy_transport(*args, **kwargs))

        async def aclose(self) -> None:
            for transport in [self._transport, *self._mounts.values()]:
                pool = getattr(transport, "relay_pool", None)
                if isinstance(pool, Http1Pool):
                    await pool.aclose()
            await super().aclose()

    return TunedAioHttpClient


def _with_tuned_session(transport: Any) -> Any:
    if getattr(transport, "client", False) is None:  # not one given by its caller
        transport.client = functools.partial(_session, transport)
        # Relayed calls (_relay.send_relayed) go through a pool of their own, with
        # the same limits, TLS context and sockets (_http1.py), made on first use.
        transport.relay_pool = functools.partial(_relay_pool, transport)
    return transport


def _relay_pool(transport: Any) -> Http1Pool:
    limits: httpx2.Limits = transport.limits
    return Http1Pool(
        limit=limits.max_connections,
        keepalive_s=limits.keepalive_expiry,
        ssl_context=transport.ssl_context,
        socket_factory=_socket,
    )


def _session(transport: Any) -> aiohttp.ClientSession:
    """What AiohttpTransport.get_client builds, with tuned sockets and read-ahead."""
    limits: httpx2.Limits = transport.limits
    connector = aiohttp.TCPConnector(
        limit=limits.max_connections or 0,
        keepalive_timeout=limits.keepalive_expiry,
        ssl=transport.ssl_context,
        socket_factory=_socket,
    )
    return aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFSIZE)


def _socket(address: tuple[Any, ...]) -> socket.socket:
    family, kind, protocol = address[0], address[1], address[2]
    sock = socket.socket(family=family, type=kind, proto=protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    for level, option, value in _KEEPALIVE:
        sock.setsockopt(level, option, value)
    return sock


FailureOfTransport = Literal["timeout", "connection"]


def transport_failure(err: BaseException) -> FailureOfTransport | None:
    """Whether `err` (or what it was raised from) is a timeout or a failed connection.

    The aiohttp error at the root of the chain, when there is one, says what
    happened; otherwise the first httpx2 transport error does. None: neither
    (an HTTP error status, a body the gateway cannot read), or only the SDK's
    own exception class says it (the caller checks that).
    """
    found: FailureOfTransport | None = None
    cause: BaseException | None = err
    for _ in range(8):  # a chain is a few links long; never loop on a cycle
        if cause is None:
            break
        if isinstance(cause, aiohttp.ClientError):
            # ServerTimeoutError (connect and read timeouts) is a TimeoutError too.
            return "timeout" if isinstance(cause, asyncio.TimeoutError) else "connection"
        if found is None and isinstance(cause, httpx2.TransportError):
            found = "timeout" if isinstance(cause, httpx2.TimeoutException) else "connection"
        cause = cause.__cause__
    return found
