"""Long requests are counted in bounded time and memory (issue 17, item 3).

The estimate counts a long text a slice at a time (no list of every token),
never below its floor of a token per 4 characters (so that a request beyond
every window is refused by its length, untokenized), and on the event loop a
slice per step, leaving the loop to other calls between steps, once per call.
tests/test_loop_stalls.py measures a real gateway under a burst of them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.stall_probe import prose
from server import token_estimate
from server.errors import ContextWindowExceededError
from server.http_edge import generation
from server.loop_turns import TURNS_BETWEEN_STEPS
from server.routing.context_window import estimate_ahead, estimated_input_tokens, fitting
from server.routing.route import Deployment, Route
from server.schema import GenerationRequest, Message, ModelInfo, Role, TextBlock, ToolUseBlock
from server.token_estimate import (
    count_floor,
    count_pieces,
    count_request,
    count_request_async,
    count_text,
)

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _request(*texts: str, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        model="m",
        messages=[Message(Role.USER, [TextBlock(t) for t in texts])],
        max_tokens=max_tokens,
        request_id="r",
    )


def _route(window: int) -> Route:
    model = ModelInfo("m", "p", window, max_output_tokens=1_000, default_max_tokens=1_000)
    provider: Any = SimpleNamespace(name="p")
    return Route(provider, model, (Deployment(provider, model),))


class TokenizingError(Exception):
    pass


class _NoTokenizing:
    """Stands for the estimate's regular expressions: fails the test when used."""

    def findall(self, *args: Any) -> list[str]:
        raise TokenizingError

    finditer = sub = findall


@pytest.fixture
def no_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_ESTIMATE_PIECE", "_TOKEN", "_BLOB", "_DIGIT_RUN"):
        monkeypatch.setattr(token_estimate, name, _NoTokenizing())


def test_a_long_text_is_counted_in_bounded_memory() -> None:
    text = prose(4_000_000)  # a full 1M-token window of prose and code
    for count in (count_text, count_pieces):
        tracemalloc.start()
        try:
            count(text)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Before: a list of every token, 130 MiB for this text.
        assert peak < 2 * 2**20, f"{count.__name__} peaked at {peak / 2**20:.1f} MiB"


