"""The mixed soak: a real gateway under a steady mix of calls for minutes (issue 17).

Starts `python -m server` on ports 0 (bench/stall_probe.py's `gateway()`,
the offline provider) and, at a steady rate, makes a mix of calls on both
edges: gRPC Generate and StreamGenerate, HTTP /v1/messages whole and
streamed, some cancelled mid-stream, some with a deadline shorter than the
answer, some invalid. Every second it samples the gateway's resident memory
(/proc/PID/status VmRSS) and open file descriptors (/proc/PID/fd). Once the
load stops and the clients have closed, the gateway is stopped with SIGTERM
and its SQLite ledger is read: each call the gateway answered has exactly
one row; a call cancelled (or past its deadline) may have none, when the
gateway had not seen it yet.

    .venv/bin/python -m bench.soak [--seconds 300] [--rate 120] [--samples rss.jsonl]

It prints a summary, then one line `{"soak": {...}}` that
bench/reliability.py reads; it exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx2

from bench.stall_probe import GatewayProcess, gateway
from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc

# `echo` answers at once; `slow` streams a chunk every SLOW_CHUNK_MS, so that
# a call can be cancelled mid-stream or outlive its deadline.
SLOW_CHUNK_MS = 20
# Every gRPC call here names its request id, and the idempotency store keeps
# each one's answer for its window (by default 10 minutes, longer than the
# soak: the RSS would grow throughout, by design, about 1.9 KiB an answer).
# A minute's window brings the store to its steady size within the first
# half, which is what the second half's RSS is measured against.
IDEMPOTENCY_WINDOW_S = 60
CONFIG = f"""
idempotency:
  window_s: {IDEMPOTENCY_WINDOW_S}
providers:
  offline:
    type: offline
  slow:
    type: offline
    chunk_delay_ms: {SLOW_CHUNK_MS}
    models:
      - id: slow
