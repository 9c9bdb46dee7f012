"""The benchmark's arithmetic: added latency, ratios and medians from measured rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.report import headline, write_reports
from bench.run import medians


def row(scenario: str, target: str, method: str, c: int, rate: float, p50: float, p99: float,
        first: tuple[float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    result: dict[str, Any] = {
        "scenario": scenario,
        "target": target,
        "method": method,
        "concurrency": c,
        "calls_per_s": rate,
        "latency_ms": {"p50": p50, "p90": p99, "p99": p99},
        "errors": 0,
    }
    if first:
        result["first_chunk_ms"] = {"p50": first[0], "p99": first[1]}
    return result


ROWS = [
    row("ceiling", "bare grpc.aio", "unary", 32, 2000, 10, 12),
    row("offline", "gateway offline", "unary", 32, 1500, 12, 15),
    row("providers", "gateway -> anthropic", "unary", 1, 300, 2.5, 4.0),
    row("providers", "direct anthropic SDK", "unary", 1, 400, 1.7, 3.5),
    row("providers", "gateway -> anthropic", "stream", 1, 200, 4.0, 6.0, first=(2.0, 3.0)),
    row("providers", "direct anthropic SDK", "stream", 1, 300, 2.5, 4.0, first=(1.5, 2.0)),
    row("providers", "direct anthropic SDK post", "unary", 1, 500, 1.2, 2.5),
    row("providers", "direct anthropic SDK post", "stream", 1, 400, 2.0, 3.0, first=(1.1, 1.6)),
    row("providers", "gateway -> anthropic", "unary", 32, 380, 80, 100),
    row("providers", "direct anthropic SDK", "unary", 32, 400, 60, 70),
]


def test_headline_numbers() -> None:
    text, numbers = headline(ROWS)
    added = numbers["added_ms_anthropic"]
    assert added["unary_p50"] == pytest.approx(0.8)
    assert added["unary_p99"] == pytest.approx(0.5)
    assert added["first_chunk_p50"] == pytest.approx(0.5)
    assert added["first_chunk_p99"] == pytest.approx(1.0)
    assert numbers["throughput_ratio_anthropic_unary_c32"] == pytest.approx(0.95)
    assert numbers["offline_vs_ceiling_unary"] == pytest.approx(0.75)
    assert "unary p50 +0.80 ms" in text
    # Against the SDK used the gateway's way (client.post): the gateway's own hop.
    own = numbers["added_ms_anthropic_vs_post"]
    assert own["unary_p50"] == pytest.approx(1.3)
    assert own["first_chunk_p50"] == pytest.approx(0.9)
    assert own["first_chunk_p99"] == pytest.approx(1.4)
    assert "gateway's own hop (client.post baseline): unary p50 +1.30 ms" in text
    assert "added_ms_openai" not in numbers  # no rows, no number


def test_the_direct_path_on_aiohttp_is_a_baseline_of_its_own() -> None:
    rows = [
        *ROWS,
        row("providers", "direct anthropic SDK aiohttp", "unary", 1, 600, 1.1, 2.0),
        row("providers", "direct anthropic SDK aiohttp", "stream", 1, 300, 2, 3, first=(1, 2)),
        row("providers", "direct anthropic SDK post aiohttp", "unary", 1, 700, 0.9, 1.8),
        row("providers", "direct anthropic SDK post aiohttp", "stream", 1, 4, 2, 3, first=(1, 2)),
        row("providers", "direct anthropic SDK aiohttp", "unary", 32, 500, 50, 60),
    ]
    text, numbers = headline(rows)
    assert numbers["added_ms_anthropic_vs_aiohttp"]["unary_p50"] == pytest.approx(1.4)
    assert numbers["added_ms_anthropic_vs_post_aiohttp"]["unary_p99"] == pytest.approx(2.2)
    assert numbers["throughput_ratio_anthropic_unary_c32_vs_aiohttp"] == pytest.approx(0.76)
    assert "on aiohttp 500/s (ratio 0.76)" in text
    # The first baseline stays the typed SDK on its default transport.
    assert numbers["added_ms_anthropic"]["unary_p50"] == pytest.approx(0.8)


def test_medians_over_repetitions() -> None:
    runs = [{"a": 1.0, "b": {"c": 10}}, {"a": 3.0, "b": {"c": 30}}, {"a": 2.0, "b": {"c": 20}}]
    assert medians(runs) == {"a": 2.0, "b.c": 20.0}
    assert medians(runs[:1]) == {}


def test_reports_are_written(tmp_path: Path) -> None:
    results = {
        "date": "2026-11-21T00:00:00+00:00",
        "machine": {"cores": 2, "cpu": "test", "python": "3.11", "pinning": "none"},
        "quick": True,
        "duration_s": 1.0,
        "rows": ROWS,
    }
    markdown = write_reports(results, tmp_path / "run")
    assert (tmp_path / "run.json").exists()
    assert "| providers | gateway -> anthropic | unary | 1 | 300 |" in markdown
    assert "## Medians" not in markdown  # one run: nothing to take the median of

    repetitions = [headline(ROWS)[1], headline(ROWS)[1]]
    results.update(repeated=["ceiling", "providers"], repetitions=repetitions,
                   medians=medians(repetitions))  # fmt: skip
    markdown = write_reports(results, tmp_path / "repeated")
    assert "## Medians over 2 repetitions of the ceiling and providers scenarios" in markdown
    assert "- offline_vs_ceiling_unary: 0.75" in markdown


def test_held_and_workers_lines_carry_their_accounting() -> None:
    held = row("held", "gateway, 1000 streams", "stream", 1000, 15, 60_000, 61_000, first=(60, 900))
    held.update(streams=1000, seconds=60, workers=1, idle_rss_mib=70.0, peak_rss_mib=180.0,
                cpu_percent_of_one_core=95.0)  # fmt: skip
    held["chunk_added_delay_ms"] = {"p50": 0.5, "p99": 12.0}
    one = row("workers", "1 worker(s)", "unary", 128, 1400, 80, 110)
    one.update(worker_cpu_percent=[125], loadgen_cpu_percent=33, calls_per_server_cpu_s=1200)
    two = row("workers", "2 worker(s)", "unary", 128, 1750, 60, 100)
    two.update(worker_cpu_percent=[80, 76], loadgen_cpu_percent=42, calls_per_server_cpu_s=1080)
    text, numbers = headline([held, one, two])
    assert numbers["held"]["gateway, 1000 streams"]["chunk_added_delay_p99_ms"] == 12.0
    assert numbers["held"]["gateway, 1000 streams"]["first_chunk_p99_ms"] == 900
    assert "first chunk p50 60 ms, p99 900 ms" in text
    assert numbers["workers_ratio_unary"] == pytest.approx(1.25)
    assert numbers["workers_cpu_efficiency_unary"] == pytest.approx(0.9)
    assert "worker CPU 80/76% (1 worker: 125%)" in text


def test_peer_report_adds_latency_over_the_direct_path_per_gateway() -> None:
    from bench.peer import report

    def measured(path: str, provider: str, method: str, c: int, rate: float, p50: float,
                 first: float | None = None) -> dict[str, Any]:  # fmt: skip
        chunk = (first, first + 1) if first else None
        result = row("providers", path, method, c, rate, p50, p50 + 1, chunk)
        return {**result, "path": path, "provider": provider}

    rows = []
    for provider in ("anthropic", "openai"):
        rows += [
            measured("direct SDK", provider, "unary", 1, 500, 1.5),
            measured("direct SDK", provider, "stream", 1, 300, 2.0, first=1.2),
            measured("llm-gateway", provider, "unary", 1, 300, 2.3),
            measured("llm-gateway", provider, "stream", 1, 200, 3.0, first=2.0),
            measured("llm-gateway", provider, "unary", 32, 360, 80),
            measured("llm-gateway", provider, "stream", 32, 200, 150),
            measured("LiteLLM", provider, "unary", 1, 50, 15.5),
            measured("LiteLLM", provider, "stream", 1, 40, 20.0, first=17.2),
            measured("LiteLLM", provider, "unary", 32, 72, 400),
            measured("LiteLLM", provider, "stream", 32, 40, 600),
        ]
    text = report(rows, {"llm-gateway": 137.0, "LiteLLM": 314.0})
    assert "| llm-gateway | anthropic | +0.80 / +0.80 | +0.80 / +0.80 | 360 | 200 | 137 |" in text
    assert "| LiteLLM | openai | +14.00 / +14.00 | +16.00 / +16.00 | 72 | 40 | 314 |" in text
    assert "anthropic unary at concurrency 32: llm-gateway 5.0x LiteLLM's throughput." in text


def test_ab_table_gives_the_medians_per_load_and_tree() -> None:
    from bench.ab import table

    def run(rate: float, p50: float) -> dict[str, Any]:
        return {"calls_per_s": rate, "latency_ms": {"p50": p50, "p99": p50 * 2}}

    results = {
        ("before", "offline", "unary", 32): [run(1000, 30), run(1100, 28), run(900, 35)],
        ("after", "offline", "unary", 32): [run(1200, 25), run(1150, 26), run(1250, 24)],
    }
    text = table(results, ["before", "after"])
    assert "| offline unary c=32 | before | 1000 | 30.000 | 60.000 | 0.000 |" in text
    assert "| offline unary c=32 | after | 1200 | 25.000 | 50.000 | 0.000 |" in text
    assert text.index("| before |") < text.index("| after |")


def http_row(
    target: str,
    method: str,
    c: int,
    rate: float,
    p50: float,
    p99: float,
    stream_firsts: tuple[float, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A front door row (bench/front_door.py): a stream has a first byte and a first chunk,
    `stream_firsts` (p50, p99) for the first byte and 0.02 ms more for the first chunk."""
    result = row("http", target, method, c, rate, p50, p99)
    result["first_byte_ms"] = {"p50": p50, "p99": p99}
    if stream_firsts:
        b50, b99 = stream_firsts
        result["first_byte_ms"] = {"p50": b50, "p99": b99}
        result["first_chunk_ms"] = {"p50": b50 + 0.02, "p99": b99 + 0.02}
    return {**result, **extra}