_PIECES = st.sampled_from(
    [
        *("the ", "word", " ", "  ", "\n", "123", "4567", ", ", ".", "AbCdEfGh01234567"),
        *("+/", "==", "日本語", "é", "😀", "x" * 40, "\u3000", "_", "a1b2", "Привет"),
        *("123 ", "aaaaaaaaaaaaa "),
    ]
)
_TEXTS = st.lists(_PIECES, max_size=60).map("".join) | st.text(max_size=300)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXTS)
def test_counted_in_slices_the_bounds_hold(text: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(token_estimate, "SLICE_CHARS", 16)  # every text in many slices
        pieces, estimate = count_pieces(text), count_text(text)
    # The offline tokenizer's count is exact (its slices are cut between pieces).
    assert pieces == len(_TOKEN.findall(text))
    # The estimate's guarantees (tests/test_token_estimate.py) hold slice by slice.
    assert pieces <= estimate <= len(text)
    assert count_floor(text) <= estimate


_NUMBERS_AND_WORDS = st.sampled_from(["123 ", "aaaaaaaaaaaaa ", "the ", "word", " ", "4567", ", "])


@settings(max_examples=300, deadline=None)
@given(st.lists(_NUMBERS_AND_WORDS, max_size=60).map("".join) | st.text(max_size=300))
def test_the_estimate_is_never_below_its_floor(text: str) -> None:
    assert count_text(text) >= count_floor(text)


def test_the_floor_holds_for_short_numbers_among_long_words() -> None:
    # Before, 200: a run of three digits counted less than its characters' share.
    assert count_text("123 aaaaaaaaaaaaa " * 50) == 900 // 4


@pytest.mark.usefixtures("no_tokenizing")
def test_a_request_beyond_every_window_is_refused_by_its_length() -> None:
    request = _request(
        "word " * 1_000
    )  # 5,000 characters: at least 1,250 tokens, and the message's 3
    with pytest.raises(ContextWindowExceededError) as refused:
        fitting(_route(1_000).deployments, request)
    assert "prompt is too long: 1253 tokens > 1000 maximum" in str(refused.value)
    assert "at least 1253 input tokens" in refused.value.violations[0].description


async def test_counting_a_long_request_leaves_the_loop_to_other_calls() -> None:
    request = _request(prose(1_000_000), prose(300_000, seed=2))
    gaps: list[float] = []
    counting = True

    async def other_call() -> None:
        last = time.perf_counter()
        while counting:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(other_call())
    tokens = await count_request_async(request.system, request.messages, request.tools)
    counting = False
    await ticker
    assert tokens == count_request(request.system, request.messages, request.tools)
    # About 320 slices of 4,096 characters, with turns of the loop between them.
    assert len(gaps) > 300 * TURNS_BETWEEN_STEPS
    assert max(gaps) < 0.05, f"the loop stalled {max(gaps) * 1000:.0f} ms"


async def test_a_count_cancelled_midway_leaves_the_turn_to_the_others() -> None:
    request = _request(prose(1_000_000))
    cancelled = asyncio.create_task(
        count_request_async(request.system, request.messages, request.tools)
    )
    for _ in range(50):
        await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    other = _request(prose(100_000, seed=3))
    async with asyncio.timeout(10):
        counted = await count_request_async(other.system, other.messages, other.tools)
    assert counted == count_request(other.system, other.messages, other.tools)


async def test_a_long_request_is_tokenized_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    request = _request(prose(400_000), max_tokens=16)
    request.messages.append(
        Message(Role.ASSISTANT, [ToolUseBlock("t1", "write", {"content": prose(100_000)})])
    )
    route = _route(150_000)  # the cheap bound does not show a fit: the estimate is needed
    ahead = await estimate_ahead(request, route)
    assert ahead == count_request(request.system, request.messages, request.tools)
    pieces = count_request(request.system, request.messages, request.tools, count_pieces)
    tokenized: list[str] = []
    for name in ("_count_text_slice", "_count_pieces_slice"):
        count = getattr(token_estimate, name)
        monkeypatch.setattr(token_estimate, name, lambda t, c=count: tokenized.append(t) or c(t))
    # What the call's synchronous checks and the offline provider count next:
    # only the short texts (here the tool's name) again.
    assert estimated_input_tokens(request) == ahead
    assert fitting(route.deployments, request) == list(route.deployments)
    assert count_request(request.system, request.messages, request.tools, count_pieces) == pieces
    assert set(tokenized) == {"write"}


async def test_a_short_request_is_not_counted_ahead() -> None:
    assert await estimate_ahead(_request("hello there"), _route(1_000_000)) is None


async def test_a_request_beyond_every_window_is_not_counted_ahead() -> None:
    request = _request("word " * 100_000)  # at least 125,000 tokens (and the message's 3)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("_ESTIMATE_PIECE", "_TOKEN", "_BLOB", "_DIGIT_RUN"):
            patch.setattr(token_estimate, name, _NoTokenizing())
        assert await estimate_ahead(request, _route(100_000)) == 125_003


async def test_large_bodies_are_parsed_a_step_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three large conversations arriving together are parsed message by message,
    each step a turn of its own, with turns for the other calls between."""
    turn = 0
    steps: list[tuple[int, int]] = []  # (body, turn) at the end of each step
    parse = generation.parse_object_in_steps

    async def recorded_parse(body: bytes, decoder: Any, next_step: Any) -> Any:
        async def step() -> None:
            steps.append((bodies.index(body), turn))
            await next_step()

        return await parse(body, decoder, step)

    async def other_call() -> None:
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    monkeypatch.setattr(generation, "parse_object_in_steps", recorded_parse)
    ticker = asyncio.create_task(other_call())
    conversations = [
        {
            "model": "m",
            "messages": [{"role": "user", "content": f"{n} " + "x" * 60_000} for _ in range(40)],
            "max_tokens": 10,
        }
        for n in range(3)
    ]
    bodies = [json.dumps(c).encode() for c in conversations]
    parsed = await asyncio.gather(*(generation.read_json(b) for b in bodies))
    ticker.cancel()
    assert [document for document, _ in parsed] == conversations
    # 2.4 MB each, in steps of about 256 KiB (STEP_CHARS): before, each was
    # one step, and the three arrived together were parsed in one turn.
    for n in range(3):
        assert sum(1 for body, _ in steps if body == n) >= 8
    turns = [at for _, at in steps]
    assert all(b - a >= TURNS_BETWEEN_STEPS for a, b in itertools.pairwise(turns))
