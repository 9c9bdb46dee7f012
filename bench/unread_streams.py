"""What unread streams cost the gateway: memory per stream, upstream read ahead.

Starts a gateway process serving a model whose upstream streams without end
(tests/fake_upstream/endless.py), opens N streams, each from its own
connection as separate callers would, reads each one's first message and
then nothing more. Once the upstream has stopped being read (no byte
written for a while), it reports the gateway's resident memory against the
same gateway before the streams, and how much each stream's upstream wrote.

    .venv/bin/python -m bench.unread_streams [--streams 1000] [--edge grpc|http] [--shed N]

With --shed N the gateway's `server.max_concurrent_calls` is the number of
streams: they take every slot, and N more calls are made at once; each
should be refused (UNAVAILABLE, GATEWAY_OVERLOADED) within
`server.max_queue_s` (0.5 s by default), not left waiting to its deadline.

The test suite runs the same probe on fewer streams (tests/test_slow_readers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx2

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.fake_upstream.endless import EndlessUpstream, provider_config

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# The callers' HTTP/2 receive window: 64 KiB, not grown by BDP probes. A caller
# whose window grew (to ~4 MiB with grpc's C core) holds more of the stream
# itself before the gateway's writes wait, but the gateway holds the same once
# they do; a small window gets there in far less CPU.
CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log: list[str] = field(default_factory=list)

    def rss(self) -> int:
        """Resident memory, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert found is not None
        return int(found.group(1)) * 1024


@contextlib.asynccontextmanager
async def gateway_process(upstream: EndlessUpstream, env: dict[str, str]) -> AsyncIterator[Gateway]:
    """A gateway process serving model `endless` from `upstream`, its log read as it comes."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--port",
        "0",
        cwd=ROOT,
        env={
            **os.environ,
            "LLMGW_AUTH__ENABLED": "false",
            "LLMGW_HTTP__PORT": "0",
            "LLMGW_PROVIDERS": json.dumps(
                {**provider_config(upstream), "offline": {"type": "offline"}}
            ),
            "LLMGW_ROUTING__RETRY__MAX_ATTEMPTS": "1",
            "LLMGW_LOGGING__CALLS": "false",
            "LLMGW_LOGGING__FORMAT": "text",
            **env,
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    async with asyncio.timeout(90):
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise RuntimeError("gateway exited before serving:\n" + "".join(log))
            log.append(line)
            found = re.search(r"serving on [^ ]+:(\d+) \(gRPC\) and http://[^ ]+:(\d+)", line)
            if found:
                break
    gateway = Gateway(process, int(found.group(1)), int(found.group(2)), log)

    async def read_log() -> None:  # a full pipe would block the gateway's logging
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log.append(line.decode())

    reader = asyncio.create_task(read_log())
    try:
        yield gateway
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        await reader


def ask(max_tokens: int, request_id: str = "", model: str = "endless") -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="go on and on")])],
        max_tokens=max_tokens,
        request_id=request_id,
    )
    if model == "echo":  # an idle stream: the first token, then nothing for a minute
        request.provider_options.update({"chunk_delay_ms": 60_000})
    return request


async def settle(upstream: EndlessUpstream, quiet_s: float, limit_s: float) -> float:
    """Waits until the upstream has written nothing for `quiet_s`; returns the time it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    last, since = -1, loop.time()
    while loop.time() - started < limit_s:
        total = sum(upstream.written.values())
        if total != last:
            last, since = total, loop.time()
        elif loop.time() - since >= quiet_s:
            break
        await asyncio.sleep(0.1)
    return loop.time() - started


def tcp_memory() -> int:
    """The kernel's memory for TCP buffers, machine-wide, in bytes (/proc/net/sockstat)."""
    found = re.search(r"^TCP:.* mem (\d+)", Path("/proc/net/sockstat").read_text(), re.M)
    return int(found.group(1)) * os.sysconf("SC_PAGE_SIZE") if found else 0


@dataclass
class Result:
    edge: str
    streams: int
    rss_idle: int
    rss_unread: int
    upstream_bytes: list[int]
    settled_s: float
    tcp_idle: int = 0
    tcp_unread: int = 0
    # Calls made with every slot taken (server.max_concurrent_calls = streams):
    # how many were refused, and how long each took to hear it.
    shed: list[float] = field(default_factory=list)
    refused: int = 0

    @property
    def per_stream(self) -> float:
        return (self.rss_unread - self.rss_idle) / self.streams

    def lines(self) -> list[str]:
        read = sorted(self.upstream_bytes) or [0]
        return [
            f"edge {self.edge}: {self.streams} unread streams (settled in {self.settled_s:.1f} s)",
            f"  gateway RSS idle        {self.rss_idle / MiB:9.1f} MiB",
            f"  gateway RSS unread      {self.rss_unread / MiB:9.1f} MiB",
            f"  per unread stream       {self.per_stream / 1024:9.1f} KiB",
            f"  upstream written/stream {read[len(read) // 2] / 1024:9.1f} KiB median,"
            f" {read[-1] / 1024:.1f} KiB max",
            # Socket buffers count against a container's memory limit too, but
            # not in RSS; this is the whole machine's, so other programs show.
            f"  kernel TCP buffers      {(self.tcp_unread - self.tcp_idle) / MiB:+9.1f} MiB"
            " (machine-wide)",
            *self._shed_lines(),
        ]

    def _shed_lines(self) -> list[str]:
        if not self.shed:
            return []
        times = sorted(self.shed)
        return [
            f"  calls past the limit    {self.refused} of {len(times)} refused GATEWAY_OVERLOADED,"
            f" in {times[len(times) // 2] * 1000:.0f} ms median,"
            f" {times[int(len(times) * 0.99)] * 1000:.0f} ms p99",
        ]


