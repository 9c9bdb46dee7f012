"""`make bench-peer`: the gateway against a peer, LiteLLM's proxy, on the same box.

Not part of the tests. LiteLLM is installed into its own virtual environment
(bench/.peer-venv, version pinned below) so none of its dependencies touch
ours. Both gateways sit in front of the same fake upstream (bench/fake_upstream.py,
on core 1) and run one serving process on core 0, all started at once
and each measured in turn (class Comparison). Two comparisons, each against
the direct path measured in the same repetition:

`sdk`, the official SDKs' view:
- direct: the SDK calling the fake upstream (bench/direct_sdk.py);
- LiteLLM: the same SDK calling the proxy (OpenAI format on
  /v1/chat/completions, Anthropic on /v1/messages);
- llm-gateway: bench/loadgen (Go, gRPC) calling the gateway, which calls the
  fake upstream through the same SDKs.

`http`, Anthropic's Messages API over HTTP (bench/front_door.py), all driven
by bench/loadgen in its HTTP mode:
- direct: the fake upstream's /v1/messages, /v1/chat/completions and /v1/responses;
- LiteLLM: its /v1/messages (to the Anthropic deployment, and translated to
  the OpenAI one), its /v1/chat/completions (to the OpenAI one) and its
  /v1/responses (to the OpenAI one's Responses API, and translated to the
  Anthropic one);
- llm-gateway: its front door's /v1/messages, pass-through to the Anthropic
  deployment and translated to the OpenAI one, its /v1/chat/completions
  (relayed to the OpenAI one) and its /v1/responses (relayed to the OpenAI
  one's Responses API, and translated to the Anthropic one).

Each gateway is reported as added latency over the direct path (concurrency
1; unary, and the first chunk of a stream) and as throughput at concurrency
32, with the idle RSS of each serving process. With --repeat N the whole
comparison runs N times (servers restarted) and the medians of the
per-repetition ratios are reported too. LiteLLM gets --calls calls per load;
the direct path and llm-gateway over HTTP, being faster, get more
(bench/front_door.py's counts), so their loads last long enough to measure.

Usage: python -m bench.peer [--calls N] [--repeat N] [--only sdk http] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import front_door
from bench.front_door import (
    ANTHROPIC_HEADERS,
    CHAT_COMPLETIONS,
    MESSAGES,
    OPENAI_MODEL,
    PASSTHROUGH_MODEL,
    RESPONSES,
    UPSTREAM_KEY_HEADER,
    body_file,
    settled_rss,
)
from bench.processes import LOAD_CORE, ROOT, SERVER_CORE, Service, free_port, pinned, python
from bench.run import CHUNKS, SDK_MODELS, Bench, _request, machine, medians, sdk_providers, sdk_url

Row = dict[str, Any]

LITELLM = "litellm[proxy]==1.106.2"
VENV = ROOT / "bench" / ".peer-venv"
MASTER_KEY = "sk-bench-peer-master-key-0123456789"


def ensure_litellm() -> Path:
    """bench/.peer-venv/bin/litellm, installing it on first use."""
    binary = VENV / "bin" / "litellm"
    if not binary.exists():
        print(f"installing {LITELLM} into {VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "pip"), "install", "--quiet"]
        subprocess.run([*pip, LITELLM], check=True)
    return binary


def wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def litellm_config(path: Path, upstream: str) -> Path:
    """bench/run.py's two models, and the pass-through one of bench/front_door.py."""
    lines = ["model_list:"]
    for provider, model in (*SDK_MODELS, ("anthropic", PASSTHROUGH_MODEL)):
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: {provider}/bench-model",
            f"      api_base: {sdk_url(provider, upstream)}",
            "      api_key: bench",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def sdk_call(core: int, provider: str, url: str, method: str, concurrency: int, calls: int,
             model: str = "bench-model", key: str = "bench") -> dict[str, Any]:  # fmt: skip
    """bench/direct_sdk.py pinned to `core`: the direct path (the SDK is what is measured,
    on the serving core), or the load on LiteLLM (on the load core)."""
    argv = [*pinned(core), python(), "-m", "bench.direct_sdk", provider, url]
    argv += [method, str(concurrency), str(calls), model, key]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(json.loads(out.stdout))


