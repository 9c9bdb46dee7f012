"""kill -9 under load: how many calls that their callers saw succeed have no ledger row?

For each `ledger.durability` (issue 17, item 6) it starts a gateway
(bench/stall_probe.py's `gateway()`, SQLite ledger, the default flush
interval), keeps it busy with concurrent calls on both edges (gRPC Generate
and StreamGenerate, HTTP /v1/messages whole and streamed; bench/soak.py's
clients), sends it SIGKILL mid-load, then counts the calls whose caller had
its OK before the kill and whose row is not in the ledger. With `sync` none
may be lost; with `async` (the default) a crash loses the rows of the last
flush interval (`ledger.flush_interval_s`, 1 s).

    .venv/bin/python -m bench.kill_ledger [--seconds 5] [--concurrency 32]

It prints a line per durability, then one line `{"kill_ledger": {...}}` that
bench/reliability.py reads; it exits 1 when `sync` lost a row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from bench.soak import CONFIG, Call, Clients, read_ledger
from bench.stall_probe import gateway

Durability = Literal["sync", "async"]
DURABILITIES: tuple[Durability, ...] = ("sync", "async")
KINDS = ("grpc_unary", "grpc_stream", "http_whole", "http_stream")


@dataclass
class KillResult:
    durability: Durability
    seconds: float
    ok_before_kill: int  # calls whose caller had its OK before the SIGKILL
    lost: int  # of those, the ones without a ledger row
    rows: int
    in_flight_at_kill: int

    @property
    def calls_per_s(self) -> float:
        return self.ok_before_kill / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"durability {self.durability:5}: {self.ok_before_kill} calls OK in"
            f" {self.seconds:.1f} s ({self.calls_per_s:.0f}/s), {self.in_flight_at_kill} in"
            f" flight at the kill; ledger rows {self.rows}; lost {self.lost}"
        )


async def measure(durability: Durability, seconds: float, concurrency: int) -> KillResult:
    """Loads a gateway for `seconds` with `concurrency` callers, kills it (SIGKILL),
    and counts the OK calls missing from its ledger."""
    with tempfile.TemporaryDirectory(prefix="kill-ledger-") as tmp:
        env: dict[str, str] = {"LLMGW_LEDGER__DURABILITY": durability}
        async with gateway(Path(tmp), config_text=CONFIG, extra_env=env) as gw:
            clients = Clients(gw)
            ok: list[str] = []  # filled as callers hear OK, in this loop: all before the kill
            killed = asyncio.Event()

            async def caller(worker: int) -> None:
                n = 0
                while not killed.is_set():
                    kind = KINDS[(worker + n) % len(KINDS)]
                    call = Call(f"kill-{worker}-{n}", kind)
                    n += 1
                    await clients.run(call)
                    if call.outcome == "OK" and not killed.is_set():
                        ok.append(call.request_id)

            loop = asyncio.get_running_loop()
            callers = [asyncio.create_task(caller(i)) for i in range(concurrency)]
            started = loop.time()
            await asyncio.sleep(seconds)
            gw.process.kill()
            killed.set()
            elapsed = loop.time() - started
            seen = list(ok)
            in_flight = sum(not c.done() for c in callers)
            await asyncio.wait_for(gw.process.wait(), 10)
            await asyncio.wait(callers, timeout=60)
            await clients.aclose()
        rows = {rid for rid, _ in read_ledger(Path(tmp) / "usage.sqlite3")}
    lost = sum(rid not in rows for rid in seen)
    return KillResult(durability, elapsed, len(seen), lost, len(rows), in_flight)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load before the kill")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--durability", choices=DURABILITIES, action="append")
    args = parser.parse_args(argv)
    results = []
    for durability in args.durability or DURABILITIES:
        result = asyncio.run(measure(durability, args.seconds, args.concurrency))
        print(result.line(), flush=True)
        results.append(result)
    print(json.dumps({"kill_ledger": [asdict(r) for r in results]}), flush=True)
    sys.exit(1 if any(r.durability == "sync" and r.lost for r in results) else 0)


if __name__ == "__main__":
    main()
