"""One HTTP request and its answer, over ASGI: the HTTP edge's only contact with the server.

The handlers read the request (headers, a size-limited body) and answer
through an Exchange: a whole response, or a stream of chunks. The ASGI
messages are built here and nowhere else. A client that disconnects while
its call runs cancels the handler's task (`watch_disconnect`), so that the
router closes the upstream request at once and the call is recorded as
cancelled, billed for what it produced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.http_edge.errors import BodyTooLargeError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# How long a call runs before the gateway watches for its client leaving.
WATCH_AFTER_S = 0.02


class ClientGoneError(Exception):
    """The client disconnected before the request body was read."""


class Exchange:
    """A request being served: its headers and body in, its response out."""

    __slots__ = (
        "_receive",
        "_send",
        "_watcher",
        "disconnected",
        "ended",
        "header_list",
        "headers",
        "method",
        "path",
        "query",
        "request_id",
        "started",
        "status",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        # The disconnect watch: its timer, then its task (watch_disconnect).
        self._watcher: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        # Every header as it came (names lower-cased, as ASGI gives them), and a
        # lookup by name in which repeated headers are joined with commas.
        self.header_list: list[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        ]
        headers: dict[str, str] = {}
        for name, value in self.header_list:
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        self.headers = headers
        self.request_id = ""
        self.started = False  # the response's status line has been sent
        self.status = 0
        self.disconnected = False  # the client went away while its call ran
        self.ended = False  # the response is complete

    async def body(self, limit: int) -> bytes:
        """The whole request body; a body over `limit` bytes is refused before it is all read."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError(f"the request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGoneError()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLargeError(f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def watch_disconnect(self) -> None:
        """Cancels the current task when the client disconnects (once the body is read).

        The watching starts after WATCH_AFTER_S: a call answered sooner (most
        unary calls) costs a timer, not a task and its cancellation, and a
        client that leaves is noticed at most that much later.
        """
        task = asyncio.current_task()
        assert task is not None
        self._watcher = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._watch, task)

    def _watch(self, task: asyncio.Task[None]) -> None:
        receive = self._receive

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    task.cancel("client disconnected")
                    return

        self._watcher = asyncio.get_running_loop().create_task(watch())

    def close(self) -> None:
        """Stops watching for a disconnect (the response is over).

        Not awaited: a cancelled task takes the cancellation at its next step
        whatever it was about to receive, so the watcher can no longer cancel
        the call, and the request's task ends without another turn of the loop.
        """
        watcher = self._watcher
        if watcher is not None:
            watcher.cancel()  # the timer, or the task (a no-op once it is done)

    def _headers(self, headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
        encoded = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        if self.request_id:
            # The gateway's id for the call (its ledger row, its log line), where
            # each SDK reads one: `request-id` (Anthropic's), `x-request-id`
            # (OpenAI's), unless an upstream's relayed answer already names it.
            given = {name for name, _ in headers}
            value = self.request_id.encode("latin-1")
            for name in (b"request-id", b"x-request-id"):
                if name.decode() not in given:
                    encoded.append((name, value))
        return encoded

    async def respond(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        """Sends a whole response."""
        self.started = True
        self.status = status
        encoded = self._headers(headers)
        encoded.append((b"content-length", str(len(body)).encode()))
        if status == 413:
            # The unread rest of the body would otherwise be read and discarded.
            encoded.append((b"connection", b"close"))
        await self._send({"type": "http.response.start", "status": status, "headers": encoded})
        await self._send({"type": "http.response.body", "body": body})
        self.ended = True

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Sends the status and headers of a streamed response."""
        self.started = True
        self.status = status
        await self._send(
            {"type": "http.response.start", "status": status, "headers": self._headers(headers)}
        )

    async def write(self, data: bytes) -> None:
        """Sends one chunk of a streamed response."""
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        self.ended = True
        await self._send({"type": "http.response.body", "body": b""})
