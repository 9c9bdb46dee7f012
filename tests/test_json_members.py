"""A JSON body parsed with where its top-level values lie (server/json_members.py).

parse_object must parse exactly as json.loads does (values and errors), and
Members.with_values must change only the values it sets: the document it
gives is the old one with them, and every other member's text is the
client's, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import json_members
from server.json_members import parse_object, parse_object_in_steps


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


DECODER = json.JSONDecoder(parse_constant=_no_constant)

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
_KEYS = st.sampled_from(["model", "messages", "stream", "stream_options", "é", 'a"b', "x"])
_FORMATS = st.sampled_from(
    [
        {"separators": (",", ":")},
        {},
        {"indent": 2},
        {"indent": "\t", "ensure_ascii": False},
        {"ensure_ascii": False},
    ]
)


def _outcome(parse: Any, body: bytes) -> Any:
    """What parsing `body` gives: its value, or its error's type and message."""
    try:
        return ("ok", parse(body))
    except (ValueError, RecursionError) as err:
        return (type(err).__name__, str(err))


def _json_decode(body: bytes) -> Any:
    """What json.loads does with bytes, on the gateway's decoder."""
    return DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


def _text_of(body: bytes, span: tuple[int, int]) -> str:
    return body.decode("utf-8", "surrogatepass")[span[0] : span[1]]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6), _FORMATS, st.sampled_from(["", " ", "\n"]))
def test_an_object_parses_as_json_loads_parses_it(
    document: dict[str, Any], fmt: dict[str, Any], pad: str
) -> None:
    body = (pad + json.dumps(document, **fmt) + pad).encode()
    parsed, members = parse_object(body, DECODER)
    assert parsed == json.loads(body)
    assert members is not None
    for key, span in members.spans.items():
        assert json.loads(_text_of(body, span)) == parsed[key]
    assert members.ascii == body.isascii()


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_KEYS, _VALUES, max_size=6),
    st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=2),
    _FORMATS,
)
def test_with_values_changes_only_what_it_sets(
    document: dict[str, Any], changes: dict[str, Any], fmt: dict[str, Any]
) -> None:
    body = json.dumps(document, **fmt).encode()
    _, members = parse_object(body, DECODER)
    assert members is not None
    changed = members.with_values(body, changes)
    assert changed is not None
    assert json.loads(changed) == {**document, **changes}
    _, after = parse_object(changed, DECODER)
    assert after is not None
    for key, span in members.spans.items():
        if key not in changes:  # the client's own text of every other value
            assert _text_of(changed, after.spans[key]) == _text_of(body, span)


def test_a_key_given_twice_is_not_changed_in_place() -> None:
    body = b'{"model": "a", "x": 1, "model": "a"}'
    parsed, members = parse_object(body, DECODER)
    assert parsed == {"model": "a", "x": 1}
    assert members is not None and members.duplicated == {"model"}
    assert members.with_values(body, {"model": "b"}) is None  # the caller re-encodes
    assert members.with_values(body, {"x": 2}) == b'{"model": "a", "x": 2, "model": "a"}'


def test_a_key_not_there_is_added_first() -> None:
    _, members = parse_object(b' {"a": 1}', DECODER)
    assert members is not None
    assert members.with_values(b' {"a": 1}', {"b": {"c": True}}) == b' {"b":{"c":true},"a": 1}'
    _, empty = parse_object(b"{ }", DECODER)
    assert empty is not None and empty.with_values(b"{ }", {"b": 1}) == b'{"b":1 }'


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1, 2]",
        b'"text"',
        b"{",
        b'{"a" 1}',
        b'{"a": 1,}',
        b'{"a": 1 "b": 2}',
        b'{"a": }',
        b"{a: 1}",
        b'{"a": 1} x',
        b'{"a": 1}  ]',
        b'{"a": NaN}',
        b'{"a": [1, Infinity]}',
        b'{"a": "\x01"}',
        b'{"a": "\\x"}',
        b'{"a": "\xff"}',
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\\ud800"}',
        b'{"a": 1',
        b'{"a": 1e400}',
        b'{"a": -}',
        b'{"a": [1 2]}',
        b'{"a": [1,]}',
        b'{"a": [}',
        b'{"a": [1',
        b'{"a": [ ], "b": [ [ ] , {"c": [1, 2]} ]}',
        b'{"a": [1, NaN]}',
        b'{"a": [1] "b": 2}',
        b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        '{"é": 1}'.encode("utf-16"),
    ],
)
def test_what_json_refuses_it_refuses_the_same_way(body: bytes) -> None:
    assert _outcome(lambda b: parse_object(b, DECODER)[0], body) == _outcome(_json_decode, body)


