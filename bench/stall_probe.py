"""The loop-stall probe: can a burst of huge requests stall every other caller? (issue 17, item 3)

Starts a gateway in its own process (the offline provider, serving a model
with the largest context window of the shipped catalog), sends a small probe
call every few milliseconds from this process, and has a third process send
`count` large requests at once; reports the probe calls' latency while the
burst is served and the gateway's peak RSS above idle. Two bursts:

- `limit`: requests of the largest size the gateway accepts by default
  (`server.max_receive_message_bytes`, `http.max_body_bytes`), all text;
- `window`: the longest prose whose estimate fits the largest window, which
  the gateway must estimate in full, route and answer;
- `conversation` (on request, `--burst conversation`): requests as large as
  `limit`'s, but a conversation of 64 KiB messages, the shape of a long
  agent session, rather than one text.

    .venv/bin/python -m bench.stall_probe                  # both edges, both bursts
    .venv/bin/python -m bench.stall_probe --edge grpc --burst window --rounds 5
    .venv/bin/python -m bench.stall_probe --burst window --upstream openai

`--upstream anthropic|openai` serves the large requests' model from that
provider, its official SDK calling bench/fake_upstream.py (its own process),
so that the gateway's work for a real upstream (the request translated and
encoded for it) is measured too; by default the offline provider serves it.

tests/test_loop_stalls.py asserts on the same measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
Edge = Literal["grpc", "http"]
Burst = Literal["limit", "window", "conversation"]
Upstream = Literal["offline", "anthropic", "openai"]
EDGES: tuple[Edge, ...] = ("grpc", "http")
UPSTREAMS: tuple[Upstream, ...] = ("offline", "anthropic", "openai")
BURSTS: tuple[Burst, ...] = ("limit", "window")  # the default run
MESSAGE_CHARS = 64 * 1024  # a `conversation` burst's messages

MODEL = "big"
# The largest context window of the shipped catalog (server/catalog.py).
WINDOW = 1_050_000
MAX_TOKENS = 16
PROBE_INTERVAL_S = 0.005
# The probe model: the ordinary 128k-token `echo` of the offline provider.
PROBE_MODEL = "echo"
CONFIG = f"""
providers:
  offline:
    type: offline
    models:
      - id: echo
      - id: {MODEL}
        context_window: {WINDOW}
        max_output_tokens: 128000
    scripts:
      - models: [{MODEL}]
        reply: {{text: Read it all.}}
"""


def upstream_config(upstream: Upstream, port: int) -> str:
    """CONFIG with MODEL served by `upstream`'s SDK provider, calling the fake upstream
    on `port` (the probe model stays offline)."""
    base = f"http://127.0.0.1:{port}" + ("/v1" if upstream == "openai" else "")
    return f"""
providers:
  offline:
    type: offline
    models:
      - id: echo
  {upstream}:
    type: {upstream}
    api_key: stall-probe
    base_url: {base}
    models:
      - id: {MODEL}
        upstream_id: bench-model
        context_window: {WINDOW}
        max_output_tokens: 128000
