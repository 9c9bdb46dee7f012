"""A fast fake upstream for the benchmark: Anthropic and OpenAI (Chat Completions and
Responses), canned, no delay.

It renders each response once at start-up with the test suite's wire-format
builders (tests/fake_upstream/*_wire.py, the one place that knows those
formats) and then only writes bytes: no recording, no scripting, no
artificial delay. CHUNKS sets the number of text deltas per stream.

Usage: python -m bench.fake_upstream PORT [CHUNKS]
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from tests.fake_upstream import anthropic_wire, openai_wire, responses_wire
from tests.fake_upstream.script import Reply, Text, Usage

MODEL = "bench-model"


def build_app(chunks: int) -> web.Application:
    words = [f"w{i} " for i in range(chunks)]
    reply = Reply(
        blocks=[Text("".join(words), pieces=words)],
        usage=Usage(input_tokens=20, output_tokens=chunks),
    )
    anthropic_json = json.dumps(anthropic_wire.message_body(reply, MODEL)).encode()
    anthropic_sse = b"".join(anthropic_wire.stream_events(reply, MODEL))
    anthropic_headers = anthropic_wire.response_headers(reply)
    openai_json = json.dumps(openai_wire.completion_body(reply, MODEL)).encode()
    openai_sse = b"".join(openai_wire.stream_events(reply, MODEL, include_usage=True))
    openai_headers = openai_wire.response_headers(reply)
    # The Responses API's answer echoes its request's settings: rendered for the
    # request the benchmark sends (bench/front_door.py).
    asked = {"model": MODEL, "input": "Hello", "max_output_tokens": 256}
    responses_json = json.dumps(responses_wire.response_body(reply, asked)).encode()
    responses_sse = b"".join(responses_wire.stream_events(reply, {**asked, "stream": True}))

    async def messages(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("stream"):
            return web.Response(
                body=anthropic_sse, content_type="text/event-stream", headers=anthropic_headers
            )
        return web.Response(
            body=anthropic_json, content_type="application/json", headers=anthropic_headers
        )

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("stream"):
            return web.Response(
                body=openai_sse, content_type="text/event-stream", headers=openai_headers
            )
        return web.Response(
            body=openai_json, content_type="application/json", headers=openai_headers
        )

    async def responses(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("stream"):
            return web.Response(
                body=responses_sse, content_type="text/event-stream", headers=openai_headers
            )
        return web.Response(
            body=responses_json, content_type="application/json", headers=openai_headers
        )

    # Bodies as large as the providers take (aiohttp's default is 1 MiB), for
    # bench/stall_probe.py's large requests.
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/responses", responses)
    return app


async def main(port: int, chunks: int) -> None:
    runner = web.AppRunner(build_app(chunks), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"fake upstream serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20))
