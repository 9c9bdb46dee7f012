"""`make reliability` reads each probe's output into one table (bench/reliability.py).

The probes themselves take minutes and are not run here: these pin how their
printed lines are read and judged, so a change to a probe's output format
fails here rather than as a silent "no result" in the long run.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from bench.reliability import (
    Row,
    failed,
    parse_fuzz,
    parse_kill,
    parse_soak,
    parse_stall,
    parse_unread,
    table,
)
from bench.soak import Call, Sample, SoakReport, account, rss_growth_pct
from bench.stall_probe import Result

STALL_OUTPUT = """\
5 requests at once, 3 rounds; a probe call every 5 ms; request size limits: grpc 4 MiB, http 12 MiB
grpc  limit       4.0 MiB  probes  960  p50    2.1 ms  p99     5.2 ms  max    31.0 ms  burst  2.49 s  peak +  92.3 MiB  (idle p99 2.1 ms)  rounds' max 31 15 14 ms  [INVALID_ARGUMENT]
grpc  window      4.0 MiB  probes  929  p50    2.7 ms  p99    10.0 ms  max    59.0 ms  burst  2.81 s  peak + 100.3 MiB  (idle p99 5.8 ms)  [OK]
http  limit      12.0 MiB  probes   51  p50    6.8 ms  p99    55.9 ms  max    55.9 ms  burst  0.40 s  peak + 117.7 MiB  (idle p99 1.6 ms)  [HTTP 400]
http  window      4.1 MiB  probes 1016  p50    0.9 ms  p99    86.3 ms  max    99.9 ms  burst  2.92 s  peak +  53.7 MiB  (idle p99 3.4 ms)  [HTTP 200]
"""  # noqa: E501


def test_stall_lines_are_judged_by_the_test_suites_bounds() -> None:
    rows = parse_stall(0, STALL_OUTPUT)
    assert [r.item for r in rows] == [
        "stall probe grpc limit (4.0 MiB x5)",
        "stall probe grpc window (4.0 MiB x5)",
        "stall probe http limit (12.0 MiB x5)",
        "stall probe http window (4.1 MiB x5)",
    ]
    # Each burst's bound is 20 ms x 2.5 plus its idle p99: 55.9 ms is over
    # 51.6 ms, 86.3 ms over 53.4 ms; the others are within theirs.
    assert [r.ok for r in rows] == [True, True, False, False]
    assert rows[0].target.startswith("refused; p99 < 20 ms x2.5")
    assert "p99 10 ms (idle 5.8), peak +100.3 MiB" in rows[1].measured


def test_a_stall_burst_answered_otherwise_fails() -> None:
    line = STALL_OUTPUT.splitlines()[2].replace("[OK]", "[OK, UNAVAILABLE]")
    assert [r.ok for r in parse_stall(0, line)] == [False, False]  # and 1 of 4 results


def test_the_probes_own_lines_are_read() -> None:
    """Lines as bench/stall_probe.py prints them today (each round's slowest probe
    included), so that a change to that format fails here."""
    results = [
        Result("grpc", "limit", 4.0, [0.003, 0.04], [0.2], ["INVALID_ARGUMENT: too long"], 107.0,
               [0.002], [0.04, 0.03]),
        Result("http", "window", 4.1, [0.001, 0.009], [2.9], ["HTTP 200"], 54.0, [0.002],
               [0.009]),
    ]  # fmt: skip
    rows = parse_stall(0, "\n".join(result.line() for result in results))
    assert [r.item for r in rows[:2]] == [
        "stall probe grpc limit (4.0 MiB x5)",
        "stall probe http window (4.1 MiB x5)",
    ]
    assert rows[0].ok and rows[1].ok
    assert "p99 9 ms (idle 2), peak +54 MiB" in rows[1].measured


def test_a_stall_probe_that_died_is_a_failure() -> None:
    rows = parse_stall(1, "Traceback (most recent call last):\n")
    assert failed(rows)
    assert rows[-1].measured == "0 of 4 results, exit 1"


def test_unread_streams_per_stream_cost_against_256_kib() -> None:
    output = """\
edge grpc: 1000 unread streams (settled in 6.8 s)
  gateway RSS idle            135.5 MiB
  gateway RSS unread          321.7 MiB
  per unread stream           190.6 KiB