HTTP_ROWS = [
    {"scenario": "idle", "target": "gateway, front door on", "idle_rss_mib": 110.0},
    http_row("direct upstream", "unary", 1, 6000, 0.15, 0.25),
    http_row("front door pass-through", "unary", 1, 800, 1.05, 2.75),
    http_row("front door -> openai", "unary", 1, 700, 1.35, 3.25),
    http_row("direct upstream", "stream", 1, 7000, 0.12, 0.4, stream_firsts=(0.1, 0.3)),
    http_row("front door pass-through", "stream", 1, 500, 1.9, 3.0, stream_firsts=(1.0, 1.5)),
    http_row("front door -> openai", "stream", 1, 400, 2.2, 4.0, stream_firsts=(1.2, 2.3)),
    http_row("direct upstream", "unary", 32, 12000, 2.5, 5.0),
    http_row("front door pass-through", "unary", 32, 900, 35, 60, calls_per_server_cpu_s=950),
    http_row("front door -> echo", "stream", 32, 2000, 15, 40, stream_firsts=(14, 39)),
    {"scenario": "idle", "target": "gateway, front door off", "idle_rss_mib": 100.0},
]


def test_http_headline_compares_each_target_with_direct_in_the_same_run() -> None:
    text, numbers = headline(HTTP_ROWS)
    added = numbers["http_added_ms_passthrough"]
    assert added["unary_p50"] == pytest.approx(0.9)
    assert added["unary_p99"] == pytest.approx(2.5)
    assert added["first_byte_p50"] == pytest.approx(0.9)
    assert added["first_byte_p99"] == pytest.approx(1.2)
    assert added["first_chunk_p50"] == pytest.approx(0.9)
    assert added["stream_p50"] == pytest.approx(1.78)
    assert numbers["http_added_ms_openai"]["unary_p50"] == pytest.approx(1.2)
    assert "http_added_ms_echo" not in numbers  # echo has no upstream to compare with
    assert numbers["http_calls_per_s_passthrough_unary_c32"] == 900
    assert numbers["http_calls_per_server_cpu_s_passthrough_unary"] == 950
    assert numbers["http_calls_per_s_echo_stream_c32"] == 2000
    assert numbers["http_idle_rss_on_vs_off"] == pytest.approx(1.1)
    assert "unary p50 +0.90 ms, p99 +2.50 ms; stream first byte p50 +0.90 ms" in text
    assert "front door pass-through 900/s (950 per gateway CPU-second)" in text
    assert "front door on 110.0 MiB, off 100.0 MiB (+10.0%, target <= +10%)" in text