"""
SLOW_TEXT = "keep going for a while " * 20  # ~100 chunks: ~2 s at 20 ms a chunk
SHORT_DEADLINE_S = 0.15
EXPECTED = frozenset({"OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED"})
# The kinds of call and their share of the mix (per 100 calls).
MIX: dict[str, int] = {
    "grpc_unary": 24,
    "grpc_stream": 20,
    "grpc_stream_cancel": 7,
    "grpc_deadline": 5,
    "grpc_invalid": 5,
    "http_whole": 15,
    "http_stream": 12,
    "http_stream_cancel": 6,
    "http_invalid": 6,
}
# Client-side outcomes that mean the gateway had the call and answered it,
# so its row must be in the ledger; the others (the caller went away) may not.
ANSWERED = frozenset({"OK", "INVALID_ARGUMENT"})
MAX_IN_FLIGHT = 400
RSS_GROWTH_TARGET_PCT = 5.0
FD_SLACK = 2  # descriptors the gateway may keep after the load (a ledger file, a log)


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    fds: int


@dataclass
class Call:
    request_id: str
    kind: str
    outcome: str = ""  # a gRPC status name (HTTP answers mapped to one), or ERROR: ...
    # True once the caller knows the gateway saw the call (an answer or a first event).
    seen: bool = False


@dataclass
class SoakReport:
    seconds: float
    rate: float
    calls: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)
    by_kind_outcome: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    unexpected_examples: list[str] = field(default_factory=list)
    skipped: int = 0  # ticks when MAX_IN_FLIGHT calls were in flight
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_growth_second_half_pct: float = 0.0
    fd_start: int = 0
    fd_end: int = 0
    fd_max: int = 0
    fd_after: int = 0  # once the clients closed
    ledger_rows: int = 0
    ledger_statuses: dict[str, int] = field(default_factory=dict)
    answered_without_row: int = 0  # must be 0
    unseen_without_row: int = 0  # cancelled before the gateway saw them: allowed
    seen_without_row: int = 0  # the gateway had answered something: must be 0
    rows_not_ours: int = 0  # rows for no call we made, or twice for one: must be 0
    error_log_lines: int = 0

    def failures(self) -> list[str]:
        """The targets this run missed, one line each."""
        missed = []
        if self.unexpected:
            missed.append(f"{self.unexpected} unexpected statuses")
        if self.rss_growth_second_half_pct > RSS_GROWTH_TARGET_PCT:
            missed.append(f"RSS grew {self.rss_growth_second_half_pct:.2f}% over the second half")
        if self.fd_after > self.fd_start + FD_SLACK:
            missed.append(f"fds {self.fd_after} after the load, {self.fd_start} before")
        if self.answered_without_row or self.seen_without_row or self.rows_not_ours:
            missed.append(
                f"ledger: {self.answered_without_row + self.seen_without_row} calls without"
                f" their row, {self.rows_not_ours} rows not matching a call"
            )
        if self.error_log_lines:
            missed.append(f"{self.error_log_lines} ERROR lines in the gateway's log")
        return missed

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.by_outcome.items()))
        return [
            f"soak: {self.calls} calls in {self.seconds:.0f} s ({self.calls / self.seconds:.1f}/s,"
            f" {self.skipped} skipped at {MAX_IN_FLIGHT} in flight)",
            f"  outcomes       {outcomes}",
            *(f"  {kind:30} {n}" for kind, n in sorted(self.by_kind_outcome.items())),
            f"  unexpected     {self.unexpected} {self.unexpected_examples[:5]}",
            f"  RSS            start {self.rss_start_mib:.1f} MiB, end {self.rss_end_mib:.1f} MiB,"
            f" max {self.rss_max_mib:.1f} MiB; second half {self.rss_growth_second_half_pct:+.2f}%",
            f"  fds            start {self.fd_start}, end {self.fd_end}, max {self.fd_max},"
            f" after the clients closed {self.fd_after}",
            f"  ledger         {self.ledger_rows} rows for {self.calls} calls"
            f" ({dict(sorted(self.ledger_statuses.items()))});"
            f" answered without a row {self.answered_without_row + self.seen_without_row},"
            f" cancelled unseen without a row {self.unseen_without_row},"
            f" rows not ours {self.rows_not_ours}",
            f"  error log      {self.error_log_lines} lines",
        ]


# -- The calls ----------------------------------------------------------------


def _grpc_request(request_id: str, model: str, text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
        max_tokens=max_tokens,
        request_id=request_id,
    )


class Clients:
    """One gRPC channel and one pool of HTTP connections, shared by every call."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}")
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.http = httpx2.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.http_port}",
            timeout=30,
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def run(self, call: Call) -> None:
        try:
            await getattr(self, call.kind)(call)
        except grpc.aio.AioRpcError as err:
            call.outcome = err.code().name
            call.seen = call.seen or call.outcome in ANSWERED
            if call.outcome not in EXPECTED:
                call.outcome += f": {(err.details() or '')[:60]}"
        except (httpx2.HTTPError, OSError) as err:
            call.outcome = f"ERROR: {type(err).__name__} {str(err)[:60]}"

    async def grpc_unary(self, call: Call) -> None:
        await self.stub.Generate(_grpc_request(call.request_id, "echo", "hello", 16), timeout=30)
        call.outcome, call.seen = "OK", True

    async def grpc_stream(self, call: Call) -> None:
        stream = self.stub.StreamGenerate(
            _grpc_request(call.request_id, "echo", "tell me more", 32), timeout=30
        )
        async for _ in stream:
            pass
        call.outcome, call.seen = (await stream.code()).name, True

    async def grpc_stream_cancel(self, call: Call) -> None:
        stream = self.stub.StreamGenerate(
            _grpc_request(call.request_id, "slow", SLOW_TEXT, 200), timeout=30
        )
        await stream.read()  # message_start: the gateway is serving it
        call.seen = True
        await asyncio.sleep(random.uniform(0, 0.1))
        stream.cancel()
        call.outcome = (await stream.code()).name

    async def grpc_deadline(self, call: Call) -> None:
        request = _grpc_request(call.request_id, "slow", SLOW_TEXT, 200)
        await self.stub.Generate(request, timeout=SHORT_DEADLINE_S)
        call.outcome, call.seen = "OK", True

    async def grpc_invalid(self, call: Call) -> None:
        request = pb.GenerateRequest(model="echo", max_tokens=16, request_id=call.request_id)
        await self.stub.Generate(request, timeout=30)  # no messages
        call.outcome, call.seen = "OK", True

    async def http_whole(self, call: Call) -> None:
        body = {"model": "echo", "max_tokens": 16, "messages": [_user("hello")]}
        response = await self.http.post("/v1/messages", json=body, headers=_headers(call))
        call.outcome, call.seen = _http_outcome(response.status_code), True

    async def http_stream(self, call: Call) -> None:
        body = {"model": "echo", "max_tokens": 32, "stream": True, "messages": [_user("more")]}
        async with self.http.stream(
            "POST", "/v1/messages", json=body, headers=_headers(call)
        ) as response:
            text = b"".join([chunk async for chunk in response.aiter_bytes()])
        call.seen = True
        complete = text.rstrip().endswith(b'data: {"type":"message_stop"}')
        call.outcome = _http_outcome(response.status_code) if complete else "ERROR: stream cut"

    async def http_stream_cancel(self, call: Call) -> None:
        body = {"model": "slow", "max_tokens": 200, "stream": True, "messages": [_user(SLOW_TEXT)]}
        async with self.http.stream(
            "POST", "/v1/messages", json=body, headers=_headers(call)
        ) as response:
            if response.status_code != 200:
                call.outcome, call.seen = _http_outcome(response.status_code), True
                return
            await anext(response.aiter_raw())  # the first event: the gateway is serving it
            call.seen = True
            await asyncio.sleep(random.uniform(0, 0.1))
        # Leaving the block unread closes the connection: the caller has gone.
        call.outcome = "CANCELLED"

    async def http_invalid(self, call: Call) -> None:
        body = {"model": "echo", "max_tokens": -1, "messages": [_user("hello")]}
        response = await self.http.post("/v1/messages", json=body, headers=_headers(call))
        call.outcome, call.seen = _http_outcome(response.status_code), True


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _headers(call: Call) -> dict[str, str]:
    return {"anthropic-version": "2023-06-01", "x-request-id": call.request_id}