async def _warm_grpc(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for _ in range(3):
            async for _ in stub.StreamGenerate(ask(2_000)):
                pass


async def _warm_http(gateway: Gateway) -> None:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as client:
        for _ in range(3):
            body = {"model": "endless", "max_tokens": 2_000, "stream": True}
            body["messages"] = [{"role": "user", "content": "go on"}]
            async with client.stream("POST", "/v1/messages", json=body) as response:
                async for _ in response.aiter_bytes():
                    pass


async def probe(
    streams: int,
    *,
    edge: str = "grpc",
    env: dict[str, str] | None = None,
    max_tokens: int = 400_000,
    quiet_s: float = 2.0,
    model: str = "endless",
    shed: int = 0,
    request_ids: bool = False,
) -> Result:
    """Opens `streams` unread streams on a fresh gateway and measures what they cost;
    with `shed`, the streams take every slot and `shed` more calls are made."""
    upstream = EndlessUpstream()
    await upstream.start()
    env = dict(env or {})
    if shed:
        env["LLMGW_SERVER__MAX_CONCURRENT_CALLS"] = str(streams)
    try:
        async with gateway_process(upstream, env) as gateway:
            await (_warm_grpc if edge == "grpc" else _warm_http)(gateway)
            await asyncio.sleep(1.0)
            rss_idle, tcp_idle = gateway.rss(), tcp_memory()
            warm = len(upstream.written)
            async with contextlib.AsyncExitStack() as stack:
                if edge == "grpc":
                    await _open_grpc(stack, gateway, streams, max_tokens, model, request_ids)
                else:
                    await _open_http(stack, gateway, streams, max_tokens)
                settled = await settle(upstream, quiet_s, limit_s=120)
                rss_unread, tcp_unread = gateway.rss(), tcp_memory()
                written = list(upstream.written.values())[warm:]
                result = Result(
                    edge, streams, rss_idle, rss_unread, written, settled, tcp_idle, tcp_unread
                )
                if shed:
                    await _shed(gateway, shed, result)
            return result
    finally:
        await upstream.stop()


async def _shed(gateway: Gateway, calls: int, result: Result) -> None:
    """Makes `calls` Generate calls at once to a gateway with every slot taken."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one() -> None:
            began = loop.time()
            try:
                await stub.Generate(ask(10, model="echo"), timeout=60)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    result.refused += 1
            result.shed.append(loop.time() - began)

        await asyncio.gather(*(one() for _ in range(calls)))


async def _open_grpc(
    stack: contextlib.AsyncExitStack,
    gateway: Gateway,
    streams: int,
    max_tokens: int,
    model: str,
    request_ids: bool = False,
) -> None:
    async def one(i: int) -> None:
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=CLIENT_OPTIONS)
        )
        # The id as x-request-id metadata, which only correlates; in the
        # request's field it makes the call idempotent, whose answer so far is
        # then kept for its repeats (within idempotency.max_pending_bytes).
        if request_ids:
            call = pb_grpc.GenerationServiceStub(channel).StreamGenerate(
                ask(max_tokens, f"unread{i}", model)
            )
        else:
            call = pb_grpc.GenerationServiceStub(channel).StreamGenerate(
                ask(max_tokens, model=model), metadata=(("x-request-id", f"unread{i}"),)
            )
        stack.callback(call.cancel)
        await call.read()  # message_start: the stream is open; nothing more is read

    for start in range(0, streams, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(streams, start + 100))))


async def _open_http(
    stack: contextlib.AsyncExitStack, gateway: Gateway, streams: int, max_tokens: int
) -> None:
    async def one(i: int) -> None:
        client = await stack.enter_async_context(
            httpx2.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=None)
        )
        body = {"model": "endless", "max_tokens": max_tokens, "stream": True}
        body["messages"] = [{"role": "user", "content": "go on"}]
        response = await stack.enter_async_context(
            client.stream("POST", "/v1/messages", json=body, headers={"x-request-id": f"u{i}"})
        )
        await anext(response.aiter_raw())  # the first bytes; nothing more is read

    for start in range(0, streams, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(streams, start + 100))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--edge", choices=("grpc", "http"), default="grpc")
    parser.add_argument(
        "--shed",
        type=int,
        default=0,
        metavar="N",
        help="with server.max_concurrent_calls = STREAMS, make N more calls and time their refusal",
    )
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(probe(args.streams, edge=args.edge, shed=args.shed))
    print("\n".join(result.lines()))
    print(f"  ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
