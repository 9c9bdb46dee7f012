"""`make bench-peer`: the gateway against a peer, LiteLLM's proxy, on the same box.

Not part of the tests. LiteLLM is installed into its own virtual environment
(bench/.peer-venv, version pinned below) so none of its dependencies touch
ours. Both gateways sit in front of the same fake upstream (bench/fake_upstream.py,
on core 1) and run one serving process on core 0, one after the other:

- the direct path: the official SDK calling the fake upstream (bench/direct_sdk.py);
- LiteLLM: the same SDK calling the proxy, which calls the fake upstream
  (OpenAI format on /v1/chat/completions, Anthropic on /v1/messages);
- llm-gateway: bench/loadgen (Go, gRPC) calling the gateway, which calls the
  fake upstream through the same SDKs.

Each gateway is reported as added latency over the direct path (concurrency
1; unary, and the first chunk of a stream) and as throughput at concurrency
32, both measured in the same run, with the idle RSS of each serving process.

Usage: python -m bench.peer [--calls N]
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

from bench.processes import ROOT, Service, free_port, pinned, python
from bench.run import (
    CHUNKS,
    LOAD_CORE,
    SDK_MODELS,
    SERVER_CORE,
    Bench,
    _request,
    machine,
    sdk_providers,
    sdk_url,
)

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
    lines = ["model_list:"]
    for provider, model in SDK_MODELS:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="calls per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    litellm = ensure_litellm()
    bench = Bench(quick=False)
    info = machine()
    started = time.monotonic()
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    rows: list[dict[str, Any]] = []

    def measure(path: str, provider: str, method: str, c: int, call: Any) -> None:
        """Runs `call(method, c)` and records its result under `path`."""
        result = call(method, c)
        rows.append({"path": path, "provider": provider, **result})
        first = result.get("first_chunk_ms") or {}
        print(
            f"  {path:12s} {provider:9s} {method:6s} c={c:<3d} {result['calls_per_s']:7.0f}/s"
            f"  p50 {result['latency_ms']['p50']:7.2f}  p99 {result['latency_ms']['p99']:7.2f} ms"
            + (f"  first chunk p50 {first['p50']:.2f} p99 {first['p99']:.2f}" if first else "")
            + (f"  errors {result['errors']}" if result.get("errors") else ""),
            flush=True,
        )

    fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
    rss: dict[str, float] = {}
    with Service("fake-upstream", fake, core=LOAD_CORE):
        # The direct path, then LiteLLM, then the gateway: one serving process at a time.
        for provider, _ in SDK_MODELS:
            url = sdk_url(provider, upstream)

            def direct(method: str, c: int, p: str = provider, u: str = url) -> dict[str, Any]:
                return sdk_call(SERVER_CORE, p, u, method, c, args.calls)

            for method in ("unary", "stream"):
                for c in (1, 32):
                    measure("direct SDK", provider, method, c, direct)
        port = free_port()
        config = litellm_config(bench.work / "litellm.yaml", upstream)
        # Its banner goes to stdout: sent to stderr, where Service looks for "ready".
        argv = ["sh", "-c", 'exec "$0" "$@" 1>&2', str(litellm), "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        env = {
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "LITELLM_LOG": "ERROR",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start-up
        }
        with Service("litellm", argv, core=SERVER_CORE, ready="Proxy initialized", env=env) as peer:
            wait_for_port(port)
            rss["LiteLLM"] = peer.rss_mib()
            for provider, model in SDK_MODELS:
                url = sdk_url(provider, f"http://127.0.0.1:{port}")

                def proxied(
                    method: str, c: int, p: str = provider, u: str = url, mo: str = model
                ) -> dict[str, Any]:
                    return sdk_call(LOAD_CORE, p, u, method, c, args.calls, mo, MASTER_KEY)

                for method in ("unary", "stream"):
                    for c in (1, 32):
                        measure("LiteLLM", provider, method, c, proxied)
        port = free_port()
        providers = sdk_providers(upstream)
        with bench.gateway(bench.gateway_config(port, providers), core=SERVER_CORE) as gateway:
            rss["llm-gateway"] = gateway.rss_mib()
            for provider, model in SDK_MODELS:
                request = bench.request_file(model, _request(model, "Hello", max_tokens=256))

                def through_us(method: str, c: int, r: Path = request) -> dict[str, Any]:
                    return bench.loadgen(f"127.0.0.1:{port}", r, method, c, calls=args.calls)

                for method in ("unary", "stream"):
                    for c in (1, 32):
                        measure("llm-gateway", provider, method, c, through_us)
    text = report(rows, rss)
    print(text)
    stem = args.out / f"{datetime.now(UTC):%Y-%m-%d}-{info['host'] or 'host'}-peer"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": info, "litellm": LITELLM, "rss_mib": rss, "rows": rows}, indent=2)
    )
    header = (
        f"# Peer comparison {datetime.now(UTC):%Y-%m-%d}\n\n{info['cores']} cores ({info['cpu']}),"
        f" Python {info['python']}; {info['pinning']}. `make bench-peer`,"
        f" {time.monotonic() - started:.0f} s; {LITELLM}, one worker.\n\n"
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
