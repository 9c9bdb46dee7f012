"""Turns benchmark rows into the markdown table, the headline ratios and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _find(rows: list[Row], scenario: str, target: str, method: str, c: int) -> Row | None:
    for row in rows:
        if (row["scenario"], row["target"], row["method"], row["concurrency"]) == (
            scenario,
            target,
            method,
            c,
        ):
            return row
    return None


def _ms(value: float) -> str:
    return f"{value:.2f}"


def full_table(rows: list[Row]) -> str:
    lines = [
        "| scenario | target | call | concurrency | calls/s | p50 ms | p90 ms | p99 ms "
        "| first chunk p50 / p99 ms | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        first = r.get("first_chunk_ms") or {}
        lines.append(
            f"| {r['scenario']} | {r['target']} | {r['method']} | {r['concurrency']} "
            f"| {r['calls_per_s']:.0f} | {_ms(r['latency_ms']['p50'])}"
            f" | {_ms(r['latency_ms']['p90'])} | {_ms(r['latency_ms']['p99'])} | "
            + (f"{_ms(first['p50'])} / {_ms(first['p99'])}" if first else "")
            + f" | {r.get('errors', 0)} |"
        )
    return "\n".join(lines)


def _added(rows: list[Row], gateway: str, direct: str) -> dict[str, float] | None:
    """Gateway minus direct at concurrency 1: unary latency and time to first chunk."""
    gate_u = _find(rows, "providers", gateway, "unary", 1)
    direct_u = _find(rows, "providers", direct, "unary", 1)
    gate_s = _find(rows, "providers", gateway, "stream", 1)
    direct_s = _find(rows, "providers", direct, "stream", 1)
    if not (gate_u and direct_u and gate_s and direct_s):
        return None
    return {
        "unary_p50": gate_u["latency_ms"]["p50"] - direct_u["latency_ms"]["p50"],
        "unary_p99": gate_u["latency_ms"]["p99"] - direct_u["latency_ms"]["p99"],
        "first_chunk_p50": gate_s["first_chunk_ms"]["p50"] - direct_s["first_chunk_ms"]["p50"],
        "first_chunk_p99": gate_s["first_chunk_ms"]["p99"] - direct_s["first_chunk_ms"]["p99"],
    }


def headline(rows: list[Row]) -> tuple[str, dict[str, Any]]:
    """The issue's targets, each as measured: markdown lines and a dict for the JSON."""
    lines: list[str] = []
    numbers: dict[str, Any] = {}
    for provider in ("anthropic", "openai"):
        # Against the SDK's typed methods (what a service would write without the
        # gateway), then against the SDK used the gateway's way (`client.post`,
        # bench/direct_sdk.py --post): the gateway's own cost alone.
        for suffix, baseline, label in (
            ("", f"direct {provider} SDK", "added latency at concurrency 1"),
            ("_vs_post", f"direct {provider} SDK post", "of which the gateway's own hop"),
        ):
            added = _added(rows, f"gateway -> {provider}", baseline)
            if added is None:
                continue
            numbers[f"added_ms_{provider}{suffix}"] = added
            target = (
                " (target p50 <= 1 ms, p99 <= 3 ms)" if not suffix else " (client.post baseline)"
            )
            lines.append(
                f"- {provider}: {label}{target}:"
                f" unary p50 {added['unary_p50']:+.2f} ms, p99 {added['unary_p99']:+.2f} ms;"
                f" stream first chunk p50 {added['first_chunk_p50']:+.2f} ms,"
                f" p99 {added['first_chunk_p99']:+.2f} ms"
            )
        for c in (32, 128):
            for method in ("unary", "stream"):
                g = _find(rows, "providers", f"gateway -> {provider}", method, c)
                d = _find(rows, "providers", f"direct {provider} SDK", method, c)
                if g and d:
                    ratio = g["calls_per_s"] / d["calls_per_s"]
                    numbers[f"throughput_ratio_{provider}_{method}_c{c}"] = ratio
                    lines.append(
                        f"- {provider} {method} at concurrency {c}:"
                        f" gateway {g['calls_per_s']:.0f}/s,"
                        f" direct SDK {d['calls_per_s']:.0f}/s (ratio {ratio:.2f})"
                    )
    for method in ("unary", "stream"):
        best = {
            scenario: max(
                (r["calls_per_s"] for r in rows
                 if r["scenario"] == scenario and r["method"] == method and r["concurrency"] > 1),
                default=0.0,
            )
            for scenario in ("ceiling", "offline")
        }  # fmt: skip
        if best["ceiling"]:
            ratio = best["offline"] / best["ceiling"]
            numbers[f"offline_vs_ceiling_{method}"] = ratio
            lines.append(
                f"- offline {method} throughput: {best['offline']:.0f}/s vs ceiling"
                f" {best['ceiling']:.0f}/s = {100 * ratio:.0f}% (target >= 50%)"
            )
    for r in rows:
        if r["scenario"] == "held":
            delay, start = r["chunk_added_delay_ms"], r["first_chunk_ms"]
            numbers.setdefault("held", {})[r["target"]] = {
                "streams": r["streams"],
                "peak_rss_mib": r["peak_rss_mib"],
                "chunk_added_delay_p99_ms": delay["p99"],
                "first_chunk_p99_ms": start["p99"],
            }
            lines.append(
                f"- {r['target']} open for {r['seconds']} s:"
                f" peak RSS {r['peak_rss_mib']} MiB (target < 300), idle {r['idle_rss_mib']} MiB,"
                f" CPU {r['cpu_percent_of_one_core']}% of a core, added delay per chunk"
                f" p50 {delay['p50']:.2f} ms, p99 {delay['p99']:.2f} ms (target <= 5),"
                f" first chunk p50 {start['p50']:.0f} ms, p99 {start['p99']:.0f} ms,"
                f" errors {r['errors']}"
            )
    for method in ("unary", "stream"):
        one = _find(rows, "workers", "1 worker(s)", method, 128)
        two = _find(rows, "workers", "2 worker(s)", method, 128)
        if one and two:
            ratio = two["calls_per_s"] / one["calls_per_s"]
            numbers[f"workers_ratio_{method}"] = ratio
            line = (
                f"- 2 workers vs 1, {method} at concurrency 128: {two['calls_per_s']:.0f}/s vs"
                f" {one['calls_per_s']:.0f}/s = {ratio:.2f}x (target >= 1.7x)"
            )
            if one.get("calls_per_server_cpu_s") and two.get("calls_per_server_cpu_s"):
                efficiency = two["calls_per_server_cpu_s"] / one["calls_per_server_cpu_s"]
                numbers[f"workers_cpu_efficiency_{method}"] = efficiency
                line += (
                    f"; on the same 2 cores the load generator used"
                    f" {two['loadgen_cpu_percent']}% of a core; worker CPU"
                    f" {'/'.join(str(p) for p in two['worker_cpu_percent'])}% (1 worker:"
                    f" {'/'.join(str(p) for p in one['worker_cpu_percent'])}%);"
                    f" calls per serving CPU-second {two['calls_per_server_cpu_s']} vs"
                    f" {one['calls_per_server_cpu_s']} ({efficiency:.2f} of one worker's)"
                )
            lines.append(line)
    return "\n".join(lines), numbers


def plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [
        ("ceiling", "bare grpc.aio"),
        ("offline", "gateway offline"),
        ("providers", "gateway -> anthropic"),
        ("providers", "direct anthropic SDK"),
        ("providers", "gateway -> openai"),
        ("providers", "direct openai SDK"),
    ]
    for axis, method, key, title in (
        (axes[0], "unary", "latency_ms", "Generate: latency"),
        (axes[1], "stream", "first_chunk_ms", "StreamGenerate: time to first chunk"),
    ):
        for scenario, target in series:
            points = sorted(
                (r["concurrency"], r[key]["p50"], r[key]["p99"])
                for r in rows
                if r["scenario"] == scenario and r["target"] == target and r["method"] == method
                and r.get(key)
            )  # fmt: skip
            if not points:
                continue
            xs = [p[0] for p in points]
            line = axis.plot(xs, [p[1] for p in points], marker="o", label=f"{target} p50")[0]
            axis.plot(
                xs, [p[2] for p in points], ls="--", color=line.get_color(), label=f"{target} p99"
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrency")
        axis.set_ylabel("ms")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_reports(results: dict[str, Any], stem: Path) -> str:
    """Writes STEM.json, STEM.md and STEM.png; returns the markdown."""
    lines, numbers = headline(results["rows"])
    results["headline"] = numbers
    machine = results["machine"]
    markdown = "\n".join(
        [
            f"# Benchmark {results['date']}",
            "",
            f"{machine['cores']} cores ({machine['cpu']}), Python {machine['python']};"
            f" {machine['pinning']}. Load: bench/loadgen (Go). `make bench`,"
            f" {results['duration_s']} s{' (quick mode)' if results['quick'] else ''}.",
            "",
            "## Against the targets",
            "",
            lines,
            "",
            *(
                [
                    f"## Medians over {len(results['repetitions'])} repetitions"
                    f" of the {' and '.join(results['repeated'])} scenarios",
                    "",
                    *(f"- {key}: {value:.3g}" for key, value in sorted(results["medians"].items())),
                    "",
                ]
                if results.get("medians")
                else []
            ),
            "## Every run",
            "",
            full_table(results["rows"]),
            "",
        ]
    )
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    if plot(results["rows"], stem.with_suffix(".png")):
        markdown += f"\n![latency against concurrency]({stem.name}.png)\n"
        stem.with_suffix(".md").write_text(markdown)
    return markdown
