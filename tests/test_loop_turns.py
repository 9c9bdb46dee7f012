"""Heavy work takes turns with other calls and pauses between stretches (server/loop_turns.py)."""

from __future__ import annotations

import asyncio
import itertools
import time

from server import loop_turns
from server.app import Gateway
from server.config import load_config
from server.loop_turns import COUNTED_CALL, PAUSE_S, WORK_S, count_calls_with, taking_turns
from tests import conftest

STEP_S = 0.001
# asyncio.sleep may end a clock tick early.
EARLY_S = 0.0001


def _busy(seconds: float) -> tuple[float, float]:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass
    return started, time.perf_counter()


async def test_heavy_work_pauses_after_each_stretch_and_before_its_first_step() -> None:
    """Steps of heavy work hold the loop at most WORK_S at a stretch (to the end of
    the step that passes it), then leave it waiting on its sockets for at least
    PAUSE_S: with turns alone, a thread that must hand the loop a completion
    (grpc's) waits for the GIL through whole stretches."""
    count_calls_with(None)  # calls in flight not counted: always pause
    steps: list[tuple[float, float]] = []
    entered = time.perf_counter()
    async with taking_turns(pause_first=True) as next_step:
        for _ in range(40):
            steps.append(_busy(STEP_S))
            await next_step()
    assert steps[0][0] - entered >= PAUSE_S - EARLY_S
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(steps)]
    pauses = [gap for gap in gaps if gap >= PAUSE_S - EARLY_S]
    # 40 ms of work, in stretches of at most WORK_S and a step.
    assert len(pauses) >= 0.040 / (WORK_S + STEP_S) - 1
    # A step begins only while its stretch has worked less than WORK_S (robust
    # to a step the machine stretched: it ends its stretch, as it should).
    stretch = 0.0
    for (started, ended), gap in zip(steps, [*gaps, 1.0], strict=True):
        assert stretch < WORK_S, f"a step after {stretch * 1000:.1f} ms of work unpaused"
        stretch += ended - started
        if gap >= PAUSE_S - EARLY_S:
            stretch = 0.0


async def test_only_work_after_unchecked_work_pauses_before_its_first_step() -> None:
    """A long prompt's estimate, say, begins at once: nothing heavy ran before it."""
    await asyncio.sleep(PAUSE_S * 3)  # the stretch of the tests before has paused
    firsts: list[float] = []
    for _ in range(5):
        entered = time.perf_counter()
        async with taking_turns():
            firsts.append(time.perf_counter() - entered)
    assert min(firsts) < PAUSE_S / 2


async def test_the_stretch_is_shared_by_the_heavy_work_of_all_calls() -> None:
    """Two calls' steps alternate, and the stretch counts both: the other calls
    wait behind one stretch, not one per heavy call."""
    count_calls_with(None)  # calls in flight not counted: always pause
    steps: list[tuple[int, float, float]] = []

    async def heavy(n: int) -> None:
        async with taking_turns() as next_step:
            for _ in range(20):
                started, ended = _busy(STEP_S)
                steps.append((n, started, ended))
                await next_step()

    await asyncio.gather(heavy(0), heavy(1))
    assert {n for n, _, _ in steps[:4]} == {0, 1}, "the two calls' steps alternate"
    stretch = 0.0
    ordered = sorted(steps, key=lambda step: step[1])
    starts = [started for _, started, _ in ordered[1:]] + [1e9]
    for (_, started, ended), after in zip(ordered, starts, strict=True):
        assert stretch < WORK_S, f"a step after {stretch * 1000:.1f} ms of work unpaused"
        stretch += ended - started
        if after - ended >= PAUSE_S - EARLY_S:
            stretch = 0.0


async def test_heavy_work_pauses_only_while_other_calls_are_in_flight() -> None:
    """Counted calls in flight (the gateway counts them: server/app.py): none but
    the heavy one, and its stretches go on unpaused; one more, and they pause."""
    in_flight = 1  # the heavy call itself

    async def heavy() -> list[tuple[float, float]]:
        COUNTED_CALL.set(True)  # admitted, as the overload gate marks a call
        steps: list[tuple[float, float]] = []
        async with taking_turns(pause_first=True) as next_step:
            for _ in range(40):
                steps.append(_busy(STEP_S))
                await next_step()
        return steps

    def pauses(steps: list[tuple[float, float]]) -> int:
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(steps)]
        return sum(1 for gap in gaps if gap >= PAUSE_S - EARLY_S)

    count_calls_with(lambda: in_flight)
    try:
        await asyncio.sleep(PAUSE_S * 3)  # the stretch of the tests before has paused
        alone = await asyncio.create_task(heavy())
        in_flight = 2
        shared = await asyncio.create_task(heavy())
    finally:
        count_calls_with(None)
    # Pauses the machine makes (a step preempted, a slow turn) are possible alone.
    assert pauses(alone) <= 2
    assert pauses(shared) >= 0.040 / (WORK_S + STEP_S) - 1


async def test_a_gateway_counts_its_admitted_calls_for_the_pauses() -> None:
    """While a gateway serves, its heavy work pauses for the calls its overload gate
    admitted; a gateway that stops leaves the count to the one still serving."""
    config = load_config(environ={}, overrides=conftest.TEST_CONFIG)
    first = await conftest.started(Gateway(config))
    second = await conftest.started(Gateway(config))
    turns = loop_turns._turns()
    try:
        assert turns.calls_in_flight is not None
        assert turns.calls_in_flight() == 0
        assert await second.gateway.overload_gate.enter() is None
        assert turns.calls_in_flight() == 1 and COUNTED_CALL.get()
        second.gateway.overload_gate.leave()
        await first.aclose()
        assert turns.calls_in_flight == second.gateway._calls_in_flight
    finally:
        await first.aclose()
        await second.aclose()
    assert turns.calls_in_flight is None