@settings(deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_get_json_s_own_answer(garbage: bytes) -> None:
    body = b'{"model": "m", "x": ' + garbage
    assert _outcome(lambda b: parse_object(b, DECODER)[0], body) == _outcome(_json_decode, body)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6), _FORMATS, st.binary(max_size=3))
def test_the_parse_in_steps_is_the_same_parse(
    document: dict[str, Any], fmt: dict[str, Any], cut: bytes
) -> None:
    """A step after every value and element (STEP_CHARS 0): the same values,
    places and errors as the parse at once, on whole and on damaged bodies."""
    body = json.dumps(document, **fmt).encode()
    damaged = body[: len(body) // 2] + cut
    stepped = 0

    async def next_step() -> None:
        nonlocal stepped
        stepped += 1

    old = json_members.STEP_CHARS
    json_members.STEP_CHARS = 0
    try:
        for text in (body, damaged):
            in_steps = _outcome(
                lambda b: asyncio.run(parse_object_in_steps(b, DECODER, next_step)), text
            )
            assert in_steps == _outcome(lambda b: parse_object(b, DECODER), text)
    finally:
        json_members.STEP_CHARS = old
    if any(isinstance(v, list) and v for v in document.values()):
        assert stepped > 0


_TEXTS = st.text(
    alphabet=st.sampled_from(["a", "b", " ", '"', "\\", "\n", "\t", "é", "日", "🙂", "\x01", "/"]),
    max_size=60,
)
_CONVERSATIONS = st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.just("user"),
                    "content": _TEXTS
                    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXTS})),
                }
            ),
            max_size=4,
        ),
        "system": _TEXTS,
    }
)


@settings(max_examples=300, deadline=None)
@given(
    _CONVERSATIONS,
    st.booleans(),
    st.integers(1, 24),
    st.tuples(st.integers(0, 400), st.sampled_from([b"", b"\x01", b"\\", b"\\u12", b'"', b"\\x"])),
)
def test_long_strings_read_in_pieces_are_json_s_strings(
    document: dict[str, Any], ascii_only: bool, step: int, damage: tuple[int, bytes]
) -> None:
    """Strings read a few characters at a time (cut between escapes: \\n, \\", \\\\,
    \\u escapes and the surrogate pairs of ensure_ascii's astral characters)
    give json.loads's value, and a damaged string json.loads's own error."""
    body = json.dumps(document, ensure_ascii=ascii_only).encode()
    at, inserted = damage
    damaged = body[:at] + inserted + body[at:]
    stepped = 0

    async def next_step() -> None:
        nonlocal stepped
        stepped += 1

    old = json_members.STEP_CHARS
    json_members.STEP_CHARS = step
    try:
        for text in (body, damaged):
            in_steps = _outcome(
                lambda b: asyncio.run(parse_object_in_steps(b, DECODER, next_step))[0], text
            )
            assert in_steps == _outcome(_json_decode, text)
    finally:
        json_members.STEP_CHARS = old


def test_one_long_text_is_many_steps() -> None:
    text = ('Some prose, "quoted", with a path C:\\dir and 🙂.\n' * 20_000)[:900_000]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    steps = 0

    async def next_step() -> None:
        nonlocal steps
        steps += 1

    document, _ = asyncio.run(parse_object_in_steps(body, DECODER, next_step))
    assert document["messages"][0]["content"] == text
    # The body is ~1.1 million characters: four or five steps of STEP_CHARS.
    assert steps >= len(body) // json_members.STEP_CHARS


async def test_a_long_list_is_encoded_in_steps_as_json_dumps_would() -> None:
    """A conversation's items, as a relayed body's rewrite writes them back
    (server/http_edge/generation.py `rewritten`): a step every STEP_CHARS or so."""
    items: list[Any] = [
        {"role": "user", "content": f'{n} "quoted" \\ é 😀 ' + "x" * 10_000} for n in range(300)
    ]
    items.append({"type": "function_call_output", "call_id": "c", "output": 1e5})
    steps = 0

    async def step() -> None:
        nonlocal steps
        steps += 1

    text = await json_members.encoded_in_steps(items, step)
    assert text == json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    assert steps >= len(text) // json_members.STEP_CHARS - 1
    assert await json_members.encoded_in_steps({"a": [1]}, step) == '{"a":[1]}'
