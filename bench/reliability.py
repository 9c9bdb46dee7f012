"""`make reliability`: the long robustness checks of issue 17, in one table.

Runs, each in its own process with a timeout, and prints as it goes:

1. the long property-based contract fuzz (tests/test_contract_fuzz.py with
   HYPOTHESIS_PROFILE=long: thousands of examples a test);
2. a mixed soak against a gateway process, RSS and fds sampled every second
   (bench/soak.py);
3. the loop-stall probe, both edges, both bursts (bench/stall_probe.py);
4. the unread-streams probe, gRPC and HTTP (bench/unread_streams.py);
5. kill -9 under load, with `ledger.durability` sync and async
   (bench/kill_ledger.py).

Then one table (item, measured, target, result), in Markdown, and exits 1
if any target was missed. None of this is in `make test`: it takes about
14 minutes on two shared cores (bench/results/2026-12-02-vm-reliability.md).

    .venv/bin/python -m bench.reliability [--soak-seconds 300] [--streams 300] [--only soak ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The stall probe's bounds, as tests/test_loop_stalls.py asserts them: the
# issue's 20 ms p99 with room for a shared machine (2.5 times, plus the same
# probe's p99 before the burst), for requests as long as the largest window
# and of the maximum size alike (the latter refused).
STALL_P99_S = 0.020
STALL_SLACK = 2.5
STALL_PEAK_MIB = 300.0
UNREAD_KIB = 256.0
SOAK_RSS_GROWTH_PCT = 5.0
SOAK_FD_SLACK = 2


@dataclass
class Row:
    item: str
    measured: str
    target: str
    ok: bool | None  # None: reported, no target

    @property
    def result(self) -> str:
        return "info" if self.ok is None else "pass" if self.ok else "FAIL"


Parser = Callable[[int, str], list[Row]]


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    parse: Parser
    env: dict[str, str] | None = None


# -- Reading each step's output -------------------------------------------------


_PYTEST_SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?)\b.* in [\d.]+s")


def parse_fuzz(code: int, output: str) -> list[Row]:
    summary = [line for line in output.splitlines() if _PYTEST_SUMMARY.search(line)]
    measured = summary[-1].strip(" =") if summary else f"no summary (exit {code})"
    return [Row("contract fuzz (long)", measured, "no INTERNAL/UNKNOWN: pytest passes", code == 0)]


_STALL = re.compile(
    r"^(?P<edge>grpc|http)\s+(?P<burst>limit|window)\s+(?P<mib>[\d.]+) MiB\s+"
    r"probes\s+(?P<probes>\d+)\s+p50\s+(?P<p50>[\d.]+) ms\s+p99\s+(?P<p99>[\d.]+) ms\s+"
    r"max\s+(?P<max>[\d.]+) ms\s+burst\s+(?P<burst_s>[\d.]+) s\s+peak \+\s*(?P<peak>[\d.]+) MiB"
    r"\s+\(idle p99 (?P<idle>[\d.]+) ms\)(?:\s+rounds' max[\d ]* ms)?\s+\[(?P<outcomes>[^\]]*)\]"
)
_STALL_EXPECTED = {
    ("grpc", "window"): {"OK"},
    ("http", "window"): {"HTTP 200"},
    ("grpc", "limit"): {"INVALID_ARGUMENT"},
    ("http", "limit"): {"HTTP 400"},
}


def parse_stall(code: int, output: str) -> list[Row]:
    rows = []
    for line in output.splitlines():
        found = _STALL.match(line.strip())
        if not found:
            continue
        edge, burst = found["edge"], found["burst"]
        p99, idle = float(found["p99"]), float(found["idle"])
        peak, burst_s = float(found["peak"]), float(found["burst_s"])
        outcomes = {o.strip() for o in found["outcomes"].split(",") if o.strip()}
        bound = STALL_P99_S * STALL_SLACK * 1000 + idle
        target = f"p99 < {STALL_P99_S * 1000:g} ms x{STALL_SLACK:g} + idle p99"
        if burst == "limit":
            target = f"refused; {target}"
        ok = outcomes == _STALL_EXPECTED[edge, burst] and peak <= STALL_PEAK_MIB and p99 < bound
        rows.append(
            Row(
                f"stall probe {edge} {burst} ({found['mib']} MiB x5)",
                f"p99 {p99:g} ms (idle {idle:g}), peak +{peak:g} MiB, burst {burst_s:g} s,"
                f" {'/'.join(sorted(outcomes))}",
                f"{target}; peak <= {STALL_PEAK_MIB:g} MiB",
                ok,
            )
        )
    if len(rows) < len(_STALL_EXPECTED) or code != 0:
        measured = f"{len(rows)} of {len(_STALL_EXPECTED)} results, exit {code}"
        rows.append(Row("stall probe", measured, "all results, exit 0", False))
    return rows


_UNREAD = re.compile(r"edge (?P<edge>\w+): (?P<streams>\d+) unread streams")
_PER_STREAM = re.compile(r"per unread stream\s+(?P<kib>-?[\d.]+) KiB")


def parse_unread(code: int, output: str) -> list[Row]:
    head, per = _UNREAD.search(output), _PER_STREAM.search(output)
    if head is None or per is None or code != 0:
        return [Row("unread streams", f"no result (exit {code})", "a result", False)]
    kib = float(per["kib"])
    return [
        Row(
            f"unread streams {head['edge']} ({head['streams']})",
            f"{kib:g} KiB per stream",
            f"<= {UNREAD_KIB:g} KiB per stream",
            kib <= UNREAD_KIB,
        )
    ]


def _json_line(output: str, key: str) -> Any:
    for line in reversed(output.splitlines()):
        if line.startswith("{") and f'"{key}"' in line:
            return json.loads(line)[key]
    return None


def parse_soak(code: int, output: str) -> list[Row]:
    report = _json_line(output, "soak")
    if report is None:
        return [Row("soak", f"no result (exit {code})", "a result", False)]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report["by_outcome"].items()))
    unsaved = report["answered_without_row"] + report["seen_without_row"]
    return [
        Row(
            f"soak: calls ({report['seconds']:g} s, {report['rate']:g}/s)",
            f"{report['calls']}: {outcomes}",
            "only OK, INVALID_ARGUMENT, CANCELLED, DEADLINE_EXCEEDED",
            report["unexpected"] == 0,
        ),
        Row(
            "soak: RSS",
            f"start {report['rss_start_mib']:.1f}, end {report['rss_end_mib']:.1f},"
            f" max {report['rss_max_mib']:.1f} MiB;"
            f" second half {report['rss_growth_second_half_pct']:+.2f}%",
            f"second half within +{SOAK_RSS_GROWTH_PCT:g}%",
            report["rss_growth_second_half_pct"] <= SOAK_RSS_GROWTH_PCT,
        ),
        Row(
            "soak: open fds",
            f"start {report['fd_start']}, end {report['fd_end']}, max {report['fd_max']};"
            f" clients closed {report['fd_after']}",
            f"back to start (+{SOAK_FD_SLACK})",
            report["fd_after"] <= report["fd_start"] + SOAK_FD_SLACK,
        ),
        Row(
            "soak: ledger rows",
            f"{report['ledger_rows']} rows, {report['calls']} calls; {unsaved} answered without"
            f" a row, {report['unseen_without_row']} cancelled unseen,"
            f" {report['rows_not_ours']} stray",
            "a row per call the gateway saw",
            unsaved == 0 and report["rows_not_ours"] == 0,
        ),
        Row(
            "soak: ERROR log lines",
            str(report["error_log_lines"]),
            "0",
            report["error_log_lines"] == 0,
        ),
    ]


def parse_kill(code: int, output: str) -> list[Row]:
    results = _json_line(output, "kill_ledger")
    if not results:
        return [Row("kill -9 ledger", f"no result (exit {code})", "a result", False)]
    rows = []
    for r in results:
        sync = r["durability"] == "sync"
        rows.append(
            Row(
                f"kill -9: ledger.durability {r['durability']}",
                f"{r['lost']} of {r['ok_before_kill']} OK calls without a row",
                "0 lost" if sync else "reported (rows of the last flush_interval_s)",
                r["lost"] == 0 if sync else None,
            )
        )
    return rows


# -- Running the steps --------------------------------------------------------


def steps(soak_seconds: float, streams: int) -> list[Step]:
    python = sys.executable
    return [
        Step(
            "fuzz",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract_fuzz.py"],
            900,
            parse_fuzz,
            {"HYPOTHESIS_PROFILE": "long"},
        ),
        Step(
            "soak",
            [python, "-m", "bench.soak", "--seconds", f"{soak_seconds:g}"],
            soak_seconds + 240,
            parse_soak,
        ),
        Step("stall", [python, "-m", "bench.stall_probe"], 600, parse_stall),
        Step(
            "unread-grpc",
            [python, "-m", "bench.unread_streams", "--streams", str(streams)],
            600,
            parse_unread,
        ),
        Step(
            "unread-http",
            [python, "-m", "bench.unread_streams", "--streams", str(streams), "--edge", "http"],
            600,
            parse_unread,
        ),
        Step("kill", [python, "-m", "bench.kill_ledger"], 300, parse_kill),
    ]


def run(step: Step) -> tuple[int, str]:
    """Runs `step` in its own process group, echoing its output; kills the group
    (the gateway it started included) at its timeout."""
    process = subprocess.Popen(
        step.argv,
        cwd=ROOT,
        env={**os.environ, **(step.env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        os.killpg(process.pid, signal.SIGKILL)

    timer = threading.Timer(step.timeout_s, expire)
    timer.start()
    lines = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line)
            print(f"  {line}", end="", flush=True)
        code = process.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        lines.append(f"(killed after {step.timeout_s:g} s)\n")
        code = code or -9
    return code, "".join(lines)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    out = ["| item | measured | target | result |", "|---|---|---|---|"]
    out += [f"| {r.item} | {r.measured} | {r.target} | {r.result} |" for r in rows]
    return "\n".join(out)


def failed(rows: list[Row]) -> bool:
    return any(r.ok is False for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--streams", type=int, default=300, help="unread streams per edge")
    names = [s.name for s in steps(0, 0)]
    parser.add_argument("--only", choices=names, action="append", help="run these steps only")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    began = time.monotonic()
    for step in steps(args.soak_seconds, args.streams):
        if args.only and step.name not in args.only:
            continue
        started = time.monotonic()
        print(f"== {step.name}: {' '.join(step.argv[1:])}", flush=True)
        code, output = run(step)
        print(f"== {step.name}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        rows += step.parse(code, output)
    print(f"\nreliability: {time.monotonic() - began:.0f} s\n")
    print(table(rows), flush=True)
    sys.exit(1 if failed(rows) else 0)


if __name__ == "__main__":
    main()
