"""`make bench`: what the gateway costs on the hot path, measured on this machine.

Scenarios (each reported as p50 / p90 / p99 latency and throughput):
  1. ceiling    a bare grpc.aio server with canned answers (bench/ceiling_server.py)
  2. offline    the gateway serving the offline provider
  3. providers  gateway -> Anthropic/OpenAI SDK -> fake upstream, versus the same
                SDK -> fake upstream directly (bench/direct_sdk.py: typed methods
                and `client.post`, each on the SDK's httpx and aiohttp transports)
  4. held       many streams held open, a chunk every 50 ms: RSS, CPU, added delay
  5. workers    scenario 2 with 1 and 2 server processes (SO_REUSEPORT)
  6. http       the HTTP front door (Anthropic's Messages API): pass-through and
                translated, versus the fake upstream called directly, and the
                idle RSS with the front door on and off (bench/front_door.py)

Load comes from bench/loadgen (Go, compiled; gRPC, or HTTP/1.1 for the front
door), pinned to the core the server under test does not use. Every run is
bounded in calls and in time.
Results go to bench/results/<date>-<host>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from bench import front_door
from bench.processes import (
    CORES,
    LOAD_CORE,
    ROOT,
    SERVER_CORE,
    Service,
    free_port,
    pinned,
    python,
)
from bench.report import headline, write_reports
from llmgateway.v1 import generation_pb2 as pb

LOADGEN = ROOT / "bench" / ".bin" / "loadgen"
CHUNKS = 20
# The SDK providers measured: (provider, the gateway's model id); upstream, "bench-model".
SDK_MODELS = (("anthropic", "bench-claude"), ("openai", "bench-gpt"))


def direct_target(provider: str, *, post: bool = False, aiohttp: bool = False) -> str:
    """The direct path's row name: "direct anthropic SDK", "... SDK post aiohttp"."""
    return f"direct {provider} SDK" + (" post" if post else "") + (" aiohttp" if aiohttp else "")


def sdk_url(provider: str, base: str) -> str:
    """Where `provider`'s SDK is pointed for a server at `base` (OpenAI's paths start at /v1)."""
    return f"{base}/v1" if provider == "openai" else base