"""


def prose(chars: int, seed: int = 1) -> str:
    """English-like prose with some code, `chars` characters long."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("etaoinshrdlucmfwypvbgkjqxz", k=rng.randint(1, 9)))
        for _ in range(3_000)
    ]
    lines = []
    for _ in range(400):
        sentence = " ".join(rng.choices(words, k=rng.randint(6, 18)))
        lines.append(f"{sentence.capitalize()}, {rng.randint(0, 9999)}.")
        if rng.random() < 0.3:
            lines.append(f'    value = compute("{rng.choice(words)}", {rng.randint(0, 99)})')
    block = "\n".join(lines) + "\n"
    return (block * (chars // len(block) + 1))[:chars]


def window_chars() -> int:
    """The length of prose whose estimate just fits the window (with max_tokens)."""
    from server.token_estimate import count_text

    sample = prose(200_000)
    per_char = count_text(sample) / len(sample)
    return int((WINDOW - MAX_TOKENS - 1_000) / per_char)


def size_limits() -> dict[Edge, int]:
    """The default request size limits of the code in this checkout."""
    from server.config import HttpConfig, ServerConfig

    return {
        "grpc": ServerConfig().max_receive_message_bytes,
        "http": HttpConfig().max_body_bytes,
    }


# -- The gateway under test ---------------------------------------------------


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    log: list[str] = field(default_factory=list)

    def rss_kib(self, key: str = "VmRSS") -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) if found else 0

    def reset_peak(self) -> None:
        """Starts VmHWM (the peak RSS) over from the current RSS."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")


@contextlib.asynccontextmanager
async def gateway(
    tmp: Path,
    limit: int | None = None,
    *,
    config_text: str = CONFIG,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """`python -m server` on ports 0, serving `config_text` (both request size
    limits `limit` bytes, when given; `extra_env` added to its environment), until
    the block ends. The ledger is `tmp`/usage.sqlite3."""
    config = tmp / "gateway.yaml"
    config.write_text(config_text)
    env = {
        **os.environ,
        "LLMGW_CONFIG": str(config),
        "LLMGW_AUTH__ENABLED": "false",
        "LLMGW_SERVER__PORT": "0",
        "LLMGW_HTTP__PORT": "0",
        "LLMGW_LEDGER__PATH": str(tmp / "usage.sqlite3"),
        "LLMGW_LOGGING__CALLS": "false",
    }
    if limit is not None:
        env["LLMGW_SERVER__MAX_RECEIVE_MESSAGE_BYTES"] = str(limit)
        env["LLMGW_HTTP__MAX_BODY_BYTES"] = str(limit)
    env.update(extra_env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await process.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("the gateway exited before serving:\n" + "".join(log))
                log.append(line)
                found = re.search(r"serving on [^ ]+:(\d+) \(gRPC\) and http://[^ ]+:(\d+)", line)
                if found:
                    break
        running = GatewayProcess(process, int(found.group(1)), int(found.group(2)), log)
        drain = asyncio.create_task(_drain(process.stderr, log))
        yield running
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode())


# -- Probe calls ----------------------------------------------------------------


class GrpcProbe:
    def __init__(self, port: int) -> None:
        import grpc

        from llmgateway.v1 import generation_pb2 as pb
        from llmgateway.v1 import generation_pb2_grpc as pb_grpc

        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._request = pb.GenerateRequest(
            model=PROBE_MODEL,
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="ping")])],
            max_tokens=4,
        )

    async def call(self) -> None:
        await self._stub.Generate(self._request, timeout=60)

    async def aclose(self) -> None:
        await self._channel.close()


class HttpProbe:
    """POST /v1/messages on one kept-alive HTTP/1.1 connection (no client library in the way)."""

    def __init__(self, port: int) -> None:
        self._port = port
        body = json.dumps(
            {
                "model": PROBE_MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "ping"}],
            }
        ).encode()
        self._request = http_request("/v1/messages", body, keep_alive=True)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self) -> None:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self._port)
        reader, writer = self._streams
        writer.write(self._request)
        status, _ = await read_response(reader)
        if status != 200:
            raise RuntimeError(f"probe call answered HTTP {status}")

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


def http_request(path: str, body: bytes, *, keep_alive: bool) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\ncontent-length: {len(body)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else await reader.read()
    return status, body


# -- The burst, sent from its own process --------------------------------------


def burst_payload(edge: Edge, burst: Burst, limit: int) -> bytes:
    """One large request: a serialized GenerateRequest (gRPC) or a JSON body (HTTP)."""
    margin = 4_096
    if burst == "conversation":
        return _conversation(edge, limit - margin)
    text = prose(window_chars() if burst == "window" else limit - margin)
    if edge == "grpc":
        from llmgateway.v1 import generation_pb2 as pb

        message = pb.GenerateRequest(
            model=MODEL,
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
            max_tokens=MAX_TOKENS,
        )
        return message.SerializeToString()
    document = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": text}],
    }
    body = json.dumps(document).encode()
    if burst == "limit":
        # JSON escapes make the body longer than the text: trim to the limit.
        over = len(body) - (limit - margin)
        while over > 0:
            document["messages"][0]["content"] = text = text[: len(text) - over - 64]
            body = json.dumps(document).encode()
            over = len(body) - (limit - margin)
    return body


def _conversation(edge: Edge, size: int) -> bytes:
    """A request of about `size` bytes: messages of MESSAGE_CHARS characters of
    prose, user and assistant in turn."""
    texts = []
    while len(texts) * MESSAGE_CHARS * 1.1 < size:  # JSON's escapes: about a tenth more
        texts.append(prose(MESSAGE_CHARS))
    if edge == "grpc":
        from llmgateway.v1 import generation_pb2 as pb

        roles = (pb.ROLE_USER, pb.ROLE_ASSISTANT)
        turns = [
            pb.Message(role=roles[i % 2], content=[pb.ContentBlock(text=t)])
            for i, t in enumerate(texts)
        ]
        return pb.GenerateRequest(
            model=MODEL, messages=turns, max_tokens=MAX_TOKENS
        ).SerializeToString()
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]
    document = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": messages}
    body = json.dumps(document).encode()
    while len(body) > size:
        messages.pop()
        body = json.dumps(document).encode()
    return body


async def send_burst(edge: Edge, port: int, payload: bytes, count: int) -> list[str]:
    """Sends `count` copies of `payload` at once, each on its own connection; their outcomes."""
    if edge == "grpc":
        import grpc

        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            for _ in range(count)
        ]
        methods = [
            c.unary_unary(
                "/llmgateway.v1.GenerationService/Generate",
                request_serializer=None,
                response_deserializer=None,
            )
            for c in channels
        ]
        for channel in channels:
            await channel.channel_ready()

        async def one(method: Any) -> str:
            try:
                await method(payload, timeout=120)
                return "OK"
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {(err.details() or '')[:40]}"

        try:
            return list(await asyncio.gather(*(one(m) for m in methods)))
        finally:
            for channel in channels:
                await channel.close()

    request = http_request("/v1/messages", payload, keep_alive=False)
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]

    async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        try:
            writer.write(request)
            await writer.drain()
            status, body = await read_response(reader)
            if status == 200:
                return "HTTP 200"
            message = json.loads(body).get("error", {}).get("message", "")
            return f"HTTP {status}: {message[:40]}"
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            return type(err).__name__
        finally:
            writer.close()

    return list(await asyncio.gather(*(post(r, w) for r, w in connections)))


async def _sender_main(edge: Edge, burst: Burst, port: int, count: int, limit: int) -> None:
    """The burst process: builds the payload, says `ready`, sends on `go`, prints outcomes."""
    payload = burst_payload(edge, burst, limit)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": len(payload)}), flush=True)
    await reader.readline()
    outcomes = await send_burst(edge, port, payload, count)
    print(json.dumps({"outcomes": outcomes}), flush=True)


# -- The measurement ---------------------------------------------------------


@dataclass
class Result:
    edge: Edge
    burst: Burst
    payload_mib: float
    probes: list[float]  # seconds, the probe calls during the bursts
    burst_s: list[float]  # how long each burst took to be answered
    outcomes: list[str]
    peak_mib: float  # the gateway's peak RSS above its idle RSS
    idle: list[float]  # seconds, the probe calls before the bursts
    round_max: list[float] = field(default_factory=list)  # the slowest probe of each round
    upstream: Upstream = "offline"  # what served the large requests' model

    def percentile(self, p: float, of: list[float] | None = None) -> float:
        ordered = sorted(self.probes if of is None else of)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]

    def line(self) -> str:
        ms = 1000
        return (
            f"{self.edge:4}  {self.burst:6}"
            + (f" -> {self.upstream}" if self.upstream != "offline" else "")
            + f"  {self.payload_mib:7.1f} MiB  "
            f"probes {len(self.probes):4}  p50 {self.percentile(50) * ms:6.1f} ms  "
            f"p99 {self.percentile(99) * ms:7.1f} ms  "
            f"max {max(self.probes, default=0) * ms:7.1f} ms"
            f"  burst {max(self.burst_s, default=0):5.2f} s  peak +{self.peak_mib:6.1f} MiB"
            f"  (idle p99 {self.percentile(99, self.idle) * ms:.1f} ms)"
            f"  rounds' max {' '.join(f'{m * ms:.0f}' for m in self.round_max)} ms"
            f"  [{', '.join(sorted({o.partition(':')[0] for o in self.outcomes}))}]"
        )


async def measure(
    edge: Edge,
    burst: Burst,
    *,
    count: int = 5,
    rounds: int = 3,
    limit: int | None = None,
    upstream: Upstream = "offline",
) -> Result:
    """Probes one edge while `rounds` bursts of `count` large requests are served
    (the request size limits `limit` bytes, else the defaults; their model served by
    `upstream`)."""
    with tempfile.TemporaryDirectory(prefix="stall-probe-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            config_text = CONFIG
            if upstream != "offline":
                port = await stack.enter_async_context(fake_upstream())
                config_text = upstream_config(upstream, port)
            gw = await stack.enter_async_context(gateway(Path(tmp), limit, config_text=config_text))
            probe = GrpcProbe(gw.grpc_port) if edge == "grpc" else HttpProbe(gw.http_port)
            port = gw.grpc_port if edge == "grpc" else gw.http_port
            limit = limit or size_limits()[edge]
            try:
                result = await _measure(gw, probe, edge, burst, port, count, rounds, limit)
            finally:
                await probe.aclose()
            result.upstream = upstream
            return result


@contextlib.asynccontextmanager
async def fake_upstream() -> AsyncIterator[int]:
    """bench/fake_upstream.py in its own process, until the block ends: its port."""
    from bench.processes import free_port

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fake_upstream",
        str(port),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"serving on" not in await process.stderr.readline():
                if process.stderr.at_eof():
                    raise RuntimeError("the fake upstream exited before serving")
        drain = asyncio.create_task(_drain(process.stderr, []))
        yield port
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _measure(
    gw: GatewayProcess,
    probe: GrpcProbe | HttpProbe,
    edge: Edge,
    burst: Burst,
    port: int,
    count: int,
    rounds: int,
    limit: int,
) -> Result:
    for _ in range(50):  # warm up both sides
        await probe.call()
    idle: list[float] = []
    for _ in range(200):  # the same probe without a burst, for comparison
        started = time.perf_counter()
        await probe.call()
        idle.append(time.perf_counter() - started)
        await asyncio.sleep(PROBE_INTERVAL_S)
    result = Result(edge, burst, 0.0, [], [], [], 0.0, idle)
    idle_kib = gw.rss_kib()
    peak_kib = idle_kib
    for _ in range(rounds):
        sender = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.stall_probe",
            "--send",
            edge,
            "--burst",
            burst,
            "--port",
            str(port),
            "--count",
            str(count),
            "--limit",
            str(limit),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert sender.stdin is not None
        assert sender.stdout is not None
        ready = json.loads(await sender.stdout.readline())
        result.payload_mib = ready["ready"] / 2**20
        gw.reset_peak()
        idle_kib = min(idle_kib, gw.rss_kib())
        done = asyncio.Event()
        latencies: list[float] = []
        probing = asyncio.create_task(_probe(probe, done, latencies))
        started = time.perf_counter()
        sender.stdin.write(b"go\n")
        await sender.stdin.drain()
        line = await asyncio.wait_for(sender.stdout.readline(), 300)
        result.burst_s.append(time.perf_counter() - started)
        done.set()
        await probing
        await sender.wait()
        result.outcomes += json.loads(line)["outcomes"] if line else ["sender died"]
        result.probes += latencies
        result.round_max.append(max(latencies, default=0.0))
        peak_kib = max(peak_kib, gw.rss_kib("VmHWM"))
        await asyncio.sleep(0.5)  # let the gateway settle before the next round
    result.peak_mib = (peak_kib - idle_kib) / 1024
    return result


async def _probe(probe: GrpcProbe | HttpProbe, done: asyncio.Event, latencies: list[float]) -> None:
    """Probe calls one after another, PROBE_INTERVAL_S apart, until the burst is answered."""
    while not done.is_set():
        started = time.perf_counter()
        await probe.call()
        latencies.append(time.perf_counter() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), PROBE_INTERVAL_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge", choices=EDGES, action="append")
    parser.add_argument("--burst", choices=(*BURSTS, "conversation"), action="append")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--limit", type=int, help="both request size limits, in bytes (default: the defaults)"
    )
    parser.add_argument(
        "--upstream",
        choices=UPSTREAMS,
        default="offline",
        help="what serves the large requests' model (an SDK provider: bench/fake_upstream.py)",
    )
    parser.add_argument("--send", choices=EDGES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send:
        asyncio.run(_sender_main(args.send, args.burst[0], args.port, args.count, args.limit))
        return
    limits = {e: args.limit for e in EDGES} if args.limit else size_limits()
    print(
        f"{args.count} requests at once, {args.rounds} rounds; a probe call every"
        f" {PROBE_INTERVAL_S * 1000:g} ms; request size limits: "
        + ", ".join(f"{e} {n / 2**20:g} MiB" for e, n in limits.items()),
        flush=True,
    )
    for edge in args.edge or EDGES:
        for burst in args.burst or BURSTS:
            run = measure(
                edge,
                burst,
                count=args.count,
                rounds=args.rounds,
                limit=args.limit,
                upstream=args.upstream,
            )
            result = asyncio.run(run)
            print(result.line(), flush=True)


if __name__ == "__main__":
    main()
