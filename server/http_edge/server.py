"""The HTTP front door's server: uvicorn in the gateway's process and event loop.

uvicorn with httptools parses HTTP/1.1 and drives the ASGI application
(app.py). It runs on the loop the gRPC server uses, so one core serves
both edges, and is started and drained by the Gateway (server/app.py): its
start-up, ticking and shutdown are uvicorn's own `startup`, `main_loop` and
`shutdown` (not `serve`, which would install signal handlers of its own
over the gateway's). The listening socket is made here: with several
workers each binds the same port with SO_REUSEPORT, as the gRPC server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from server.config import ConfigError
from server.http_edge.app import FrontDoor

log = logging.getLogger(__name__)


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} (http.host, http.port): {err.strerror}"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """Serves a FrontDoor on one port until drained."""

    def __init__(self, app: FrontDoor, host: str, port: int, *, reuse_port: bool = False):
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",  # the gateway's loop, already running
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            ws="none",
            interface="asgi3",
            timeout_keep_alive=75,  # above the usual 60 s idle timeout of load balancers
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Binds, starts serving and returns the bound port."""
        self._socket = _socket(self._host, self._port, self._reuse_port)
        self.port = self._socket.getsockname()[1]
        self._config.load()
        # The per-call log line (server/logs.py) says what an access log would,
        # with the call's outcome; uvicorn's would be a second line per request.
        logging.getLogger("uvicorn.access").disabled = True
        self._server.lifespan = self._config.lifespan_class(self._config)
        await self._server.startup(sockets=[self._socket])
        # Updates the Date header and watches for should_exit, ten times a second.
        self._ticker = asyncio.get_running_loop().create_task(self._server.main_loop())
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuses new connections, lets requests in flight finish for `grace` seconds,
        then cancels the rest."""
        if self._ticker is None:
            return
        self._config.timeout_graceful_shutdown = max(grace, 0.1)  # type: ignore[assignment]
        self._server.should_exit = True
        await self._ticker
        await self._server.shutdown(sockets=[self._socket] if self._socket else None)
        # Tasks cancelled at the end of the grace period finish their cleanup
        # (the upstream closed, the call recorded) before the gateway goes on.
        tasks = list(self._server.server_state.tasks)
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)

    def cancel_requests(self) -> None:
        """Cancels the requests being served now (the gateway exits at once)."""
        for task in list(self._server.server_state.tasks):
            task.cancel()

    @property
    def connections(self) -> int:
        return len(self._server.server_state.connections)