"""
    (row,) = parse_unread(0, output)
    assert (row.item, row.measured, row.ok) == (
        "unread streams grpc (1000)",
        "190.6 KiB per stream",
        True,
    )
    (over,) = parse_unread(0, output.replace("190.6 KiB", "300.0 KiB"))
    assert over.ok is False
    assert parse_unread(1, "")[0].ok is False


def test_fuzz_reads_pytests_summary() -> None:
    (row,) = parse_fuzz(0, "....\n5 passed in 412.20s (0:06:52)\n")
    assert (row.measured, row.ok) == ("5 passed in 412.20s (0:06:52)", True)
    (row,) = parse_fuzz(1, "ERROR tests/x.py\n===== 3 passed, 7 errors in 161.17s =====\n")
    assert (row.measured, row.ok) == ("3 passed, 7 errors in 161.17s", False)


def _soak_line(report: SoakReport) -> str:
    return "soak: ...\n" + json.dumps({"soak": asdict(report)}) + "\n"


def test_soak_rows_from_its_json_line() -> None:
    report = SoakReport(300, 120, calls=10, by_outcome={"OK": 8, "CANCELLED": 2})
    report.rss_start_mib, report.rss_end_mib, report.rss_max_mib = 90.0, 91.0, 92.0
    report.rss_growth_second_half_pct = 0.4
    report.fd_start, report.fd_end, report.fd_max, report.fd_after = 24, 30, 40, 24
    report.ledger_rows = 9
    report.unseen_without_row = 1
    rows = parse_soak(0, _soak_line(report))
    assert [r.ok for r in rows] == [True, True, True, True, True]
    report.unexpected, report.fd_after, report.seen_without_row = 1, 30, 1
    report.rss_growth_second_half_pct = 7.5
    assert [r.ok for r in parse_soak(1, _soak_line(report))] == [False, False, False, False, True]
    assert parse_soak(1, "Traceback\n")[0].ok is False


def test_soak_ledger_accounting_allows_only_unseen_cancels_without_rows() -> None:
    calls = [
        Call("a", "grpc_unary", "OK", True),
        Call("b", "grpc_invalid", "INVALID_ARGUMENT", True),
        Call("c", "grpc_stream_cancel", "CANCELLED", True),
        Call("d", "grpc_deadline", "DEADLINE_EXCEEDED", False),
        Call("e", "http_whole", "ERROR: ConnectError", False),
    ]
    report = SoakReport(1, 1)
    account(report, calls, [("a", "OK"), ("c", "CANCELLED"), ("c", "CANCELLED"), ("z", "OK")])
    assert report.answered_without_row == 1  # b
    assert report.seen_without_row == 0
    assert report.unseen_without_row == 2  # d, and e, which never reached it
    assert report.rows_not_ours == 2  # c twice, z
    assert report.unexpected == 1
    assert report.by_outcome == {
        "OK": 1,
        "INVALID_ARGUMENT": 1,
        "CANCELLED": 1,
        "DEADLINE_EXCEEDED": 1,
        "ERROR": 1,
    }


def test_rss_growth_compares_the_ends_of_the_second_half() -> None:
    flat = [Sample(t, 100_000, 20) for t in range(100)]
    assert rss_growth_pct(flat) == 0.0
    growing = [Sample(t, 100_000 + (1000 * t if t >= 50 else 0), 20) for t in range(100)]
    # Medians of t 50..60 (155,000 KiB) and t 89..99 (194,000 KiB).
    assert rss_growth_pct(growing) == pytest.approx(39_000 / 155_000 * 100)


def test_kill_rows_hold_sync_to_zero_and_report_async() -> None:
    results = [
        {"durability": "sync", "ok_before_kill": 1981, "lost": 0},
        {"durability": "async", "ok_before_kill": 2453, "lost": 237},
    ]
    output = "durability sync: ...\n" + json.dumps({"kill_ledger": results}) + "\n"
    rows = parse_kill(0, output)
    assert [(r.measured, r.result) for r in rows] == [
        ("0 of 1981 OK calls without a row", "pass"),
        ("237 of 2453 OK calls without a row", "info"),
    ]
    results[0]["lost"] = 3
    assert failed(parse_kill(1, json.dumps({"kill_ledger": results})))


def test_table_is_markdown_and_info_rows_do_not_fail() -> None:
    rows = [Row("a", "1", "<= 2", True), Row("b", "x", "reported", None)]
    assert table(rows).splitlines() == [
        "| item | measured | target | result |",
        "|---|---|---|---|",
        "| a | 1 | <= 2 | pass |",
        "| b | x | reported | info |",
    ]
    assert not failed(rows)
    assert failed([*rows, Row("c", "3", "<= 2", False)])