def _http_outcome(status: int) -> str:
    return {200: "OK", 400: "INVALID_ARGUMENT"}.get(status, f"HTTP {status}")


# -- The run ------------------------------------------------------------------


def sample(pid: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
    )
    return Sample(time.monotonic() - started, rss, len(os.listdir(f"/proc/{pid}/fd")))


def rss_growth_pct(samples: list[Sample], window_s: float = 10.0) -> float:
    """How much the RSS grew from the start of the second half to the end, in %
    (the medians of the first and last `window_s` of that half)."""
    if len(samples) < 4:
        return 0.0
    end = samples[-1].t
    half = [s for s in samples if s.t >= end / 2]
    first = [s.rss_kib for s in half if s.t <= half[0].t + window_s]
    last = [s.rss_kib for s in half if s.t >= end - window_s]
    begin = statistics.median(first)
    return (statistics.median(last) - begin) / begin * 100 if begin else 0.0


def kinds_in_order(seed: int = 17) -> list[str]:
    """One round of 100 calls, MIX's shares in a shuffled order."""
    kinds = [kind for kind, share in MIX.items() for _ in range(share)]
    random.Random(seed).shuffle(kinds)
    return kinds


async def drive(
    clients: Clients, seconds: float, rate: float, on_tick: Callable[[], None]
) -> tuple[list[Call], int]:
    """Starts a call every 1/rate s (open loop) for `seconds`; returns the calls
    and how many ticks were skipped at MAX_IN_FLIGHT."""
    kinds = kinds_in_order()
    calls: list[Call] = []
    in_flight: set[asyncio.Task[None]] = set()
    skipped = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_sample = started
    n = 0
    while (now := loop.time()) - started < seconds:
        if now >= next_sample:
            on_tick()
            next_sample += 1.0
        due = started + n / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        kind = kinds[n % len(kinds)]
        n += 1
        if len(in_flight) >= MAX_IN_FLIGHT:
            skipped += 1
            continue
        call = Call(f"soak-{kind.replace('_', '-')}-{n}", kind)
        calls.append(call)
        task = asyncio.create_task(clients.run(call))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)
    return calls, skipped


