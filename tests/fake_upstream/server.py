"""A real HTTP server that speaks Anthropic's and OpenAI's APIs, for tests.

It runs in the test process on 127.0.0.1, port 0, in the session's event
loop, and serves both APIs at once:

    POST /v1/messages                 Anthropic Messages (streaming or not)
    POST /v1/messages/count_tokens    Anthropic token counting
    POST /v1/chat/completions         OpenAI Chat Completions (streaming or not)
    POST /v1/responses                OpenAI Responses (streaming or not)

It records every request (method, path, headers, JSON body) and notices
when a client goes away before the response is finished. Tests script
what it answers with `enqueue(Reply(...))`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_upstream import anthropic_wire, openai_wire, responses_wire
from tests.fake_upstream.script import Reply


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any
    received_at: float
    query: str = ""
    raw: bytes = b""  # the body's bytes as received
    ended_at: float | None = None
    # True when the client closed the connection before the response ended.
    disconnected: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class FakeUpstream:
    """Both fake APIs on one port; `anthropic_url` and `openai_url` are the SDK base URLs."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        # Anthropic's API takes bodies up to 32 MB (aiohttp's default is 1 MiB).
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._responses)
        # Cancels a handler when its client disconnects: that is how we notice.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.port = 0

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    def enqueue(self, *replies: Reply) -> None:
        """The next requests get these replies, in order."""
        self._replies.extend(replies)

    def reset(self) -> None:
        self.requests.clear()
        self._replies.clear()

    def last(self, path: str = "") -> RecordedRequest:
        """The last request received (to `path`, when given)."""
        matching = [r for r in self.requests if not path or r.path == path]
        assert matching, f"no request to {path or 'any path'} received"
        return matching[-1]

    # -- handlers --------------------------------------------------------------

    async def _record(self, request: web.Request) -> tuple[RecordedRequest, Reply]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            received_at=asyncio.get_running_loop().time(),
            query=request.query_string,
            raw=raw,
        )
        self.requests.append(recorded)
        reply = self._replies.popleft() if self._replies else Reply()
        return recorded, reply

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        recorded, reply = await self._record(request)
        model = recorded.body.get("model", "") if isinstance(recorded.body, dict) else ""
        return await self._respond(
            request,
            recorded,
            reply,
            headers=anthropic_wire.response_headers(reply),
            error=lambda status: anthropic_wire.error_body(reply, status),
            body=lambda: anthropic_wire.message_body(reply, model),
            events=lambda: anthropic_wire.stream_events(reply, model),
            stream_error=anthropic_wire.stream_error_event,
        )

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        recorded, reply = await self._record(request)
        return await self._respond(
            request,
            recorded,
            reply,
            headers=anthropic_wire.response_headers(reply),
            error=lambda status: anthropic_wire.error_body(reply, status),
            body=lambda: {"input_tokens": reply.count_tokens},
            events=None,
            stream_error=anthropic_wire.stream_error_event,
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        recorded, reply = await self._record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        model = body.get("model", "")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._respond(
            request,
            recorded,
            reply,
            headers=openai_wire.response_headers(reply),
            error=lambda status: openai_wire.error_body(reply, status),
            body=lambda: openai_wire.completion_body(reply, model),
            events=lambda: openai_wire.stream_events(reply, model, include_usage),
            stream_error=openai_wire.stream_error_event,
        )

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        recorded, reply = await self._record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        return await self._respond(
            request,
            recorded,
            reply,
            headers=responses_wire.response_headers(reply),
            error=lambda status: responses_wire.error_body(reply, status),
            body=lambda: responses_wire.response_body(reply, body),
            events=lambda: responses_wire.stream_events(reply, body),
            stream_error=lambda _reply: responses_wire.stream_error_event(reply, body),
        )

    async def _respond(
        self,
        request: web.Request,
        recorded: RecordedRequest,
        reply: Reply,
        *,
        headers: dict[str, str],
        error: Any,
        body: Any,
        events: Any,
        stream_error: Any,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        completed = False
        try:
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            if reply.status != 200:
                completed = True
                return web.json_response(error(reply.status), status=reply.status, headers=headers)
            streaming = isinstance(recorded.body, dict) and recorded.body.get("stream") is True
            if reply.raw_body is not None:
                completed = True
                kind = reply.raw_content_type or (
                    "text/event-stream" if streaming else "application/json"
                )
                return web.Response(body=reply.raw_body, content_type=kind, headers=headers)
            if events is None or not streaming:
                completed = True
                return web.json_response(body(), headers=headers)
            response = web.StreamResponse(
                headers={
                    **headers,
                    "content-type": "text/event-stream; charset=utf-8",
                    "cache-control": "no-cache",
                }
            )
            await response.prepare(request)
            for sent, event in enumerate(events()):
                if reply.error_after is not None and sent == reply.error_after:
                    await response.write(stream_error(reply))
                    break
                if reply.reset_after is not None and sent == reply.reset_after:
                    assert request.transport is not None
                    request.transport.abort()
                    completed = True
                    return response
                if sent and reply.event_delay_s:
                    await asyncio.sleep(reply.event_delay_s)
                await response.write(event)
            await response.write_eof()
            completed = True
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            recorded.disconnected = True
            raise
        finally:
            recorded.disconnected = recorded.disconnected or not completed
            recorded.ended_at = loop.time()
            recorded.finished.set()
