"""Compare source trees of the gateway in one run: `python -m bench.ab TREE [TREE ...]`.

For a change too small to see across two `make bench` runs on a shared
machine: each round starts the gateway from every tree in turn (same
config, same pinning as bench/run.py: server on core 0, load and fake
upstream on core 1) and runs the same short loads against it; the
medians over the rounds are printed side by side. A tree is any checkout,
e.g. `git worktree add /tmp/before HEAD~1`; every tree runs with this
checkout's virtual environment and load generator.

Loads: the offline provider (Generate and StreamGenerate at concurrency 1
and 32); with --providers, the Anthropic and OpenAI SDKs against the fake
upstream at concurrency 1; with --http, the HTTP front door's pass-through
and `echo` (bench/front_door.py), unary and stream, at concurrency 1 and 32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import front_door
from bench.processes import LOAD_CORE, SERVER_CORE, Service, free_port, python
from bench.run import CHUNKS, SDK_MODELS, Bench, _request, sdk_providers

Key = tuple[str, str, str, int]
# The front door's loads: (name, model).
HTTP_LOADS = (("http pass-through", front_door.PASSTHROUGH_MODEL), ("http echo", "echo"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--providers", action="store_true", help="also the SDK paths (c=1)")
    parser.add_argument("--http", action="store_true", help="also the HTTP front door")
    args = parser.parse_args()
    bench = Bench(quick=True)
    echo = bench.request_file(
        "echo", _request("echo", " ".join(f"w{i}" for i in range(CHUNKS)), 64)
    )
    loads: list[tuple[str, Path, str, int]] = [
        ("offline", echo, method, c) for method in ("unary", "stream") for c in (1, 32)
    ]
    if args.providers:
        for _, model in SDK_MODELS:
            path = bench.request_file(model, _request(model, "Hello", max_tokens=256))
            loads += [(model, path, method, 1) for method in ("unary", "stream")]
    http_loads = [
        (name, model, method, c)
        for name, model in (HTTP_LOADS if args.http else ())
        for method in ("unary", "stream")
        for c in (1, 32)
    ]
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    providers: dict[str, Any] = front_door.providers(sdk_providers(upstream))
    results: dict[Key, list[dict[str, Any]]] = {}
    fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
    with Service("fake-upstream", fake, core=LOAD_CORE):
        for round_number in range(args.rounds):
            for tree in args.trees:
                print(f"round {round_number + 1} of {args.rounds}: {tree}", flush=True)
                port, http_port = free_port(), free_port()
                config = bench.gateway_config(port, providers, http_port=http_port)
                argv = [python(), "-m", "server", "--config", str(config)]
                # The tree's own code: run from its folder, so it comes first on the path.
                tree_root = tree.resolve()
                env = {"PYTHONPATH": str(tree_root)}
                with Service("gateway", argv, core=SERVER_CORE, env=env, cwd=tree_root):
                    for name, request, method, c in loads:
                        calls = 1500 if method == "unary" else 500
                        result = bench.loadgen(
                            f"127.0.0.1:{port}", request, method, c, calls=calls, seconds=15
                        )
                        results.setdefault((str(tree), name, method, c), []).append(result)
                    for name, model, method, c in http_loads:
                        result = bench.http_load(
                            f"http://127.0.0.1:{http_port}{front_door.MESSAGES}",
                            front_door.body_file(bench, model, method), method, c,
                            calls=1500 if c == 1 else 3000, headers=front_door.ANTHROPIC_HEADERS,
                        )  # fmt: skip
                        results.setdefault((str(tree), name, method, c), []).append(result)
    print(table(results, [str(t) for t in args.trees]))
    return 0


def table(results: dict[Key, list[dict[str, Any]]], trees: list[str]) -> str:
    """Medians per load and tree: calls/s, p50 and p99 latency, first chunk p50."""
    lines = [
        "| load | tree | calls/s | p50 ms | p99 ms | first chunk p50 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    loads = sorted({key[1:] for key in results})
    for name, method, c in loads:
        for tree in trees:
            runs = results.get((tree, name, method, c), [])
            if not runs:
                continue

            def median(pick: Any, runs: list[dict[str, Any]] = runs) -> float:
                return statistics.median(pick(r) for r in runs)

            first = median(lambda r: (r.get("first_chunk_ms") or {}).get("p50", 0.0))
            lines.append(
                f"| {name} {method} c={c} | {tree} | {median(lambda r: r['calls_per_s']):.0f}"
                f" | {median(lambda r: r['latency_ms']['p50']):.3f}"
                f" | {median(lambda r: r['latency_ms']['p99']):.3f}"
                f" | {first:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
