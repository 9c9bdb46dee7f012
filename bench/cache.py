"""The response cache's worth and cost (issue 20): `python -m bench.cache`.

End to end, each gateway in its own process on core 0 and bench/loadgen
(gRPC Generate, the offline `echo` model, one request repeated) on core 1:

  cache off       every call made by the offline provider
  memory hits     cache.enabled, memory backend: every call after the first a hit
  redis hits      the same on a redis-server this script starts (Debian's)

and in this process, on the memory backend, what a miss costs the gateway
beyond the call itself (looking up, keeping the answer, storing it): the same
echo calls with distinct texts, through the cache and without it, per call.

Targets: a hit p50 <= 1 ms at concurrency 1 and >= 80% of the offline
provider's throughput (memory); Redis within 0.5 ms of memory at p50; a miss
<= 50 us more than with the cache off.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.processes import SERVER_CORE, free_port, pinned
from bench.run import Bench, _request

PROVIDERS = {"offline": {"type": "offline"}}
CALLS = {1: 2000, 32: 6000}


def _config(bench: Bench, port: int, cache: dict[str, Any] | None, redis_url: str = "") -> Path:
    path = bench.gateway_config(port, PROVIDERS)
    config = yaml.safe_load(path.read_text())
    if cache is not None:
        config["cache"] = cache
    if redis_url:
        config["redis"] = {"url": redis_url}
    path.write_text(yaml.safe_dump(config))
    return path


def _redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [*pinned(SERVER_CORE), binary, "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def end_to_end(bench: Bench) -> list[dict[str, Any]]:
    request = bench.request_file("cache-echo", _request("echo", "Hello, cache", max_tokens=64))
    rows: list[dict[str, Any]] = []
    redis_port = free_port()
    redis = _redis(redis_port)
    try:
        for target, cache, url in (
            ("cache off", None, ""),
            ("memory hits", {"enabled": True, "backend": "memory"}, ""),
            (
                "redis hits",
                {"enabled": True, "backend": "redis"},
                f"redis://127.0.0.1:{redis_port}/0",
            ),
        ):
            port = free_port()
            with bench.gateway(_config(bench, port, cache, url), core=SERVER_CORE):
                for c in (1, 32):
                    result = bench.loadgen(f"127.0.0.1:{port}", request, "unary", c, calls=CALLS[c])
                    rows.append({"target": target, "concurrency": c, **result})
                    print(
                        f"  {target:12s} c={c:<3d} {result['calls_per_s']:7.0f}/s"
                        f"  p50 {result['latency_ms']['p50']:6.3f}"
                        f"  p99 {result['latency_ms']['p99']:6.3f} ms"
                        + (f"  errors {result['errors']}" if result["errors"] else ""),
                        flush=True,
                    )
    finally:
        redis.kill()
        redis.wait()
    return rows


async def miss_cost(calls: int, rounds: int) -> tuple[float, float]:
    """Per call, microseconds: echo calls with distinct texts without the cache,
    and the same through it (every one a miss, stored); medians over `rounds`."""
    from server.cache import ResponseCache
    from server.cache.directives import CacheDirectives
    from server.calls import CallRecord
    from server.config import CacheConfig, RedisConfig, load_config
    from server.routing import Router
    from server.schema import GenerationRequest, Message, Role, TextBlock

    router = Router.from_config(load_config(environ={}, overrides={"providers": PROVIDERS}))
    route = router.resolve("echo")
    assert route is not None
    cache = ResponseCache(
        CacheConfig(enabled=True, max_bytes=1 << 30, max_pending_bytes=1 << 30), RedisConfig()
    )
    serial = 0

    def request() -> GenerationRequest:
        nonlocal serial
        serial += 1
        return GenerationRequest(
            model="echo",
            messages=[Message(Role.USER, [TextBlock(f"Hello, cache {serial}")])],
            max_tokens=64,
            request_id=f"r{serial}",
        )

    async def plain() -> None:
        call_request = request()
        CallRecord(method="Generate", request_id=call_request.request_id)  # as a call makes
        async for _ in router.stream(call_request, route):
            pass

    async def cached() -> None:
        call_request = request()
        record = CallRecord(method="Generate", request_id=call_request.request_id)
        opened = await cache.open(
            record, call_request, route, protocol="grpc", directives=CacheDirectives()
        )
        assert opened is not None
        assert not opened.hit
        try:
            async for _ in opened.events(call_request, route, router.stream):
                pass
        finally:
            await opened.close()

    async def per_call(make: Any) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await make()
        return (time.perf_counter() - started) / calls * 1e6

    for make in (plain, cached):  # warm up
        await per_call(make)
    without, through = [], []
    for _ in range(rounds):  # interleaved: the machine's noise hits both alike
        without.append(await per_call(plain))
        through.append(await per_call(cached))
    await cache.aclose()
    await router.aclose()
    return statistics.median(without), statistics.median(through)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="in-process rounds (median)")
    parser.add_argument("--calls", type=int, default=2000, help="in-process calls per round")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cache-"):
        bench = Bench(quick=False)
        print("end to end (gRPC Generate, offline echo, one request repeated):", flush=True)
        rows = end_to_end(bench)
    find = {(r["target"], r["concurrency"]): r for r in rows}
    off1, mem1, red1 = (find[t, 1] for t in ("cache off", "memory hits", "redis hits"))
    off32, mem32 = find["cache off", 32], find["memory hits", 32]
    print("in process (memory backend, every call a miss):", flush=True)
    without, through = asyncio.run(miss_cost(args.calls, args.rounds))
    hit_p50 = mem1["latency_ms"]["p50"]
    share = mem32["calls_per_s"] / off32["calls_per_s"]
    redis_gap = red1["latency_ms"]["p50"] - hit_p50
    miss = through - without
    print(
        "\n".join(
            [
                f"- memory hit p50 at c=1: {hit_p50:.3f} ms (target <= 1 ms; cache off:"
                f" {off1['latency_ms']['p50']:.3f} ms)",
                f"- memory hits at c=32: {mem32['calls_per_s']:.0f}/s = {100 * share:.0f}% of the"
                f" offline provider's {off32['calls_per_s']:.0f}/s (target >= 80%)",
                f"- redis hit p50 at c=1: {red1['latency_ms']['p50']:.3f} ms, {redis_gap:+.3f} ms"
                " from memory (target <= 0.5 ms)",
                f"- a miss: {through:.1f} us per call through the cache, {without:.1f} us"
                f" without: {miss:+.1f} us (target <= 50 us)",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
