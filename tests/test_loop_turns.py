"""Heavy work takes turns with other calls and pauses between stretches (server/loop_turns.py)."""

from __future__ import annotations

import asyncio
import itertools
import time

from server.loop_turns import PAUSE_S, WORK_S, taking_turns

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
