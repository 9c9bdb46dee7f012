"""An Anthropic upstream that streams as fast as it is read, for slow-reader probes.

POST /v1/messages with `"stream": true` answers with message_start and then
one-token text deltas until `max_tokens` of them or `limit_bytes` are
written (then message_delta and message_stop): an upstream that does not run
out before the gateway stops reading it. aiohttp's write waits while the socket is full: what it has
written per request (`written`) is what the gateway read, plus what the two
kernel's socket buffer holds (this side's is kept small). A request the
gateway abandons is counted in `disconnected`.

Used by tests/test_slow_readers.py and bench/unread_streams.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from aiohttp import web

from tests.fake_upstream import anthropic_wire
from tests.fake_upstream.script import Reply, Text, Usage

MODEL = "endless-model"
# Each delta is one token-sized piece, as real models stream; events are
# written in batches so the fake itself is not the bottleneck.
PIECE = "lorem "
BATCH = 64
SEND_BUFFER = 64 * 1024


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class EndlessUpstream:
    """One Anthropic endpoint on 127.0.0.1 that streams `limit_bytes` per request."""

    def __init__(self, limit_bytes: int = 1024 * 1024 * 1024) -> None:
        self.limit_bytes = limit_bytes
        self.written: dict[str, int] = {}  # per request: the x-request-id it got, or a counter
        self.disconnected = 0
        self.gone = asyncio.Event()  # set when a request is abandoned
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = f"call{len(self.written)}"
        self.written[name] = 0
        reply = Reply(blocks=[Text("")], usage=Usage(input_tokens=10, output_tokens=1))
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", **anthropic_wire.response_headers(reply)}
        )
        await response.prepare(request)
        # Little kept in this side's kernel: what it wrote is what the gateway's
        # side holds or has read (and 1,000 probe streams do not fill the
        # machine's TCP memory).
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        start = anthropic_wire.stream_events(reply, body.get("model", MODEL))[0]
        block = _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        delta = _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": PIECE},
            },
        )
        batch = delta * BATCH
        try:
            await response.write(start + block)
            self.written[name] += len(start) + len(block)
            tokens = 0
            max_tokens = int(body.get("max_tokens", 1 << 30))
            while self.written[name] < self.limit_bytes and tokens < max_tokens:
                await response.write(batch)
                self.written[name] += len(batch)
                tokens += BATCH
            tail = (
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                        "usage": {"input_tokens": 10, "output_tokens": tokens},
                    },
                )
                + _sse("message_stop", {"type": "message_stop"})
            )
            await response.write(tail)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected += 1
            self.gone.set()
            raise
        return response


def provider_config(upstream: EndlessUpstream) -> dict[str, Any]:
    """The gateway's `providers` for a model `endless` served by `upstream`."""
    return {
        "endless": {
            "type": "anthropic",
            "api_key": "sk-ant-endless-test",
            "base_url": upstream.url,
            "models": [
                {
                    "id": "endless",
                    "upstream_id": MODEL,
                    "context_window": 20_000_000,
                    "max_output_tokens": 10_000_000,
                    "default_max_tokens": 10_000_000,
                    "pricing": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
                }
            ],
        }
    }
