"""One relayed call's round trip: aiohttp's client against the relay pool.

The providers send every upstream call through `_relay.send_relayed`, which
on the SDKs' aiohttp transport writes it through the relay pool
(server/providers/_http1.py) rather than aiohttp's `ClientSession.request`.
This measures the difference that choice makes where it is made: one call at
a time to the benchmark's fake upstream (bench/fake_upstream.py, started
here on the load core; the client on the server core), the same bytes both
ways, a whole JSON answer (unary) or the SSE stream of 20 deltas read to its
end (stream). Rounds alternate the two clients; it prints each round's p50,
p99 and CPU per call, then the medians.

Usage: python -m bench.relay_client [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
import yarl

from bench.processes import LOAD_CORE, SERVER_CORE, Service, free_port, python
from server.providers._http1 import Http1Pool

BODY = {"model": "bench-model", "max_tokens": 256, "messages": [{"role": "user", "content": "Hi"}]}
HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}

Call = Callable[[], Awaitable[None]]


async def with_aiohttp(
    url: str, body: bytes, stream: bool
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
    headers = {**HEADERS, "content-type": "application/json", "content-length": str(len(body))}
    timeout = aiohttp.ClientTimeout(sock_connect=60, sock_read=60, connect=60)

    async def call() -> None:
        answer = await session.request(
            "POST", url, headers=headers, data=body, allow_redirects=False,
            auto_decompress=False, compress=False, timeout=timeout,
        )  # fmt: skip
        try:
            if stream:
                async for _ in answer.content.iter_chunked(16 * 1024):
                    pass
            else:
                await answer.read()
        finally:
            answer.release()

    return call, session.close


async def with_pool(
    url: str, body: bytes, stream: bool
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    def make(address: tuple[object, ...]) -> socket.socket:
        return socket.socket(address[0], address[1], address[2])  # type: ignore[arg-type]

    pool = Http1Pool(limit=100, keepalive_s=30, ssl_context=None, socket_factory=make)
    target = yarl.URL(url)
    lines = [f"POST {target.raw_path_qs} HTTP/1.1", f"Host: {target.host_port_subcomponent}"]
    lines += [f"{k}: {v}" for k, v in HEADERS.items()]
    lines += ["content-type: application/json", f"content-length: {len(body)}", "", ""]
    head = "\r\n".join(lines).encode()

    async def call() -> None:
        answer = await pool.post(target, head, body, 60.0, None)
        if stream:
            async for _ in answer.chunks():
                pass
        else:
            await answer.read()

    return call, pool.aclose


async def measure(make: Callable[..., Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]],
                  url: str, stream: bool, calls: int) -> tuple[float, float, float]:  # fmt: skip
    body = json.dumps({**BODY, "stream": stream}).encode()
    call, close = await make(url, body, stream)
    for _ in range(50):
        await call()
    took = []
    cpu = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        took.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    await close()
    took.sort()
    return took[len(took) // 2] * 1e3, took[int(len(took) * 0.99)] * 1e3, cpu / calls * 1e6


async def run(url: str, calls: int, rounds: int) -> None:
    clients = {"aiohttp ClientSession": with_aiohttp, "relay pool": with_pool}
    results: dict[tuple[str, bool], list[tuple[float, float, float]]] = {}
    for n in range(rounds):
        for stream in (False, True):
            for name, make in clients.items():
                result = await measure(make, url, stream, calls)
                results.setdefault((name, stream), []).append(result)
                kind = "stream" if stream else "unary"
                print(f"round {n + 1} {kind:6} {name:22} p50 {result[0]:.3f} ms"
                      f"  p99 {result[1]:.3f} ms  {result[2]:.0f} µs CPU per call")  # fmt: skip
    print("\n| call | client | p50 ms | p99 ms | µs CPU per call |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (name, stream), rows in results.items():
        p50, p99, cpu = (statistics.median(r[i] for r in rows) for i in range(3))
        kind = "stream, 20 deltas" if stream else "unary"
        print(f"| {kind} | {name} | {p50:.3f} | {p99:.3f} | {cpu:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    upstream = Service(
        "fake-upstream", [python(), "-m", "bench.fake_upstream", str(port), "20"], core=LOAD_CORE
    )
    with upstream:
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {SERVER_CORE})
        uvloop.run(run(f"http://127.0.0.1:{port}/v1/messages", args.calls, args.rounds))


if __name__ == "__main__":
    main()
