"""Where the gateway's time goes under one load: py-spy on the serving process.

Starts the fake upstream and the gateway as `make bench` does (gateway on
core 0; the load generator, the fake upstream and py-spy on core 1), drives
one target with bench/loadgen for `--seconds`, and samples the gateway with
py-spy (`pip install py-spy`; it needs ptrace rights over the gateway, which
a process has over its own children). Two edges:

  --edge http   the HTTP front door (Anthropic's Messages API); targets
                passthrough, openai (translated), echo (the offline model)
  --edge grpc   GenerationService over gRPC, the request `make bench` sends;
                targets anthropic, openai (the SDK providers) and offline
                (the `echo` model, the scenario compared with the ceiling)

Prints the gateway's CPU per call and the functions with the most samples,
by own time and including callees, with files shortened to their package;
writes the raw stacks (py-spy's collapsed format, for speedscope or
flamegraph.pl) next to the report.

With `--compare TREE [TREE ...]` it profiles nothing: each of `--rounds`
rounds starts the gateway from every source tree in turn under the same
load, and the medians of the gateway's CPU per call are compared (a change
worth a few percent, on a machine others share).

Usage: python -m bench.profile [--edge http|grpc] [--target T] [--method unary|stream]
                               [--concurrency C] [--seconds S] [--out DIR]
                               [--compare TREE [TREE ...] [--rounds N]]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import front_door
from bench.processes import LOAD_CORE, ROOT, SERVER_CORE, Service, free_port, pinned, python
from bench.run import CHUNKS, LOADGEN, SDK_MODELS, Bench, _request, sdk_providers, source

MODELS = {
    "passthrough": front_door.PASSTHROUGH_MODEL,
    "openai": front_door.OPENAI_MODEL,
    "echo": front_door.ECHO_MODEL,
}
# The gRPC edge's targets: the SDK providers' models, and `echo` (offline).
GRPC_MODELS = {**dict(SDK_MODELS), "offline": "echo"}
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _short(file: str) -> str:
    """A file as its package path: site-packages/…/x.py or the repository's server/x.py."""
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _frame(raw: str) -> str:
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip()
    return f"{match['function']} ({_short(match['file'])})"


def _area(frame: str) -> str:
    """What a frame belongs to: the gateway's module (server/x/y.py), or the package."""
    file = frame.rpartition(" (")[2].rstrip(")")
    if file.startswith(("server/", "interceptors/")):
        return file
    top = file.split("/", 1)[0]
    return top.removesuffix(".py") if "/" in file or top.endswith(".py") else file


