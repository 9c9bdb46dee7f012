"""free_of_lone_surrogates: the body's bytes say when the decoders need not walk it.

The HTTP edge skips the walk for lone surrogates (refuse_lone_surrogates)
when the raw body cannot hold one. It must never say so of a body that
does: every way JSON bytes can decode to a lone surrogate (its escape, its
UTF-8-like encoding, a UTF-16 or UTF-32 body) answers False; a body that
merely might (a valid pair's escapes, an escaped backslash before `ud800`)
is walked, which costs time, never correctness.
"""

from __future__ import annotations

import json
import random

import pytest

from server.errors import InvalidArgumentError
from server.http_edge import json_decoding
from server.http_edge.json_decoding import (
    free_of_lone_surrogates,
    free_of_lone_surrogates_in_steps,
    refuse_lone_surrogates,
)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"Hello"}]}',
        '{"text":"caf\u00e9 \U0001f600 \u2014"}'.encode(),  # non-ASCII as UTF-8
        b'{"text":"\\u00e9\\u2014"}',  # escapes outside the surrogate range
        b"\xef\xbb\xbf{}",  # UTF-8 with a byte order mark
    ],
)
def test_text_without_surrogates_is_free_of_them(body: bytes) -> None:
    assert free_of_lone_surrogates(body)
    refuse_lone_surrogates(json.loads(body))


@pytest.mark.parametrize(
    "body",
    [
        b'{"text":"\\ud800"}',  # a lone high surrogate, escaped
        b'{"text":"\\uDC00"}',  # a lone low one, upper case
        b'{"\\udfff":1}',  # in a key
        b'{"text":"a\xed\xa0\x80b"}',  # encoded as UTF-8 would if it could
        '{"text":"x"}'.encode("utf-16-le"),  # another encoding: always walked
        '{"text":"x"}'.encode("utf-32"),
    ],
)
def test_a_body_that_may_hold_one_is_walked(body: bytes) -> None:
    assert not free_of_lone_surrogates(body)


def test_a_valid_pair_and_an_escaped_backslash_are_walked_and_pass() -> None:
    for body in (b'{"text":"\\ud83d\\ude00"}', b'{"text":"\\\\ud800"}'):
        assert not free_of_lone_surrogates(body)
        refuse_lone_surrogates(json.loads(body))


def test_never_free_when_the_document_holds_a_lone_surrogate() -> None:
    """Random bodies of escapes, encodings and plain text around the surrogate range."""
    rng = random.Random(15)
    pieces = [
        "a", "\u00e9", "\U0001f600", "\\u00e9", "\\ud800", "\\udfff", "\\ud83d\\ude00",
        "\\\\", "\\\\ud800", "\\ue000", "\\ud7ff",
    ]  # fmt: skip
    raw = [b"\xed\xa0\x80", b"\xed\x9f\xbf", b"\xee\x80\x80"]  # D800, D7FF, E000
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        body = b'{"k":"' + text.encode() + b'"}'
        if rng.random() < 0.3:
            body = body[:-2] + rng.choice(raw) + body[-2:]
        document = json.loads(body)
        try:
            refuse_lone_surrogates(document)
        except InvalidArgumentError:
            assert not free_of_lone_surrogates(body), body


@pytest.mark.parametrize("at", range(-6, 4))
async def test_the_search_in_steps_misses_nothing_at_a_step_s_edge(
    at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A surrogate's escape or encoding across the boundary of two steps is found."""
    monkeypatch.setattr(json_decoding, "SCAN_STEP_BYTES", 64)
    steps = 0

    async def next_step() -> None:
        nonlocal steps
        steps += 1

    for mark in (b"\\ud800", b"\xed\xa0\x80"):
        body = b'{"k":"' + b"x" * (64 * 3 + at - 6) + mark + b"x" * 100 + b'"}'
        assert not free_of_lone_surrogates(body)
        assert not await free_of_lone_surrogates_in_steps(body, next_step)
    clean = b'{"k":"' + b"x \\u00e9 " * 100 + b'"}'
    assert free_of_lone_surrogates(clean)
    steps = 0
    assert await free_of_lone_surrogates_in_steps(clean, next_step)
    assert steps >= len(clean) // 64