def read_ledger(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT request_id, status FROM usage")]
    finally:
        conn.close()


def account(report: SoakReport, calls: list[Call], rows: list[tuple[str, str]]) -> None:
    """Fills the report's call and ledger counts."""
    report.calls = len(calls)
    report.by_outcome = dict(Counter(c.outcome.partition(":")[0] for c in calls))
    report.by_kind_outcome = dict(Counter(f"{c.kind} {c.outcome.partition(':')[0]}" for c in calls))
    odd = [c for c in calls if c.outcome not in EXPECTED]
    report.unexpected = len(odd)
    report.unexpected_examples = [f"{c.kind}: {c.outcome}" for c in odd[:10]]
    report.ledger_rows = len(rows)
    report.ledger_statuses = dict(Counter(status for _, status in rows))
    counted = Counter(rid for rid, _ in rows)
    ours = {c.request_id for c in calls}
    report.rows_not_ours = sum(
        n if rid not in ours else n - 1 for rid, n in counted.items() if rid not in ours or n > 1
    )
    for c in calls:
        if c.request_id in counted:
            continue
        if c.outcome in ANSWERED:
            report.answered_without_row += 1
        elif c.seen:
            report.seen_without_row += 1
        else:
            report.unseen_without_row += 1


async def soak(seconds: float, rate: float) -> tuple[SoakReport, list[Sample]]:
    """The report, and the samples it was made from."""
    report = SoakReport(seconds, rate)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        async with gateway(Path(tmp), config_text=CONFIG) as gw:
            pid = gw.process.pid
            warm = Clients(gw)  # one call of each kind, on clients closed before the load
            await asyncio.gather(*(warm.run(Call(f"warm-{k}", k)) for k in MIX))
            await warm.aclose()
            await asyncio.sleep(1.0)
            log_before = len(gw.log)
            began = time.monotonic()
            samples = [sample(pid, began)]
            clients = Clients(gw)
            calls, report.skipped = await drive(
                clients, seconds, rate, lambda: samples.append(sample(pid, began))
            )
            samples.append(sample(pid, began))
            await clients.aclose()
            await asyncio.sleep(2.0)
            report.fd_after = sample(pid, began).fds
            gw.process.send_signal(signal.SIGTERM)  # drains, then flushes the ledger
            await asyncio.wait_for(gw.process.wait(), 60)
            await asyncio.sleep(0.2)  # the log's last lines
            report.error_log_lines = sum(
                1 for line in gw.log[log_before:] if "ERROR" in line or "Traceback" in line
            )
            rows = [r for r in read_ledger(Path(tmp) / "usage.sqlite3") if r[0][:5] != "warm-"]
    report.rss_start_mib = samples[0].rss_kib / 1024
    report.rss_end_mib = samples[-1].rss_kib / 1024
    report.rss_max_mib = max(s.rss_kib for s in samples) / 1024
    report.rss_growth_second_half_pct = rss_growth_pct(samples)
    report.fd_start, report.fd_end = samples[0].fds, samples[-1].fds
    report.fd_max = max(s.fds for s in samples)
    account(report, calls, rows)
    return report, samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=120.0, help="calls per second")
    parser.add_argument(
        "--samples", type=Path, help="write each second's RSS and fd sample here (JSON lines)"
    )
    args = parser.parse_args(argv)
    report, samples = asyncio.run(soak(args.seconds, args.rate))
    if args.samples is not None:
        args.samples.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples))
    print("\n".join(report.lines()))
    for missed in report.failures():
        print(f"  MISSED: {missed}")
    print(json.dumps({"soak": asdict(report)}), flush=True)
    sys.exit(1 if report.failures() else 0)


if __name__ == "__main__":
    main()