def summarize(collapsed: str, top: int = 25) -> str:
    """Own and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        # The thread name py-spy puts first is not a frame.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    areas: collections.Counter[str] = collections.Counter()
    for frame, count in own.items():
        areas[_area(frame)] += count
    lines = [f"{total} samples", "", "| own % | package or gateway module |", "| ---: | --- |"]
    lines += [f"| {100 * n / total:.1f} | {a} |" for a, n in areas.most_common(top)]
    lines += ["", "| own % | function |", "| ---: | --- |"]
    lines += [f"| {100 * n / total:.1f} | {f} |" for f, n in own.most_common(top)]
    lines += ["", "| incl. % | function |", "| ---: | --- |"]
    lines += [f"| {100 * n / total:.1f} | {f} |" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


Load = Callable[..., dict[str, Any]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", choices=["http", "grpc"], default="http")
    parser.add_argument(
        "--target", choices=sorted({*MODELS, *GRPC_MODELS}), default=None,
        help="http: passthrough (default), openai, echo; grpc: anthropic (default), openai,"
        " offline",
    )  # fmt: skip
    parser.add_argument("--method", choices=["unary", "stream"], default="unary")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("/tmp"))
    parser.add_argument(
        "--compare", type=Path, nargs="+", metavar="TREE",
        help="no profile: the gateway's CPU per call from each source tree in turn",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="with --compare")
    args = parser.parse_args()
    models = GRPC_MODELS if args.edge == "grpc" else MODELS
    target = args.target or ("anthropic" if args.edge == "grpc" else "passthrough")
    if target not in models:
        parser.error(f"--target {target} is not one of the {args.edge} edge's: {sorted(models)}")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not LOADGEN.exists() or (not args.compare and not Path(spy).exists()):
        print("needs py-spy (pip install py-spy) and bench/.bin/loadgen", file=sys.stderr)
        return 2
    bench = Bench(quick=False)
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    providers = front_door.providers(sdk_providers(upstream))
    fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
    load: Callable[[int, int], Load]
    if args.edge == "grpc":
        model = models[target]
        # What `make bench` sends: `echo` answers CHUNKS words; the SDK models "Hello".
        text = " ".join(f"w{i}" for i in range(CHUNKS)) if target == "offline" else "Hello"
        request = bench.request_file(
            model, _request(model, text, max_tokens=64 if target == "offline" else 256)
        )

        def load(port: int, http_port: int) -> Load:
            def run(calls: int, seconds: float = 20) -> dict[str, Any]:
                return bench.loadgen(
                    f"127.0.0.1:{port}", request, args.method, args.concurrency,
                    calls=calls, seconds=seconds,
                )  # fmt: skip

            return run

        title = f"gRPC edge {target}"
    else:
        body = front_door.body_file(bench, models[target], args.method)

        def load(port: int, http_port: int) -> Load:
            def run(calls: int, seconds: float = 20) -> dict[str, Any]:
                return bench.http_load(
                    f"http://127.0.0.1:{http_port}{front_door.MESSAGES}", body, args.method,
                    args.concurrency, calls=calls, seconds=seconds,
                    headers=front_door.ANTHROPIC_HEADERS,
                )  # fmt: skip

            return run

        title = f"front door {target}"
    with Service("fake-upstream", fake, core=LOAD_CORE):
        if args.compare:
            print(compare(bench, providers, load, args.compare, args.rounds, args.seconds))
            return 0
        port, http_port = free_port(), free_port()
        config = bench.gateway_config(port, providers, http_port=http_port)
        args.out.mkdir(parents=True, exist_ok=True)
        edge = "" if args.edge == "http" else "grpc-"
        stem = args.out / f"profile-{edge}{target}-{args.method}-c{args.concurrency}"
        run = load(port, http_port)
        with bench.gateway(config, core=SERVER_CORE) as gateway:
            # Warm: connections open, lazy imports done, before sampling starts.
            run(calls=500)
            record = [
                *pinned(LOAD_CORE), spy, "record", "--pid", str(gateway.pids()[0]),
                "--rate", str(args.rate), "--duration", str(args.seconds),
                "--format", "raw", "--output", f"{stem}.txt", "--nonblocking", "--threads",
            ]  # fmt: skip
            sampler = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            cpu = gateway.cpu_seconds()
            result = run(calls=0, seconds=args.seconds)
            cpu = gateway.cpu_seconds() - cpu
            _, errors = sampler.communicate(timeout=args.seconds + 30)
            if sampler.returncode != 0:
                print(errors.decode(errors="replace"), file=sys.stderr)
                return 1
    header = (
        f"# Profile: {title} {args.method}, concurrency {args.concurrency}\n\n"
        f"{result['calls_per_s']:.0f} calls/s over {args.seconds} s (py-spy at {args.rate} Hz"
        f" on the load core), {result['calls'] / max(cpu, 1e-9):.0f} calls per gateway"
        f" CPU-second, {1e6 * cpu / max(result['calls'], 1):.0f} µs of gateway CPU per call,"
        + (
            f" {result['messages'] / max(result['calls'], 1):.1f} messages per stream,"
            if args.method == "stream"
            else ""
        )
        + f" {result['errors']} errors. Gateway source: {source()}."
        f" `python -m bench.profile {' '.join(sys.argv[1:])}`.\n\n"
    )
    report = header + summarize(Path(f"{stem}.txt").read_text()) + "\n"
    Path(f"{stem}.md").write_text(report)
    print(report)
    print(f"wrote {stem}.md and {stem}.txt")
    return 0


def compare(
    bench: Bench,
    providers: dict[str, Any],
    load: Callable[[int, int], Load],
    trees: list[Path],
    rounds: int,
    seconds: float,
) -> str:
    """The gateway's CPU per call and calls/s under one load, from each tree in turn.

    For a change too small to see across separate runs on a shared machine:
    each round starts the gateway from every tree (any checkout, e.g. `git
    worktree add /tmp/before HEAD~1`, run with this checkout's environment),
    warms it, then measures; the medians over the rounds are compared.
    """
    runs: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for round_number in range(rounds):
        for tree in trees:
            port, http_port = free_port(), free_port()
            config = bench.gateway_config(port, providers, http_port=http_port)
            argv = [python(), "-m", "server", "--config", str(config)]
            root = tree.resolve()  # the tree's own code first on the path
            run = load(port, http_port)
            with Service(
                "gateway", argv, core=SERVER_CORE, env={"PYTHONPATH": str(root)}, cwd=root
            ) as gateway:
                run(calls=300)
                cpu = gateway.cpu_seconds()
                result = run(calls=0, seconds=seconds)
                cpu = gateway.cpu_seconds() - cpu
            per_call = 1e6 * cpu / max(result["calls"], 1)
            runs[tree].append((per_call, result["calls_per_s"]))
            print(
                f"round {round_number + 1}/{rounds} {tree}: {per_call:.0f} µs CPU per call,"
                f" {result['calls_per_s']:.0f} calls/s, {result['errors']} errors",
                flush=True,
            )
    # Against the first tree round by round too: the machine's load drifts over
    # a run, and a round's trees run back to back.
    lines = [
        "| tree | µs CPU per call, median (each round) | vs first, median of rounds"
        " | calls/s, median |",
        "| --- | ---: | ---: | ---: |",
    ]
    for tree, values in runs.items():
        cpu = statistics.median(c for c, _ in values)
        each = ", ".join(f"{c:.0f}" for c, _ in values)
        ratio = statistics.median(
            c / f for (c, _), (f, _) in zip(values, runs[trees[0]], strict=True)
        )
        rate = statistics.median(r for _, r in values)
        lines.append(f"| {tree} | {cpu:.0f} ({each}) | {100 * (ratio - 1):+.1f}% | {rate:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