def test_full_table_shows_first_bytes_and_leaves_idle_rows_to_the_headline(
    tmp_path: Path,
) -> None:
    results = {
        "date": "2026-12-02T00:00:00+00:00",
        "machine": {"cores": 2, "cpu": "test", "python": "3.11", "pinning": "none",
                    "source": "abc1234"},
        "quick": False,
        "command": "python -m bench.run --only http",
        "duration_s": 1.0,
        "rows": HTTP_ROWS,
    }  # fmt: skip
    markdown = write_reports(results, tmp_path / "http")
    assert "Gateway source: abc1234. `python -m bench.run --only http`, 1.0 s." in markdown
    assert "| http | front door pass-through | stream | 1 | 500 | 1.90 | 3.00 | 3.00 |" in markdown
    assert "| 1.00 / 1.50 | 1.02 / 1.52 | 0 |" in markdown
    assert "| idle |" not in markdown


def test_peer_http_report_compares_each_api_with_its_direct_call() -> None:
    from bench.peer import http_report, numbers

    def measured(path: str, provider: str, method: str, c: int, rate: float, p50: float,
                 first: float | None = None) -> dict[str, Any]:  # fmt: skip
        firsts = (first, first + 1) if first else None
        result = http_row(path, method, c, rate, p50, p50 + 1, stream_firsts=firsts)
        return {**result, "path": path, "provider": provider}

    rows = []
    for provider in ("anthropic", "openai"):
        rows += [
            measured("direct HTTP", provider, "unary", 1, 6000, 0.2),
            measured("direct HTTP", provider, "stream", 1, 7000, 0.2, first=0.1),
        ]
    for path, provider, scale in (
        ("llm-gateway /v1/messages", "anthropic", 1.0),
        ("llm-gateway /v1/messages", "openai", 1.5),
        ("LiteLLM /v1/messages", "anthropic", 15.0),
        ("LiteLLM /v1/messages", "openai", 20.0),
        ("LiteLLM /v1/chat/completions", "openai", 18.0),
    ):
        rows += [
            measured(path, provider, "unary", 1, 500 / scale, 0.2 + scale),
            measured(path, provider, "stream", 1, 400 / scale, 0.3 + scale, first=0.1 + scale),
            measured(path, provider, "unary", 32, 900 / scale, 30 * scale),
            measured(path, provider, "stream", 32, 600 / scale, 50 * scale),
        ]
    rss = {"llm-gateway": 140.0, "LiteLLM": 320.0}
    text = http_report(rows, rss)
    assert (
        "| llm-gateway /v1/messages | anthropic | +1.00 / +1.00 | +1.00 / +1.00"
        " | +1.00 / +1.00 | 900 | 600 | 140 |" in text
    )
    assert "| LiteLLM /v1/chat/completions | openai | +18.00 / +18.00 |" in text
    assert (
        "HTTP unary at concurrency 32: llm-gateway /v1/messages -> anthropic 900/s = 15.0x"
        " LiteLLM /v1/messages -> anthropic 60/s (target >= 10x)." in text
    )
    assert "= 12.0x LiteLLM /v1/chat/completions -> openai 50/s." in text
    measured_numbers = numbers(rows, rss)
    assert measured_numbers["http_passthrough_vs_litellm_messages_stream_c32"] == pytest.approx(15)
    assert measured_numbers["http_translated_vs_litellm_chat_unary_c32"] == pytest.approx(12)
    assert measured_numbers["http_translated_vs_litellm_messages_unary_c32"] == pytest.approx(
        20 / 1.5
    )
    added = measured_numbers["http_added_ms_llm-gateway_v1_messages_openai"]
    assert added["unary_p50"] == pytest.approx(1.5)
    assert added["first_byte_p99"] == pytest.approx(1.5)
    assert measured_numbers["LiteLLM_rss_mib"] == 320.0
