"""The direct path: the official SDK calling the fake upstream, no gateway.

It makes the calls a service would make without the gateway (`unary`: a
non-streaming create; `stream`: a streaming create read to the end) at a
given concurrency and prints the same JSON summary as bench/loadgen, so the
gateway's added latency is gateway-path minus this. (The gateway
makes one non-streaming call for Generate, like `unary` here.)

Usage: python -m bench.direct_sdk [--post] [--aiohttp] anthropic|openai BASE_URL unary|stream C N
                                  [MODEL [API_KEY]]

--post calls the SDK the way the gateway's providers do: its generic
`client.post`, responses as parsed JSON instead of pydantic models (see
`post_arguments` in server/providers/_upstream.py). Against it, the
gateway's added latency is its own cost alone; against the typed methods
(the default, what a service without the gateway would write) it is net of
what the gateway saves on the SDK's side.

--aiohttp gives the SDK its documented aiohttp transport
(`DefaultAioHttpClient`, the SDKs' `aiohttp` extra), the transport the
gateway's providers use by default; without it the SDK's default (httpx).

MODEL and API_KEY serve `make bench-peer`, where BASE_URL is a peer gateway
(LiteLLM's proxy) speaking the same API in front of the same fake upstream.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

MAX_TOKENS = 256


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "count": len(ordered),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


async def run(
    provider: str,
    base_url: str,
    method: str,
    concurrency: int,
    total: int,
    model: str = "bench-model",
    api_key: str = "bench",
    *,
    post: bool = False,
    aiohttp: bool = False,
) -> dict[str, Any]:
    call: Callable[[], Awaitable[float | None]]
    client: Any = _client(provider, base_url, api_key, aiohttp)
    if post:
        call = _post_call(client, provider, method, model)
    elif provider == "anthropic":

        async def typed_anthropic() -> float | None:
            first = None
            start = time.perf_counter()
            if method == "unary":
                await client.messages.create(
                    model=model,
                    max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": "Hello"}],
                )
                return None
            stream = await client.messages.create(
                model=model,
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Hello"}],
                stream=True,
            )
            async with stream:
                async for event in stream:
                    if first is None and event.type == "content_block_delta":
                        first = time.perf_counter() - start
            return first

        call = typed_anthropic
    else:

        async def typed_openai() -> float | None:
            first = None
            start = time.perf_counter()
            if method == "unary":
                await client.chat.completions.create(
                    model=model,
                    max_completion_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": "Hello"}],
                )
                return None
            stream = await client.chat.completions.create(
                model=model,
                max_completion_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Hello"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
            return first

        call = typed_openai

    latencies: list[float] = []
    firsts: list[float] = []
    errors: dict[str, int] = {}
    remaining = total + min(50, total)  # the first 50 calls warm up and are discarded
    warmup = min(50, total)

    async def worker() -> None:
        nonlocal remaining, warmup
        while remaining > 0:
            remaining -= 1
            measuring = warmup <= 0
            warmup -= 1
            start = time.perf_counter()
            try:
                first = await call()
            except Exception as err:
                if measuring:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            if measuring:
                latencies.append((time.perf_counter() - start) * 1000)
                if first is not None:
                    firsts.append(first * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    result: dict[str, Any] = {
        "method": method,
        "concurrency": concurrency,
        "calls": len(latencies),
        "errors": sum(errors.values()),
        "error_codes": errors,
        "elapsed_s": elapsed,
        "calls_per_s": len(latencies) / elapsed,
        "latency_ms": summarize(latencies),
    }
    if method == "stream":
        result["first_chunk_ms"] = summarize(firsts)
    return result


def _client(provider: str, base_url: str, api_key: str, aiohttp: bool) -> Any:
    """The SDK's async client, on its default transport or its aiohttp one."""
    if provider == "anthropic":
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            **({"http_client": anthropic.DefaultAioHttpClient()} if aiohttp else {}),
        )
    import openai

    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        max_retries=0,
        **({"http_client": openai.DefaultAioHttpClient()} if aiohttp else {}),
    )


def _post_call(
    client: Any, provider: str, method: str, model: str
) -> Callable[[], Awaitable[float | None]]:
    """One call through the client's `client.post`, as the gateway makes it."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    stream_cls: Any
    if provider == "anthropic":
        import anthropic

        path, stream_cls = "/v1/messages", anthropic.AsyncStream[object]
        body["max_tokens"] = MAX_TOKENS

        def is_content(event: Any) -> bool:
            return bool(event.get("type") == "content_block_delta")
    else:
        import openai

        path, stream_cls = "/chat/completions", openai.AsyncStream[object]
        body["max_completion_tokens"] = MAX_TOKENS

        def is_content(event: Any) -> bool:
            choices = event.get("choices") or ()
            return bool(choices and (choices[0].get("delta") or {}).get("content"))

    async def call() -> float | None:
        start = time.perf_counter()
        if method == "unary":
            await client.post(path, body=body, cast_to=object)
            return None
        streamed = {**body, "stream": True}
        if provider == "openai":
            streamed["stream_options"] = {"include_usage": True}
        stream = await client.post(
            path, body=streamed, cast_to=object, stream=True, stream_cls=stream_cls
        )
        first = None
        async with stream:
            async for event in stream:
                if first is None and is_content(event):
                    first = time.perf_counter() - start
        return first

    return call


if __name__ == "__main__":
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if flags - {"--post", "--aiohttp"}:
        sys.exit(__doc__)
    provider, base_url, method, concurrency, total = args[:5]
    extra = args[5:7]
    result = asyncio.run(
        run(
            provider,
            base_url,
            method,
            int(concurrency),
            int(total),
            *extra,
            post="--post" in flags,
            aiohttp="--aiohttp" in flags,
        )
    )
    print(json.dumps(result))
