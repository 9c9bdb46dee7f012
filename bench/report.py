"""Turns benchmark rows into the markdown table, the headline ratios and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _find(rows: list[Row], scenario: str, target: str, method: str, c: int) -> Row | None:
    for row in rows:
        if (row["scenario"], row["target"], row.get("method"), row.get("concurrency")) == (
            scenario,
            target,
            method,
            c,
        ):
            return row
    return None


def _idle_rss(rows: list[Row], target: str) -> float | None:
    for row in rows:
        if row["scenario"] == "idle" and row["target"] == target:
            return float(row["idle_rss_mib"])
    return None


def _ms(value: float) -> str:
    return f"{value:.2f}"


def full_table(rows: list[Row]) -> str:
    lines = [
        "| scenario | target | call | concurrency | calls/s | p50 ms | p90 ms | p99 ms "
        "| first byte p50 / p99 ms | first chunk p50 / p99 ms | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "latency_ms" not in r:
            continue  # not a load (an idle RSS): in the headline
        first = r.get("first_chunk_ms") or {}
        byte = r.get("first_byte_ms") or {}
        lines.append(
            f"| {r['scenario']} | {r['target']} | {r['method']} | {r['concurrency']} "
            f"| {r['calls_per_s']:.0f} | {_ms(r['latency_ms']['p50'])}"
            f" | {_ms(r['latency_ms']['p90'])} | {_ms(r['latency_ms']['p99'])} | "
            + (f"{_ms(byte['p50'])} / {_ms(byte['p99'])}" if byte else "")
            + " | "
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


# The front door's targets (bench/front_door.py) and their keys in the numbers.
HTTP_DIRECT = "direct upstream"
HTTP_TARGETS = {
    HTTP_DIRECT: "direct",
    "front door pass-through": "passthrough",
    "front door -> openai": "openai",
    "front door -> echo": "echo",
}


def http_added(rows: list[Row], target: str, scenario: str = "http") -> dict[str, float] | None:
    """`target` minus the direct upstream call at concurrency 1: unary latency, and a
    stream's first byte, first text delta and whole."""
    gate_u = _find(rows, scenario, target, "unary", 1)
    direct_u = _find(rows, scenario, HTTP_DIRECT, "unary", 1)
    gate_s = _find(rows, scenario, target, "stream", 1)
    direct_s = _find(rows, scenario, HTTP_DIRECT, "stream", 1)
    if not (gate_u and direct_u and gate_s and direct_s):
        return None
    added = {}
    for name, key, gate, direct in (
        ("unary", "latency_ms", gate_u, direct_u),
        ("first_byte", "first_byte_ms", gate_s, direct_s),
        ("first_chunk", "first_chunk_ms", gate_s, direct_s),
        ("stream", "latency_ms", gate_s, direct_s),
    ):
        for q in ("p50", "p99"):
            added[f"{name}_{q}"] = gate[key][q] - direct[key][q]
    return added