def sdk_providers(base: str) -> dict[str, Any]:
    """The gateway's providers section for the SDK providers, upstream at `base`."""
    return {
        provider: {
            "type": provider,
            "api_key": "bench",
            "base_url": sdk_url(provider, base),
            "models": [{"id": model, "upstream_id": "bench-model"}],
            # The fake upstream speaks the Responses API too: /v1/responses is relayed.
            **({"responses_api": True} if provider == "openai" else {}),
        }
        for provider, model in SDK_MODELS
    }


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.work = Path(tempfile.mkdtemp(prefix="bench-"))
        # Requests, configs and ledgers of this run only: gone when it ends.
        weakref.finalize(self, shutil.rmtree, self.work, ignore_errors=True)
        self.rows: list[dict[str, Any]] = []

    def calls(self, method: str, concurrency: int) -> int:
        base = 1000 if method == "unary" else 400
        if concurrency > 1:
            base *= 3
        return base // 3 if self.quick else base

    def request_file(self, name: str, request: pb.GenerateRequest) -> Path:
        path = self.work / f"{name}.bin"
        path.write_bytes(request.SerializeToString())
        return path

    def loadgen(
        self,
        address: str,
        request: Path,
        method: str,
        concurrency: int,
        *,
        calls: int | None = None,
        seconds: float = 12,
        conns: int | None = None,
        interval_ms: int = 0,
        ramp_s: float = 0,
        core: int | None = LOAD_CORE,
        warmup: int = 50,
        timeout_s: float = 30,
    ) -> dict[str, Any]:
        argv = [
            "-addr", address,
            "-request", str(request),
            "-method", method,
            "-c", str(concurrency),
            "-n", str(calls if calls is not None else self.calls(method, concurrency)),
            "-d", f"{seconds}s",
            "-conns", str(conns or (1 if concurrency == 1 else 8)),
            "-warmup", str(warmup),
            "-timeout", f"{timeout_s}s",
        ]  # fmt: skip
        if interval_ms:
            argv += ["-interval", f"{interval_ms}ms"]
        if ramp_s:
            argv += ["-ramp", f"{ramp_s}s"]
        return _run_loadgen(argv, core)

    def http_load(
        self,
        url: str,
        body: Path,
        method: str,
        concurrency: int,
        *,
        calls: int,
        headers: tuple[str, ...] = (),
        seconds: float = 20,
        core: int | None = LOAD_CORE,
    ) -> dict[str, Any]:
        """bench/loadgen in its HTTP mode: POSTs `body` to `url` (`stream`: reads the SSE)."""
        argv = [
            "-protocol", "http",
            "-url", url,
            "-request", str(body),
            "-method", method,
            "-c", str(concurrency),
            "-n", str(calls),
            "-d", f"{seconds}s",
        ]  # fmt: skip
        for header in headers:
            argv += ["-header", header]
        return _run_loadgen(argv, core)

    def direct(
        self,
        provider: str,
        url: str,
        method: str,
        concurrency: int,
        *,
        post: bool = False,
        aiohttp: bool = False,
    ) -> dict[str, Any]:
        calls = max(200, self.calls(method, concurrency) // 3)
        argv = [*pinned(SERVER_CORE), python(), "-m", "bench.direct_sdk"]
        argv += ["--post"] if post else []
        argv += ["--aiohttp"] if aiohttp else []
        argv += [provider, url, method, str(concurrency), str(calls)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT)
        return dict(json.loads(out.stdout))

    def record(self, scenario: str, target: str, result: dict[str, Any], **extra: Any) -> None:
        row = {"scenario": scenario, "target": target, **extra, **result}
        self.rows.append(row)
        first = result.get("first_chunk_ms") or {}
        byte = result.get("first_byte_ms") if first else None
        print(
            f"  {scenario:9s} {target:24s} {result['method']:6s} c={result['concurrency']:<4d}"
            f" {result['calls_per_s']:8.0f}/s  p50 {result['latency_ms']['p50']:7.2f}"
            f"  p99 {result['latency_ms']['p99']:7.2f} ms"
            + (f"  first byte p50 {byte['p50']:.2f} p99 {byte['p99']:.2f}" if byte else "")
            + (f"  first chunk p50 {first['p50']:.2f} p99 {first['p99']:.2f}" if first else "")
            + (f"  errors {result['errors']}" if result.get("errors") else ""),
            flush=True,
        )

    def record_idle(self, target: str, rss_mib: float) -> None:
        """A process's resident memory at rest, a row of its own (scenario `idle`)."""
        self.rows.append({"scenario": "idle", "target": target, "idle_rss_mib": round(rss_mib, 1)})
        print(f"  idle      {target:24s} RSS {rss_mib:.1f} MiB", flush=True)

    # -- configuration -------------------------------------------------------

    def gateway_config(
        self,
        port: int,
        providers: dict[str, Any],
        workers: int = 1,
        *,
        http_port: int | None = None,
        http_enabled: bool = True,
    ) -> Path:
        """A configuration file; the front door is on (as it ships) on `http_port`, by
        default a free one (the default 8080 may be taken)."""
        config = {
            "server": {"host": "127.0.0.1", "port": port, "workers": workers},
            "http": {"enabled": http_enabled, "port": http_port or free_port()},
            "logging": {"level": "INFO"},
            # Loopback development mode: the benchmark measures the serving path.
            "auth": {"enabled": False},
            # The ledger stays on, in a file of this run's own: not the user's
            # ledger, and not one that grows from run to run.
            "ledger": {"path": str(self.work / f"usage-{port}.sqlite3")},
            "providers": providers,
        }
        path = self.work / f"gateway-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def gateway(self, config: Path, *, core: int | None, workers: int = 1) -> Service:
        argv = [python(), "-m", "server", "--config", str(config)]
        return Service("gateway", argv, core=core, count=workers)

    # -- scenarios -----------------------------------------------------------

    def sweep(self, scenario: str, target: str, address: str, request: Path) -> None:
        for method in ("unary", "stream"):
            for concurrency in (1, 32, 128):
                self.record(scenario, target, self.loadgen(address, request, method, concurrency))

    def ceiling_and_offline(self, echo: Path) -> None:
        port = free_port()
        argv = [python(), "-m", "bench.ceiling_server", str(port), str(CHUNKS)]
        with Service("ceiling", argv, core=SERVER_CORE):
            self.sweep("ceiling", "bare grpc.aio", f"127.0.0.1:{port}", echo)
        port = free_port()
        config = self.gateway_config(port, {"offline": {"type": "offline"}})
        with self.gateway(config, core=SERVER_CORE):
            self.sweep("offline", "gateway offline", f"127.0.0.1:{port}", echo)

    def providers(self) -> None:
        upstream_port, port = free_port(), free_port()
        base = f"http://127.0.0.1:{upstream_port}"
        providers = sdk_providers(base)
        fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
        with (
            Service("fake-upstream", fake, core=LOAD_CORE),
            self.gateway(self.gateway_config(port, providers), core=SERVER_CORE),
        ):
            for provider, model in SDK_MODELS:
                url = sdk_url(provider, base)
                request = self.request_file(model, _request(model, "Hello", max_tokens=256))
                for method in ("unary", "stream"):
                    for concurrency in (1, 32, 128):
                        result = self.loadgen(f"127.0.0.1:{port}", request, method, concurrency)
                        self.record(
                            "providers", f"gateway -> {provider}", result, provider=provider
                        )
                        # The SDK as a service would call it (its typed methods), and
                        # as the gateway's providers do (`client.post`: the gateway's
                        # own cost alone), each on the SDK's default transport (httpx)
                        # and on its aiohttp one (the gateway's default).
                        for post, aiohttp in itertools.product((False, True), repeat=2):
                            result = self.direct(
                                provider, url, method, concurrency, post=post, aiohttp=aiohttp
                            )
                            target = direct_target(provider, post=post, aiohttp=aiohttp)
                            self.record("providers", target, result, provider=provider)

    def held_streams(self, streams: int, seconds: int, *, target: str, workers: int = 1) -> None:
        """`streams` streams open at once, a chunk every 50 ms each, for `seconds`.

        The streams start over streams/200 seconds (200 new streams a second),
        not at one instant: grpc.aio accepts one call per event-loop turn, so
        a thousand calls arriving together measure its accept queue, not the
        holding. Targets: the gateway (offline provider, its fixed timeline),
        or the ceiling server on the same timeline: grpc.aio alone. With 2
        workers nothing is pinned.
        """
        port = free_port()
        chunks = seconds * 20  # one every 50 ms
        request = _request("echo", " ".join(f"w{i}" for i in range(chunks)), max_tokens=chunks)
        request.provider_options.update({"chunk_delay_ms": 50})
        path = self.request_file("held", request)
        core = SERVER_CORE if workers == 1 else None
        if target == "ceiling":
            argv = [python(), "-m", "bench.ceiling_server", str(port), str(chunks), "50"]
            service = Service("ceiling", argv, core=core)
            name = f"bare grpc.aio, {streams} streams"
        else:
            config = self.gateway_config(port, {"offline": {"type": "offline"}}, workers=workers)
            service = self.gateway(config, core=core, workers=workers)
            name = f"gateway, {streams} streams" + (f", {workers} workers" if workers > 1 else "")
        with service as server:
            idle_rss = server.rss_mib()
            samples: list[float] = []
            done = threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    samples.append(server.rss_mib())

            sampler = threading.Thread(target=sample, daemon=True)
            cpu_before, started = server.cpu_seconds(), time.monotonic()
            sampler.start()
            result = self.loadgen(
                f"127.0.0.1:{port}", path, "stream", streams, calls=streams,
                seconds=seconds + 30, conns=max(1, streams // 50), interval_ms=50,
                warmup=0, timeout_s=seconds * 3 + 60, ramp_s=streams / 200,
                core=LOAD_CORE if workers == 1 else None,
            )  # fmt: skip
            done.set()
            sampler.join()
            cpu = (server.cpu_seconds() - cpu_before) / (time.monotonic() - started)
        extra = {
            "streams": streams,
            "seconds": seconds,
            "workers": workers,
            "idle_rss_mib": round(idle_rss, 1),
            "peak_rss_mib": round(max(samples, default=idle_rss), 1),
            "cpu_percent_of_one_core": round(100 * cpu, 1),
        }
        self.record("held", name, result, **extra)
        delay, start = result["chunk_added_delay_ms"], result["first_chunk_ms"]
        print(
            f"            RSS idle {extra['idle_rss_mib']} MiB, peak {extra['peak_rss_mib']} MiB;"
            f" CPU {extra['cpu_percent_of_one_core']}% of a core;"
            f" added delay per chunk p50 {delay['p50']:.2f} p99 {delay['p99']:.2f} ms;"
            f" first chunk p50 {start['p50']:.0f} p99 {start['p99']:.0f} ms",
            flush=True,
        )

    def workers(self, echo: Path) -> None:
        """1 and 2 serving processes, nothing pinned; CPU accounted per process.

        On a 2-core machine the load generator needs part of a core too, so the
        throughput ratio alone understates what a second worker adds; the row
        also says how the calls spread (each worker's CPU) and the calls per
        CPU-second of the serving processes, which a second core should keep.
        """
        for workers in (1, 2):
            port = free_port()
            config = self.gateway_config(port, {"offline": {"type": "offline"}}, workers=workers)
            with self.gateway(config, core=None, workers=workers) as gateway:
                for method in ("unary", "stream"):
                    before = gateway.cpu_by_process()
                    load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    # 64 connections: SO_REUSEPORT spreads connections, not calls.
                    result = self.loadgen(
                        f"127.0.0.1:{port}", echo, method, 128, conns=64, core=None
                    )
                    load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    after = gateway.cpu_by_process()
                    served = {
                        pid: after[pid] - before.get(pid, 0.0)
                        for pid in after
                        if after[pid] - before.get(pid, 0.0) > 0.05
                    }
                    load_cpu = sum(
                        getattr(load_after, f) - getattr(load_before, f)
                        for f in ("ru_utime", "ru_stime")
                    )
                    elapsed = result["elapsed_s"]
                    extra = {
                        "workers": workers,
                        "server_cpu_s": round(sum(served.values()), 2),
                        "worker_cpu_percent": sorted(
                            (round(100 * v / elapsed) for v in served.values()), reverse=True
                        ),
                        "loadgen_cpu_percent": round(100 * load_cpu / elapsed),
                        "calls_per_server_cpu_s": round(
                            result["calls"] / max(sum(served.values()), 1e-9)
                        ),
                    }
                    self.record("workers", f"{workers} worker(s)", result, **extra)
                    print(
                        f"            CPU: workers {extra['worker_cpu_percent']}% of a core,"
                        f" load generator {extra['loadgen_cpu_percent']}%;"
                        f" {extra['calls_per_server_cpu_s']} calls per server CPU-second",
                        flush=True,
                    )


def _run_loadgen(argv: list[str], core: int | None) -> dict[str, Any]:
    env = {**os.environ, "GOMAXPROCS": "1" if core is not None else str(CORES)}
    out = subprocess.run(
        [*pinned(core), str(LOADGEN), *argv], capture_output=True, text=True, env=env, check=True
    )
    return dict(json.loads(out.stdout))


def medians(repetitions: list[dict[str, Any]]) -> dict[str, float]:
    """The median of every number the repetitions have in common (flattened keys)."""
    if len(repetitions) < 2:
        return {}
    flat = [_flatten(r) for r in repetitions]
    return {
        key: statistics.median(f[key] for f in flat)
        for key in flat[0]
        if all(key in f for f in flat)
    }


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
    return out


def _request(model: str, text: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        max_tokens=max_tokens,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])],
    )


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "source": source(),
        "host": platform.node(),
        "cores": CORES,
        "cpu": model,
        "python": platform.python_version(),
        # Others' work on this shared machine, at the start: what the numbers compete with.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "pinning": "server under test on core 0; loadgen and fake upstream on core 1"
        if pinned(0)
        else "none (fewer than 2 cores or no taskset)",
    }