# The HTTP targets: (path as reported, upstream provider, API path, model). The
# direct path is the fake upstream's own API; the models are the gateways'.
# "openai responses" is the OpenAI upstream's Responses API (its own direct path).
DIRECT_HTTP = (
    ("direct HTTP", "anthropic", MESSAGES, PASSTHROUGH_MODEL),
    ("direct HTTP", "openai", CHAT_COMPLETIONS, PASSTHROUGH_MODEL),
    ("direct HTTP", "openai responses", RESPONSES, PASSTHROUGH_MODEL),
)
LITELLM_HTTP = (
    ("LiteLLM /v1/messages", "anthropic", MESSAGES, PASSTHROUGH_MODEL),
    ("LiteLLM /v1/messages", "openai", MESSAGES, OPENAI_MODEL),
    ("LiteLLM /v1/chat/completions", "openai", CHAT_COMPLETIONS, OPENAI_MODEL),
    ("LiteLLM /v1/responses", "openai responses", RESPONSES, OPENAI_MODEL),
    ("LiteLLM /v1/responses", "anthropic", RESPONSES, PASSTHROUGH_MODEL),
)
GATEWAY_HTTP = (
    ("llm-gateway /v1/messages", "anthropic", MESSAGES, PASSTHROUGH_MODEL),
    ("llm-gateway /v1/messages", "openai", MESSAGES, OPENAI_MODEL),
    ("llm-gateway /v1/chat/completions", "openai", CHAT_COMPLETIONS, OPENAI_MODEL),
    ("llm-gateway /v1/responses", "openai responses", RESPONSES, OPENAI_MODEL),
    ("llm-gateway /v1/responses", "anthropic", RESPONSES, PASSTHROUGH_MODEL),
)
METHODS, CONCURRENCIES = ("unary", "stream"), (1, 32)