def _http_headline(rows: list[Row], lines: list[str], numbers: dict[str, Any]) -> None:
    """The front door's targets (issue 15), from the `http` and `idle` rows."""
    for target, limit in (
        ("front door pass-through", " (targets: unary p50 <= 1 ms, p99 <= 3 ms; first byte"
                                    " within 1 ms of direct)"),
        ("front door -> openai", " (another upstream API than direct's: for reference)"),
    ):  # fmt: skip
        added = http_added(rows, target)
        if added is None:
            continue
        numbers[f"http_added_ms_{HTTP_TARGETS[target]}"] = added
        lines.append(
            f"- HTTP {target}: added over direct at concurrency 1{limit}:"
            f" unary p50 {added['unary_p50']:+.2f} ms, p99 {added['unary_p99']:+.2f} ms;"
            f" stream first byte p50 {added['first_byte_p50']:+.2f} ms,"
            f" p99 {added['first_byte_p99']:+.2f} ms; first text delta"
            f" p50 {added['first_chunk_p50']:+.2f} ms, p99 {added['first_chunk_p99']:+.2f} ms;"
            f" whole stream p50 {added['stream_p50']:+.2f} ms"
        )
    for method in ("unary", "stream"):
        parts = []
        for target, key in HTTP_TARGETS.items():
            row = _find(rows, "http", target, method, 32)
            if row is None:
                continue
            numbers[f"http_calls_per_s_{key}_{method}_c32"] = row["calls_per_s"]
            part = f"{target} {row['calls_per_s']:.0f}/s"
            if row.get("calls_per_server_cpu_s"):
                numbers[f"http_calls_per_server_cpu_s_{key}_{method}"] = row[
                    "calls_per_server_cpu_s"
                ]
                part += f" ({row['calls_per_server_cpu_s']} per gateway CPU-second)"
            if row.get("errors"):
                part += f", {row['errors']} errors"
            parts.append(part)
        if parts:
            lines.append(f"- HTTP {method} at concurrency 32: " + "; ".join(parts))
    on = _idle_rss(rows, "gateway, front door on")
    off = _idle_rss(rows, "gateway, front door off")
    if on and off:
        numbers["http_idle_rss_on_vs_off"] = on / off
        lines.append(
            f"- idle RSS of the gateway: front door on {on:.1f} MiB, off {off:.1f} MiB"
            f" ({100 * (on / off - 1):+.1f}%, target <= +10%)"
        )


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
            (
                "_vs_aiohttp",
                f"direct {provider} SDK aiohttp",
                "added latency over the typed SDK on its aiohttp transport",
            ),
            ("_vs_post", f"direct {provider} SDK post", "of which the gateway's own hop"),
            (
                "_vs_post_aiohttp",
                f"direct {provider} SDK post aiohttp",
                "of which the gateway's own hop over its own transport (aiohttp)",
            ),
        ):
            added = _added(rows, f"gateway -> {provider}", baseline)
            if added is None:
                continue
            numbers[f"added_ms_{provider}{suffix}"] = added
            target = {
                "": " (target p50 <= 1 ms, p99 <= 3 ms)",
                "_vs_post": " (client.post baseline)",
                "_vs_post_aiohttp": " (client.post baseline)",
            }.get(suffix, "")
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
                    line = (
                        f"- {provider} {method} at concurrency {c}:"
                        f" gateway {g['calls_per_s']:.0f}/s,"
                        f" direct SDK {d['calls_per_s']:.0f}/s (ratio {ratio:.2f})"
                    )
                    a = _find(rows, "providers", f"direct {provider} SDK aiohttp", method, c)
                    if a:
                        aio = g["calls_per_s"] / a["calls_per_s"]
                        numbers[f"throughput_ratio_{provider}_{method}_c{c}_vs_aiohttp"] = aio
                        line += f"; on aiohttp {a['calls_per_s']:.0f}/s (ratio {aio:.2f})"
                    lines.append(line)
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
                f" {best['ceiling']:.0f}/s = {100 * ratio:.0f}% (target >= 60%, issue 19)"
            )
    _http_headline(rows, lines, numbers)
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
    series = [
        ("ceiling", "bare grpc.aio"),
        ("offline", "gateway offline"),
        ("providers", "gateway -> anthropic"),
        ("providers", "direct anthropic SDK"),
        ("providers", "gateway -> openai"),
        ("providers", "direct openai SDK"),
    ]
    if not any((r["scenario"], r["target"]) in series for r in rows):
        return False  # the gRPC scenarios did not run: nothing to plot
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
            f" {machine['pinning']}. Load: bench/loadgen (Go)."
            + (f" Gateway source: {machine['source']}." if machine.get("source") else "")
            + f" `{results.get('command', 'make bench')}`,"
            f" {results['duration_s']} s{' (quick mode)' if results['quick'] else ''}."
            + (
                f" Load average (others' work on this shared machine) at the start"
                f" {' / '.join(map(str, machine['load_average_at_start']))}, at the end"
                f" {' / '.join(map(str, results['load_average_at_end']))}."
                if "load_average_at_start" in machine and "load_average_at_end" in results
                else ""
            ),
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
                    *(f"- {key}: {value:.4g}" for key, value in sorted(results["medians"].items())),
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