def source() -> str:
    """The commit measured, and whether the gateway's code differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "interceptors"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes in server/" if changed else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, short holds")
    # What one core sustains, and the 1,000 (beyond one grpc.aio core).
    parser.add_argument("--held-streams", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--held-seconds", type=int, default=60)
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run the ceiling/offline, providers and http scenarios N times; report the medians",
    )  # fmt: skip
    scenarios = ["ceiling", "providers", "http", "held", "workers"]
    parser.add_argument(
        "--only", nargs="*", default=scenarios, choices=scenarios,
        help="scenarios: ceiling (with offline), providers, http, held, workers",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not LOADGEN.exists():
        print("bench/.bin/loadgen is missing: run `make bench`", file=sys.stderr)
        return 2

    bench = Bench(args.quick)
    info = machine()
    print(f"llm-gateway benchmark on {info['cores']} cores ({info['cpu']}); {info['pinning']}")
    started = time.monotonic()
    echo = bench.request_file(
        "echo", _request("echo", " ".join(f"w{i}" for i in range(CHUNKS)), 64)
    )
    # The scenarios whose ratios compare separate loads (offline against the
    # ceiling, the gateway against the direct SDK or upstream) run --repeat times, and
    # the medians of those ratios are reported: single runs on a shared
    # machine move as much as the differences.
    repeated = [s for s in ("ceiling", "providers", "http") if s in args.only]
    repetitions: list[dict[str, Any]] = []
    for repetition in range(args.repeat if repeated else 0):
        if args.repeat > 1:
            print(f"{' and '.join(repeated)}, repetition {repetition + 1} of {args.repeat}")
        first = len(bench.rows)
        if "ceiling" in repeated:
            bench.ceiling_and_offline(echo)
        if "providers" in repeated:
            bench.providers()
        if "http" in repeated:
            front_door.measure(bench, sdk_providers, CHUNKS)
        repetitions.append(headline(bench.rows[first:])[1])
        if repetition < args.repeat - 1:
            del bench.rows[first:]  # the table shows the last repetition
    if "held" in args.only:
        for streams in [200] if args.quick else args.held_streams:
            seconds = 10 if args.quick else args.held_seconds
            # The sizes below 1,000 only show what one core sustains: half the time.
            seconds = seconds if streams >= 1000 else max(10, seconds // 2)
            bench.held_streams(streams, seconds, target="gateway")
            if streams >= 1000:
                # Beyond one core: the same load on grpc.aio alone, and on 2 workers.
                bench.held_streams(streams, seconds // 2, target="ceiling")
                bench.held_streams(streams, seconds // 2, target="gateway", workers=2)
    if "workers" in args.only:
        bench.workers(echo)

    stamp = datetime.now(UTC)
    results = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": info,
        "quick": args.quick,
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "duration_s": round(time.monotonic() - started, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "rows": bench.rows,
        "repeated": repeated,
        "repetitions": repetitions,
        "medians": medians(repetitions),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # A run of some scenarios only does not overwrite the day's full run.
    only = "" if set(args.only) == set(scenarios) else "-" + "-".join(args.only)
    quick = "-quick" if args.quick else ""
    stem = args.out / f"{stamp:%Y-%m-%d}-{info['host'] or 'host'}{only}{quick}"
    table = write_reports(results, stem)
    print()
    print(table)
    png = f" and {stem}.png" if stem.with_suffix(".png").exists() else ""
    print(f"wrote {stem}.json, {stem}.md{png} in {results['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
