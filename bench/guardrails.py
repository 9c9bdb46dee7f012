"""What the PII guardrail adds to a call (issue 22's targets), measured in process.

The GuardedRouter (default entity set, `mask`, scope both, the default thread
pool and time limit) wraps a router that answers at once with a short text,
so what is timed is the guardrail's own work per request: the input stage
(hashing every block, analysing the new ones in the pool, rewriting the
request) and the output stage on the short answer. Each number is the p50
of the guarded call minus the p50 of the same call on the bare router.

    .venv/bin/python -m bench.guardrails              # both scenarios, 200 rounds each
    .venv/bin/python -m bench.guardrails --rounds 50

- new1k: a request whose 1,000 characters are all new (never analysed before);
  target: at most 5 ms added at p50.
- transcript200k: a 200,000-character transcript (200 blocks) resent with one
  new 1,000-character block each time (the others answered from the block
  cache); target: at most 10 ms added at p50.
- cost per 1,000 characters: the analyzer alone (no pool, no cache) over
  1,000-character blocks of prose with a few values in them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import cast

from server.config import GuardrailsConfig
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamEvent,
    TextDelta,
)
from server.guardrails import guarded
from server.guardrails.policy import DEFAULT_ENTITIES
from server.guardrails.recognizers import presidio_analyzer
from server.routing import Route, Router
from server.schema import GenerationRequest, Message, Role, StopReason, TextBlock

TARGET_NEW_MS = 5.0
TARGET_TRANSCRIPT_MS = 10.0
PROSE = (
    "the deployment schedule moves to thursday after the review of the quarterly numbers"
    " and the migration of the billing service which the team agreed to finish before"
    " the holidays while the support queue keeps growing with tickets about invoices"
)
WORDS = PROSE.split()


class AnsweringRouter:
    """Answers every call at once with a short text."""

    async def stream(self, request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        for event in (
            MessageStart("msg", "m", "p"),
            ContentBlockStart(0, TextBlock("")),
            TextDelta(0, "Done, the invoice is on its way."),
            ContentBlockStop(0),
            MessageDelta(StopReason.END_TURN),
            MessageStop(),
        ):
            yield event


ROUTE = cast(Route, type("R", (), {"model": type("M", (), {"id": "m"})()})())


def block(rng: random.Random, serial: int, size: int = 1000) -> str:
    """`size` characters of prose with an e-mail address and a phone number in it."""
    words = [f"ticket {serial}:", f"user{serial}@example.com", "called from +1 415 555 0132"]
    while sum(len(w) + 1 for w in words) < size:
        words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS))
    return " ".join(words)[:size]


def request(blocks: list[str]) -> GenerationRequest:
    messages = [
        Message(Role.USER if i % 2 == 0 else Role.ASSISTANT, [TextBlock(text)])
        for i, text in enumerate(blocks)
    ]
    return GenerationRequest("m", messages, 1024, "bench")


async def timed(router: Router, made: GenerationRequest) -> float:
    started = time.perf_counter()
    async for _ in router.stream(made, ROUTE):
        pass
    return time.perf_counter() - started


async def scenario(
    bare: Router, guard: Router, rounds: int, old: list[str], rng: random.Random, serial: int
) -> tuple[float, float, int]:
    """p50 ms of the guarded and the bare call, each with one new 1,000-character block."""
    guarded_s, bare_s = [], []
    for _ in range(rounds):
        serial += 1
        blocks = [*old, block(rng, serial)]
        guarded_s.append(await timed(guard, request(blocks)))
        bare_s.append(await timed(bare, request(blocks)))
    return statistics.median(guarded_s) * 1000, statistics.median(bare_s) * 1000, serial


async def main(rounds: int) -> int:
    config = GuardrailsConfig.model_validate({"pii": {"action": "mask"}})
    started = time.perf_counter()
    analyze = presidio_analyzer(config, DEFAULT_ENTITIES)
    build_s = time.perf_counter() - started
    bare = cast(Router, AnsweringRouter())
    guard = guarded(bare, config, analyze)
    rng = random.Random(22)
    serial = 0
    # Warm-up: imports, the pool's threads, regex compilation.
    _, _, serial = await scenario(bare, guard, 10, [], rng, serial)

    new_g, new_b, serial = await scenario(bare, guard, rounds, [], rng, serial)
    transcript = [block(rng, 100_000 + i) for i in range(199)]
    await timed(guard, request(transcript))  # its first sending analyses every block
    long_g, long_b, serial = await scenario(bare, guard, rounds, transcript, rng, serial)

    samples = [block(rng, 200_000 + i) for i in range(200)]
    entities = frozenset(DEFAULT_ENTITIES)
    costs = []
    for text in samples:
        begun = time.perf_counter()
        analyze(text, entities, 0.5)
        costs.append(time.perf_counter() - begun)
    per_1k = statistics.median(costs) * 1000

    new_added, long_added = new_g - new_b, long_g - long_b
    print(f"guardrails benchmark: mask, scope both, default entities, {rounds} rounds each")
    print(f"  analyzer start-up (spaCy blank pipeline + recognizers): {build_s * 1000:.0f} ms")
    print(
        f"  new1k          p50 {new_g:7.3f} ms guarded, {new_b:6.3f} ms bare:"
        f" added {new_added:6.3f} ms (target <= {TARGET_NEW_MS:g} ms)"
    )
    print(
        f"  transcript200k p50 {long_g:7.3f} ms guarded, {long_b:6.3f} ms bare:"
        f" added {long_added:6.3f} ms (target <= {TARGET_TRANSCRIPT_MS:g} ms)"
    )
    print(f"  cost per 1,000 characters (analyzer alone, p50): {per_1k:.3f} ms")
    missed = new_added > TARGET_NEW_MS or long_added > TARGET_TRANSCRIPT_MS
    print("  targets:", "MISSED" if missed else "met")
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    raise SystemExit(asyncio.run(main(parser.parse_args().rounds)))
