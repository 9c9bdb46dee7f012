"""The HTTP front door under load: Anthropic's Messages API over HTTP/1.1.

`make bench` (bench/run.py, scenario `http`) and `make bench-peer`
(bench/peer.py) drive the front door (server/http_edge/) with bench/loadgen
in its HTTP mode (keep-alive connections, one per call in flight; unary
reads the whole JSON answer, stream reads the SSE to `message_stop`), in
front of the same fake upstream as the gRPC scenarios:

  direct upstream          loadgen -> fake upstream's /v1/messages
  front door pass-through  loadgen -> gateway /v1/messages -> an Anthropic
                           deployment whose id is the upstream's, so the
                           body goes up verbatim and the SSE comes back as is
  front door -> openai     the same call translated: an OpenAI deployment
                           (Chat Completions up, Anthropic SSE encoded back)
  front door -> echo       the same call translated to the offline `echo`
                           model: the edge and the core, no upstream at all

The direct and pass-through calls send the very same body. Per target:
calls/s at concurrency 32, and at concurrency 1 the latency, the time to the
response's first byte and to the first text delta, each to be compared with
direct in the same run; the gateway's CPU per call; and the gateway's idle
RSS with the front door on and with `http.enabled: false`.

`python -m bench.front_door --compare TREE [TREE ...]` compares source trees
on the pass-through paths of all three APIs (Messages, Chat Completions,
Responses): every tree's gateway runs at once and the loads alternate between
them, round after round, so that a machine shared with other work slows each
tree alike; it prints the medians and minimums of the gateway's CPU per call,
calls/s and latency, beside direct calls to the fake upstream (`direct`,
`directchat`, `directresponses`: each API's own body), and what the gateway
adds to the direct call of the same round (p50, p99, first byte), the median
over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.processes import LOAD_CORE, SERVER_CORE, Service, free_port, python

if TYPE_CHECKING:
    from bench.run import Bench

MESSAGES = "/v1/messages"
CHAT_COMPLETIONS = "/v1/chat/completions"
RESPONSES = "/v1/responses"
# What the anthropic SDK sends besides its key; the gateway forwards it as it came.
ANTHROPIC_HEADERS = ("anthropic-version: 2023-06-01",)
UPSTREAM_KEY_HEADER = "x-api-key: bench"
# An Anthropic deployment named as the upstream names its model: nothing rewritten.
PASSTHROUGH_MODEL = "bench-model"
OPENAI_MODEL = "bench-gpt"  # bench/run.py's OpenAI deployment
ECHO_MODEL = "echo"
MAX_TOKENS = 256

DIRECT = "direct upstream"
# Through the gateway: (target, model).
GATEWAY_TARGETS = (
    ("front door pass-through", PASSTHROUGH_MODEL),
    ("front door -> openai", OPENAI_MODEL),
    ("front door -> echo", ECHO_MODEL),
)
CONCURRENCIES = (1, 32)
RSS_SETTLE_S = 1.0  # after "serving on", before the idle RSS is read


def providers(sdk_providers: dict[str, Any]) -> dict[str, Any]:
    """The gateway's providers for the front door: bench/run.py's SDK providers, plus the
    pass-through model on the Anthropic one and the offline provider (`echo`)."""
    config = copy.deepcopy(sdk_providers)
    config["anthropic"]["models"].append({"id": PASSTHROUGH_MODEL})
    config["offline"] = {"type": "offline"}
    return config


def body(model: str, stream: bool, *, api: str = MESSAGES, chunks: int = 20) -> bytes:
    """A request body for `api` (Messages, Chat Completions or Responses): "Hello" for
    the upstream models; for `echo`, `chunks` words, so it streams as many text deltas
    as the fake upstream does."""
    text = " ".join(f"w{i}" for i in range(chunks)) if model == ECHO_MODEL else "Hello"
    max_tokens = 64 if model == ECHO_MODEL else MAX_TOKENS
    document: dict[str, Any]
    if api == RESPONSES:
        document = {"model": model, "input": text, "max_output_tokens": max_tokens}
    else:
        document = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
    if stream:
        document["stream"] = True
        if api == CHAT_COMPLETIONS:
            document["stream_options"] = {"include_usage": True}
    return json.dumps(document).encode()


def body_file(bench: Bench, model: str, method: str, *, api: str = MESSAGES) -> Path:
    """The body of a `method` call to `model` on `api`, written once per run."""
    path = bench.work / f"http-{api.rsplit('/', 1)[-1]}-{model}-{method}.json"
    if not path.exists():
        path.write_bytes(body(model, method == "stream", api=api))
    return path


def calls(bench: Bench, concurrency: int) -> int:
    # Streams too: at concurrency 1 a p99 wants a thousand samples.
    count = 1000 if concurrency == 1 else 3000
    return count // 3 if bench.quick else count


def settled_rss(service: Service) -> float:
    time.sleep(RSS_SETTLE_S)
    return service.rss_mib()


def measure(bench: Bench, sdk_providers: Callable[[str], dict[str, Any]], chunks: int) -> None:
    """The `http` scenario: every target, unary and stream, at each concurrency; then
    the idle RSS with the front door off. Loads alternate between targets, so each
    comparison with direct is made minutes apart at most."""
    upstream_port, port, http_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    config = providers(sdk_providers(upstream))
    fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(chunks)]
    on = bench.gateway_config(port, config, http_port=http_port)
    with (
        Service("fake-upstream", fake, core=LOAD_CORE),
        bench.gateway(on, core=SERVER_CORE) as gateway,
    ):
        bench.record_idle("gateway, front door on", settled_rss(gateway))
        gateway_url = f"http://127.0.0.1:{http_port}{MESSAGES}"
        for method in ("unary", "stream"):
            for c in CONCURRENCIES:
                direct = bench.http_load(
                    upstream + MESSAGES,
                    body_file(bench, PASSTHROUGH_MODEL, method),
                    method, c, calls=calls(bench, c),
                    headers=(*ANTHROPIC_HEADERS, UPSTREAM_KEY_HEADER),
                )  # fmt: skip
                bench.record("http", DIRECT, direct)
                for target, model in GATEWAY_TARGETS:
                    cpu = gateway.cpu_seconds()
                    result = bench.http_load(
                        gateway_url, body_file(bench, model, method), method, c,
                        calls=calls(bench, c), headers=ANTHROPIC_HEADERS,
                    )  # fmt: skip
                    cpu = gateway.cpu_seconds() - cpu
                    bench.record("http", target, result, **cpu_per_call(result, cpu))
    off = bench.gateway_config(free_port(), config, http_enabled=False)
    with bench.gateway(off, core=SERVER_CORE) as gateway:
        bench.record_idle("gateway, front door off", settled_rss(gateway))


def cpu_per_call(result: dict[str, Any], server_cpu_s: float) -> dict[str, Any]:
    """The serving process's CPU over a load, including the warm-up calls (50, a few
    percent of a load): calls per serving CPU-second, as the workers scenario reports."""
    served = result["calls"] + 50
    return {
        "server_cpu_s": round(server_cpu_s, 3),
        "calls_per_server_cpu_s": round(served / max(server_cpu_s, 1e-9)),
    }


# --compare: (name, API path, model) of each load; "direct" calls the fake upstream
# (Messages; "directchat", "directresponses": the other two APIs' bodies).
COMPARED_APIS = {
    "direct": (MESSAGES, PASSTHROUGH_MODEL),
    "directchat": (CHAT_COMPLETIONS, OPENAI_MODEL),
    "directresponses": (RESPONSES, OPENAI_MODEL),
    "messages": (MESSAGES, PASSTHROUGH_MODEL),
    "chat": (CHAT_COMPLETIONS, OPENAI_MODEL),
    "responses": (RESPONSES, OPENAI_MODEL),
}
DEFAULT_LOADS = (
    "direct-unary-1,direct-stream-1,directchat-unary-1,directresponses-unary-1,"
    "messages-unary-1,messages-stream-1,chat-unary-1,responses-unary-1,messages-unary-32,"
    "messages-stream-32,chat-unary-32,chat-stream-32,responses-unary-32"
)


def compare(trees: list[Path], loads: list[str], rounds: int) -> str:
    """Each load (API-method-concurrency) against every tree's gateway in turn, `rounds`
    times; a table of medians and minimums over the rounds."""
    from bench.run import CHUNKS, Bench, sdk_providers

    bench = Bench(quick=False)
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    config = providers(sdk_providers(upstream))
    fake = [python(), "-m", "bench.fake_upstream", str(upstream_port), str(CHUNKS)]
    runs: dict[tuple[str, str], list[tuple[dict[str, Any], float]]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(Service("fake-upstream", fake, core=LOAD_CORE))
        gateways: list[tuple[str, Service, int]] = []
        for tree in trees:
            root = tree.resolve()
            http_port = free_port()
            path = bench.gateway_config(free_port(), config, http_port=http_port)
            argv = [python(), "-m", "server", "--config", str(path)]
            env = {"PYTHONPATH": str(root)}  # the tree's own code first on the path
            service = Service("gateway", argv, core=SERVER_CORE, env=env, cwd=root)
            gateways.append((str(tree), stack.enter_context(service), http_port))
        for round_number in range(rounds):
            order = gateways if round_number % 2 == 0 else gateways[::-1]
            for load in loads:
                name, method, concurrency = load.split("-")
                api, model = COMPARED_APIS[name]
                body = body_file(bench, model, method, api=api)
                count = 600 if concurrency == "1" else 2000
                if name.startswith("direct"):
                    result = bench.http_load(
                        upstream + api, body, method, int(concurrency), calls=count,
                        headers=(*ANTHROPIC_HEADERS, UPSTREAM_KEY_HEADER),
                    )  # fmt: skip
                    runs.setdefault((name, load), []).append((result, 0.0))
                    continue
                for label, gateway, http_port in order:
                    cpu = gateway.cpu_seconds()
                    result = bench.http_load(
                        f"http://127.0.0.1:{http_port}{api}", body, method, int(concurrency),
                        calls=count, headers=ANTHROPIC_HEADERS,
                    )  # fmt: skip
                    cpu = gateway.cpu_seconds() - cpu
                    per_call = 1e6 * cpu / (result["calls"] + 50)  # with the warm-up calls
                    runs.setdefault((label, load), []).append((result, per_call))
            print(f"round {round_number + 1} of {rounds}", file=sys.stderr, flush=True)
    return compared_table(runs, [str(t) for t in trees], loads)


DIRECT_LOADS = [name for name in COMPARED_APIS if name.startswith("direct")]


# The direct load each API's gateway loads are compared with.
DIRECT_OF = {"messages": "direct", "chat": "directchat", "responses": "directresponses"}


def compared_table(
    runs: dict[tuple[str, str], list[tuple[dict[str, Any], float]]],
    trees: list[str],
    loads: list[str],
) -> str:
    """The medians and minimums over the rounds; and, when the API's direct load ran
    too, what the gateway added to it in the same round (p50, p99, first byte p50),
    the median over the rounds."""
    lines = [
        "| load | tree | calls/s | µs CPU per call, median / min | p50 ms, median / min"
        " | p99 ms | first byte p50 ms, median / min | added p50 / p99 / first byte ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    median = statistics.median
    for load in loads:
        name, _, rest = load.partition("-")
        direct = runs.get((DIRECT_OF.get(name, ""), f"{DIRECT_OF.get(name, '')}-{rest}"), [])
        for tree in [*DIRECT_LOADS, *trees]:
            done = runs.get((tree, load))
            if not done:
                continue
            cpu = [c for _, c in done]
            p50 = [r["latency_ms"]["p50"] for r, _ in done]
            byte = [_first_byte(r) for r, _ in done]
            added = "-"
            if direct and tree not in DIRECT_LOADS:
                pairs = list(zip(done, direct, strict=False))
                added = " / ".join(
                    f"{median(measure(r) - measure(d) for (r, _), (d, _) in pairs):+.3f}"
                    for measure in (_p50, _p99, _first_byte)
                )
            lines.append(
                f"| {load} | {tree} | {median(r['calls_per_s'] for r, _ in done):.0f}"
                f" | {median(cpu):.0f} / {min(cpu):.0f} | {median(p50):.3f} / {min(p50):.3f}"
                f" | {median(r['latency_ms']['p99'] for r, _ in done):.3f}"
                f" | {median(byte):.3f} / {min(byte):.3f} | {added} |"
            )
    return "\n".join(lines)


def _p50(result: dict[str, Any]) -> float:
    return float(result["latency_ms"]["p50"])


def _p99(result: dict[str, Any]) -> float:
    return float(result["latency_ms"]["p99"])


def _first_byte(result: dict[str, Any]) -> float:
    return float((result.get("first_byte_ms") or {}).get("p50", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare source trees on the front door.")
    parser.add_argument("--compare", nargs="+", type=Path, required=True, metavar="TREE")
    parser.add_argument("--loads", default=DEFAULT_LOADS, help="API-method-concurrency, ...")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(compare(args.compare, args.loads.split(","), args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