class Comparison:
    """One repetition: the fake upstream, LiteLLM and the gateway all started (both
    gateways pinned to the serving core, each idle while the other is measured: about
    0.2% of a core), then each load on each path in turn, so that a ratio compares loads
    seconds apart, not minutes: this machine's noise comes and goes."""

    def __init__(self, bench: Bench, litellm: Path, calls: int, only: list[str]) -> None:
        self.bench = bench
        self.litellm = litellm
        self.calls = calls
        self.only = only
        self.rows: list[Row] = []
        self.rss: dict[str, float] = {}

    def measure(self, path: str, provider: str, result: dict[str, Any]) -> None:
        self.rows.append({"path": path, "provider": provider, **result})
        first = result.get("first_chunk_ms") or {}
        c = result["concurrency"]
        print(
            f"  {path:28s} {provider:9s} {result['method']:6s} c={c:<3d}"
            f" {result['calls_per_s']:7.0f}/s  p50 {result['latency_ms']['p50']:7.2f}"
            f"  p99 {result['latency_ms']['p99']:7.2f} ms"
            + (f"  first chunk p50 {first['p50']:.2f} p99 {first['p99']:.2f}" if first else "")
            + (f"  errors {result['errors']} {result['error_codes']}" if result["errors"] else ""),
            flush=True,
        )

    def run(self) -> None:
        bench = self.bench
        upstream_port, litellm_port = free_port(), free_port()
        grpc_port, http_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        litellm = f"http://127.0.0.1:{litellm_port}"
        gateway = f"http://127.0.0.1:{http_port}"
        fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
        providers = front_door.providers(sdk_providers(upstream))
        config = bench.gateway_config(grpc_port, providers, http_port=http_port)
        with (
            Service("fake-upstream", fake, core=LOAD_CORE),
            self.litellm_service(upstream, litellm_port) as peer,
        ):
            wait_for_port(litellm_port)
            self.rss["LiteLLM"] = settled_rss(peer)
            with bench.gateway(config, core=SERVER_CORE) as ours:
                self.rss["llm-gateway"] = settled_rss(ours)
                if "sdk" in self.only:
                    self.sdk(upstream, litellm, f"127.0.0.1:{grpc_port}")
                if "http" in self.only:
                    self.http(upstream, litellm, gateway)

    def litellm_service(self, upstream: str, port: int) -> Service:
        config = litellm_config(self.bench.work / "litellm.yaml", upstream)
        # Its banner goes to stdout: sent to stderr, where Service looks for "ready".
        argv = ["sh", "-c", 'exec "$0" "$@" 1>&2', str(self.litellm), "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        env = {
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start-up
            # Its /v1/messages translates for OpenAI deployments to Chat Completions, as
            # ours does (by default it would call the Responses API).
            "LITELLM_USE_CHAT_COMPLETIONS_URL_FOR_ANTHROPIC_MESSAGES": "True",
        }
        return Service("litellm", argv, core=SERVER_CORE, ready="Proxy initialized", env=env)

    def sdk(self, upstream: str, litellm: str, grpc_address: str) -> None:
        """The SDKs' view: direct SDK, the SDK through LiteLLM, gRPC through the gateway."""
        for provider, model in SDK_MODELS:
            request = self.bench.request_file(model, _request(model, "Hello", max_tokens=256))
            for method in METHODS:
                for c in CONCURRENCIES:
                    url = sdk_url(provider, upstream)
                    result = sdk_call(SERVER_CORE, provider, url, method, c, self.calls)
                    self.measure("direct SDK", provider, result)
                    url = sdk_url(provider, litellm)
                    result = sdk_call(
                        LOAD_CORE, provider, url, method, c, self.calls, model, MASTER_KEY
                    )
                    self.measure("LiteLLM", provider, result)
                    result = self.bench.loadgen(grpc_address, request, method, c, calls=self.calls)
                    self.measure("llm-gateway", provider, result)

    def http(self, upstream: str, litellm: str, gateway: str) -> None:
        """Anthropic's Messages API (and OpenAI's Chat Completions) over HTTP, each path
        driven by bench/loadgen."""
        bench = self.bench
        direct_headers = (*ANTHROPIC_HEADERS, UPSTREAM_KEY_HEADER)
        litellm_headers = (*ANTHROPIC_HEADERS, f"authorization: Bearer {MASTER_KEY}")
        loads = [(upstream, t, direct_headers) for t in DIRECT_HTTP]
        loads += [(gateway, t, ANTHROPIC_HEADERS) for t in GATEWAY_HTTP]
        loads += [(litellm, t, litellm_headers) for t in LITELLM_HTTP]
        for method in METHODS:
            for c in CONCURRENCIES:
                for base, (path, provider, api, model), headers in loads:
                    slow = base == litellm
                    result = bench.http_load(
                        base + api, body_file(bench, model, method, api=api),
                        method, c, headers=headers, seconds=60,
                        calls=self.calls if slow else front_door.calls(bench, c),
                    )  # fmt: skip
                    self.measure(path, provider, result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per measurement")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions; medians reported")
    parser.add_argument(
        "--only", nargs="*", default=["sdk", "http"], choices=["sdk", "http"],
        help="sdk: the SDKs (and gRPC) view; http: Anthropic's Messages API over HTTP",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # before the loads, not after them
    litellm = ensure_litellm()
    bench = Bench(quick=False)
    info = machine()
    started = time.monotonic()
    repetitions: list[dict[str, Any]] = []
    comparison = Comparison(bench, litellm, args.calls, args.only)
    for repetition in range(args.repeat):
        if args.repeat > 1:
            print(f"repetition {repetition + 1} of {args.repeat}", flush=True)
        comparison = Comparison(bench, litellm, args.calls, args.only)
        comparison.run()
        repetitions.append(numbers(comparison.rows, comparison.rss))
    rows, rss = comparison.rows, comparison.rss
    sections = [report(rows, rss)] if "sdk" in args.only else []
    sections += [http_report(rows, rss)] if "http" in args.only else []
    text = "\n\n".join(sections)
    middle = medians(repetitions)
    if middle:
        text += f"\n\n## Medians over {len(repetitions)} repetitions\n\n" + "\n".join(
            f"- {key}: {value:.4g}" for key, value in sorted(middle.items())
        )
    print(text)
    stamp = datetime.now(UTC)
    stem = args.out / f"{stamp:%Y-%m-%d}-{info['host'] or 'host'}-peer"
    duration = time.monotonic() - started
    results = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": info,
        "litellm": LITELLM,
        "duration_s": round(duration, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rss_mib": rss,
        "rows": rows,
        "repetitions": repetitions,
        "medians": middle,
    }
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    header = (
        f"# Peer comparison {stamp:%Y-%m-%d}\n\n{info['cores']} cores ({info['cpu']}),"
        f" Python {info['python']}; {info['pinning']}; gateway source {info['source']};"
        f" load average at the start {' / '.join(map(str, info['load_average_at_start']))},"
        f" at the end {' / '.join(map(str, results['load_average_at_end']))}."
        f" `python -m bench.peer {' '.join(sys.argv[1:])}`"
        f" (`make bench-peer`), {duration:.0f} s; {LITELLM}, one worker."
        + (
            f" The tables are the last of {len(repetitions)} repetitions."
            if len(repetitions) > 1
            else ""
        )
        + "\n\n"
    )
    stem.with_suffix(".md").write_text(header + text + "\n")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def _find(rows: list[dict[str, Any]], path: str, provider: str, method: str, c: int) -> Any:
    for r in rows:
        if (r["path"], r["provider"], r["method"], r["concurrency"]) == (path, provider, method, c):
            return r
    return None


def report(rows: list[dict[str, Any]], rss: dict[str, float]) -> str:
    """Added latency over the direct path and throughput, per gateway, as a markdown table."""
    lines = [
        "| gateway | provider | added unary p50 / p99 ms | added first chunk p50 / p99 ms"
        " | unary calls/s (c=32) | stream calls/s (c=32) | idle RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path in ("llm-gateway", "LiteLLM"):
        for provider, _ in SDK_MODELS:
            direct_u = _find(rows, "direct SDK", provider, "unary", 1)
            direct_s = _find(rows, "direct SDK", provider, "stream", 1)
            unary = _find(rows, path, provider, "unary", 1)
            stream = _find(rows, path, provider, "stream", 1)
            u32 = _find(rows, path, provider, "unary", 32)
            s32 = _find(rows, path, provider, "stream", 32)
            if not all((direct_u, direct_s, unary, stream, u32, s32)):
                continue
            added_u = [unary["latency_ms"][q] - direct_u["latency_ms"][q] for q in ("p50", "p99")]
            added_f = [
                stream["first_chunk_ms"][q] - direct_s["first_chunk_ms"][q] for q in ("p50", "p99")
            ]
            lines.append(
                f"| {path} | {provider} | {added_u[0]:+.2f} / {added_u[1]:+.2f}"
                f" | {added_f[0]:+.2f} / {added_f[1]:+.2f}"
                f" | {u32['calls_per_s']:.0f} | {s32['calls_per_s']:.0f} | {rss[path]:.0f} |"
            )
    for provider, _ in SDK_MODELS:
        for method in ("unary", "stream"):
            ours = _find(rows, "llm-gateway", provider, method, 32)
            theirs = _find(rows, "LiteLLM", provider, method, 32)
            if ours and theirs and theirs["calls_per_s"]:
                lines.append(
                    f"\n{provider} {method} at concurrency 32: llm-gateway"
                    f" {ours['calls_per_s'] / theirs['calls_per_s']:.1f}x LiteLLM's throughput."
                )
    return "\n".join(lines)


def _added(ours: Row, direct: Row, key: str) -> list[float]:
    return [ours[key][q] - direct[key][q] for q in ("p50", "p99")]


def http_report(rows: list[Row], rss: dict[str, float]) -> str:
    """The HTTP comparison: added latency over the direct call of the same upstream API
    (concurrency 1) and throughput at concurrency 32, as a markdown table."""
    lines = [
        "| gateway API | upstream | added unary p50 / p99 ms | added first byte p50 / p99 ms"
        " | added first chunk p50 / p99 ms | unary calls/s (c=32) | stream calls/s (c=32)"
        " | idle RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path, provider, _, _ in (*GATEWAY_HTTP, *LITELLM_HTTP):
        direct_u = _find(rows, "direct HTTP", provider, "unary", 1)
        direct_s = _find(rows, "direct HTTP", provider, "stream", 1)
        unary = _find(rows, path, provider, "unary", 1)
        stream = _find(rows, path, provider, "stream", 1)
        u32 = _find(rows, path, provider, "unary", 32)
        s32 = _find(rows, path, provider, "stream", 32)
        if not all((direct_u, direct_s, unary, stream, u32, s32)):
            continue
        cells = [
            _added(unary, direct_u, "latency_ms"),
            _added(stream, direct_s, "first_byte_ms"),
            _added(stream, direct_s, "first_chunk_ms"),
        ]
        gateway = "llm-gateway" if path.startswith("llm-gateway") else "LiteLLM"
        lines.append(
            f"| {path} | {provider} | "
            + " | ".join(f"{a:+.2f} / {b:+.2f}" for a, b in cells)
            + f" | {u32['calls_per_s']:.0f}{_errors(u32)} | {s32['calls_per_s']:.0f}{_errors(s32)}"
            f" | {rss[gateway]:.0f} |"
        )
    for line in _http_ratios(rows).values():
        lines.append(f"\n{line[1]}")
    return "\n".join(lines)


def _errors(row: Row) -> str:
    return f" ({row['errors']} errors)" if row.get("errors") else ""


# (name, ours, theirs): the throughput ratios the target is about.
HTTP_RATIOS = (
    ("passthrough_vs_litellm_messages", ("llm-gateway /v1/messages", "anthropic"),
     ("LiteLLM /v1/messages", "anthropic")),
    ("translated_vs_litellm_messages", ("llm-gateway /v1/messages", "openai"),
     ("LiteLLM /v1/messages", "openai")),
    ("translated_vs_litellm_chat", ("llm-gateway /v1/messages", "openai"),
     ("LiteLLM /v1/chat/completions", "openai")),
    ("chat_vs_litellm_chat", ("llm-gateway /v1/chat/completions", "openai"),
     ("LiteLLM /v1/chat/completions", "openai")),
    ("responses_vs_litellm_responses", ("llm-gateway /v1/responses", "openai responses"),
     ("LiteLLM /v1/responses", "openai responses")),
    ("responses_translated_vs_litellm", ("llm-gateway /v1/responses", "anthropic"),
     ("LiteLLM /v1/responses", "anthropic")),
)  # fmt: skip
PASSTHROUGH_TARGET = " (target >= 10x)"


def _http_ratios(rows: list[Row]) -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {}
    for name, (ours_path, ours_provider), (their_path, their_provider) in HTTP_RATIOS:
        for method in METHODS:
            ours = _find(rows, ours_path, ours_provider, method, 32)
            theirs = _find(rows, their_path, their_provider, method, 32)
            if ours and theirs and theirs["calls_per_s"]:
                ratio = ours["calls_per_s"] / theirs["calls_per_s"]
                out[f"http_{name}_{method}_c32"] = (
                    ratio,
                    f"HTTP {method} at concurrency 32: {ours_path} -> {ours_provider}"
                    f" {ours['calls_per_s']:.0f}/s = {ratio:.1f}x {their_path} -> {their_provider}"
                    f" {theirs['calls_per_s']:.0f}/s"
                    + (PASSTHROUGH_TARGET if name.startswith("passthrough") else "")
                    + ".",
                )
    return out


def numbers(rows: list[Row], rss: dict[str, float]) -> dict[str, Any]:
    """One repetition's ratios and added latencies, for the medians."""
    out: dict[str, Any] = {f"{k}_rss_mib": v for k, v in rss.items()}
    out.update({key: ratio for key, (ratio, _) in _http_ratios(rows).items()})
    for path, provider, _, _ in (*GATEWAY_HTTP, *LITELLM_HTTP):
        direct_u = _find(rows, "direct HTTP", provider, "unary", 1)
        direct_s = _find(rows, "direct HTTP", provider, "stream", 1)
        unary = _find(rows, path, provider, "unary", 1)
        stream = _find(rows, path, provider, "stream", 1)
        if not all((direct_u, direct_s, unary, stream)):
            continue
        gateway, api = path.split()
        key = f"http_added_ms_{gateway}_{api.strip('/').replace('/', '_')}_{provider}"
        out[key] = {
            f"{name}_{q}": value
            for name, ours, direct, field in (
                ("unary", unary, direct_u, "latency_ms"),
                ("first_byte", stream, direct_s, "first_byte_ms"),
                ("first_chunk", stream, direct_s, "first_chunk_ms"),
            )
            for q, value in zip(("p50", "p99"), _added(ours, direct, field), strict=True)
        }
    for provider, _ in SDK_MODELS:
        for method in METHODS:
            ours = _find(rows, "llm-gateway", provider, method, 32)
            theirs = _find(rows, "LiteLLM", provider, method, 32)
            if ours and theirs and theirs["calls_per_s"]:
                out[f"sdk_{provider}_{method}_c32_vs_litellm"] = (
                    ours["calls_per_s"] / theirs["calls_per_s"]
                )
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
