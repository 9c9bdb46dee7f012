"""Token estimates, for models without a tokenizer we can run, and the offline tokenizer.

Two counts live here. `count_pieces` is the offline provider's tokenizer:
one token per word, per run of digits and per punctuation mark; the offline
provider streams those pieces one per chunk, and reports them as its usage.
`count_text` is the estimate everything else trusts (the context-window
check, TPM and budget reservations, smart routing, the OpenAI CountTokens of
a model without an exact count, the output of a stream cut short): never
below the pieces, and never below a bound from the text's UTF-8 length, so
that text the pieces undercount cannot slip past a limit. A word-per-token
count is close on English prose but far below on long unbroken runs
(200,000 characters with no space were 4 "tokens") and on scripts without
spaces (4,500 Japanese characters were 603).

The estimate was fitted to OpenAI's o200k_base and cl100k_base encodings
(tests/test_exact_tokens.py compares them on each kind of text), and adds up
the parts of a text, each counted its own way: runs of letters and digits
mixed (hex, UUIDs, keys) and base64-like blobs, a token a character (BPE
gives them one every 1.5 to 2 characters); numbers, a token per group of up
to DIGITS_PER_TOKEN digits (as both encodings split them); the rest of the
ASCII, by its pieces (words, punctuation, whitespace BPE keeps apart) or
one token per ASCII_CHARS_PER_TOKEN characters, whichever is more; CJK,
kana and hangul, WIDE_TOKENS_PER_CHAR a character; and the other scripts
(Cyrillic, Greek, Arabic, Indic, Thai), one token per OTHER_BYTES_PER_TOKEN
UTF-8 bytes. It stays at most one token per character, which the
context-window check's cheap bound relies on, so text that BPE gives more
than a token a character (emoji, rare CJK characters, most hanzi and hangul
in cl100k_base), short random strings without a digit and snippets of
multi-token words can count more than estimated: only a tokenizer knows.
On long ordinary text the estimate is above both encodings' counts (English
prose by about a fifth). Images count a flat IMAGE_TOKENS. Exact counts for
OpenAI models are in server/openai_tokenizer.py. The estimate is never below
a token per ASCII_CHARS_PER_TOKEN characters (`count_floor`), so that the
length of a request alone can show that it is beyond a context window.

Counting is bounded however long the text (issue 17: one 25 MiB request
froze the gateway for 1.5 s and five took 1.2 GiB). Text longer than
SLICE_CHARS is counted a slice at a time, cut where the whole's count is the
sum of its slices' (before a space, or for the pieces after any non-word
character), failing that anywhere but inside a run of base64 characters,
whose count depends on its length (the slices' estimate is then at least the
whole's, and still at most a token a character): memory holds one slice's
pieces, never a list of every token. On the event loop, `count_request_async`
counts a slice per step of server/loop_turns.py, so that other calls wait at
most a slice (a few hundred microseconds), and remembers its counts for the
rest of the call: the synchronous counts that follow in the same call (the
context-window check, smart routing, admission, the offline provider) find
them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from server.loop_turns import taking_turns
from server.schema import (
    ContentBlock,
    ImageBlock,
    Message,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolResultBlock,
    ToolUseBlock,
)

IMAGE_TOKENS = 1_000
# Per message and per tool: the role marker and separators chat templates add.
MESSAGE_OVERHEAD_TOKENS = 3

# The bound from the UTF-8 length (see the module docstring).
ASCII_CHARS_PER_TOKEN = 4
DIGITS_PER_TOKEN = 3
WIDE_TOKENS_PER_CHAR = 1.2
OTHER_BYTES_PER_TOKEN = 2.4
# A run of letters and digits from its first digit: all digits (a number,
# split in groups as BPE splits them) or mixed (hex, base64, UUIDs, keys: a
# token a character). Matched from a digit because scanning for one is fast.
_DIGIT_RUN = re.compile(r"[0-9][A-Za-z0-9]*")
# Base64 and the like: long runs of letters, digits, '+' and '/' that are not
# a word (mixed case, or with a digit or a slash): a token a character too.
_BLOB = re.compile(r"[A-Za-z0-9+/]{16,}=*")
# Han, kana, hangul, CJK punctuation and full-width forms: about a token each.
_WIDE = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
    "\U00020000-\U0003134f]"
)
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# The estimate's pieces: as _TOKEN, but numbers split in groups as BPE splits
# them, and whitespace that BPE does not join to the next word: a run's all
# but last character, a newline, before a digit or at the end.
_ESTIMATE_PIECE = re.compile(
    rf"[^\W0-9]+|[0-9]{{1,{DIGITS_PER_TOKEN}}}|[^\w\s]|\s+(?=\s)|\s(?=[0-9]|\Z)|[\r\n]"
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

# A text longer than this is counted a slice at a time (see the module
# docstring); counting a slice takes a few hundred microseconds.
SLICE_CHARS = 4_096
# A request of at most this many characters is counted at once where it is
# needed, in a few milliseconds; a longer one ahead, by count_request_async.
COUNT_AT_ONCE_CHARS = 16 * SLICE_CHARS
# Where a slice may end (a match ends the slice): for the estimate, at a
# non-space before a space, else anywhere but between two base64 characters
# (nor before a base64 run's padding); for the pieces, after any non-word
# character.
_SPACE_CUT = re.compile(r"\S(?=[ \t\r\n])")
_TEXT_CUT = re.compile(r"[^A-Za-z0-9+/]|.(?=[^A-Za-z0-9+/=])", re.DOTALL)
_PIECE_CUT = re.compile(r"\W")


def _slices(text: str, near: re.Pattern[str], far: re.Pattern[str]) -> Iterator[str]:
    """`text` in slices of about SLICE_CHARS, each ending where `near` matches
    soon after SLICE_CHARS, else where `far` first does (one slice to the end
    when it never does)."""
    start, size = 0, len(text)
    while size - start > SLICE_CHARS:
        end = start + SLICE_CHARS
        found = near.search(text, end - 1, end + SLICE_CHARS // 4) or far.search(text, end - 1)
        cut = found.end() if found else size
        yield text[start:cut]
        start = cut
    if start < size:
        yield text[start:]


def split_pieces(text: str) -> list[str]:
    """Splits text into token pieces that concatenate back to `text`.

    Leading whitespace belongs to the piece after it; trailing whitespace
    joins the last piece.
    """
    pieces = _PIECE.findall(text)
    consumed = sum(map(len, pieces))
    if consumed < len(text):
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    return pieces


def count_floor(text: str) -> int:
    """What `count_text` never counts below: a token per ASCII_CHARS_PER_TOKEN
    characters, from the length alone."""
    return -(-len(text) // ASCII_CHARS_PER_TOKEN)


def _token_class(char: str) -> int:
    """A character's class in _TOKEN's terms: a word character (w), a space
    (s), or another, a piece of its own (p)."""
    if re.fullmatch(r"\w", char):
        return ord("w")
    return ord("s") if re.fullmatch(r"\s", char) else ord("p")


_ASCII_CLASSES = bytes(_token_class(chr(i)) for i in range(256))


def _count_pieces_slice(text: str) -> int:
    if not text.isascii():
        return len(_TOKEN.findall(text))
    # The same count, by class of character in C, ten times as fast: each
    # other character is a piece, and so is each run of word characters.
    classes = text.encode("ascii").translate(_ASCII_CLASSES)
    runs = classes.count(b"sw") + classes.count(b"pw") + classes.startswith(b"w")
    return classes.count(b"p") + runs


def count_pieces(text: str) -> int:
    """The offline provider's tokenizer: the pieces `split_pieces` gives."""
    if len(text) <= SLICE_CHARS:
        return _count_pieces_slice(text)
    remembered = _remembered(text, count_pieces)
    if remembered is not None:
        return remembered
    return sum(map(_count_pieces_slice, _slices(text, _PIECE_CUT, _PIECE_CUT)))


def _is_word_or_number(run: str) -> bool:
    if run.isdigit():
        return True  # counted in groups below
    return run.isalpha() and (run.islower() or run.isupper() or run.istitle())


def _dense(text: str) -> tuple[int, str]:
    """The tokens of the runs that count apart (blobs, numbers, mixed runs), and the rest.

    Blobs leave nothing in the rest; each run from a digit leaves a "0", so
    that the pieces still see a number there (and the space before it).
    """
    tokens = 0
    blobs = [m for m in _BLOB.finditer(text) if not _is_word_or_number(m.group())]
    if blobs:
        parts, start = [], 0
        for blob in blobs:
            parts.append(text[start : blob.start()])
            tokens += blob.end() - blob.start()
            start = blob.end()
        parts.append(text[start:])
        text = "".join(parts)
    runs = _DIGIT_RUN.findall(text)
    if runs:
        for run in runs:
            count = -(-len(run) // DIGITS_PER_TOKEN) if run.isdigit() else len(run)
            tokens += count - 1  # the "0" left counts the other
        text = _DIGIT_RUN.sub("0", text)
    return tokens, text


def _non_ascii_bound(text: str, ascii_chars: int) -> int:
    """The bound of the characters of `text` that are not ASCII."""
    wide = len(text) - len(_WIDE.sub("", text))
    other_bytes = len(text.encode("utf-8", "surrogatepass")) - ascii_chars - 3 * wide
    return math.ceil(wide * WIDE_TOKENS_PER_CHAR) + math.ceil(
        max(0, other_bytes) / OTHER_BYTES_PER_TOKEN
    )


def _count_text_slice(text: str) -> int:
    dense, rest = _dense(text)
    if rest.isascii():
        ascii_chars, other = len(rest), 0
    else:
        ascii_chars = len(rest.encode("ascii", "ignore"))
        # Runs of other characters count here, by their length or their pieces.
        other_pieces = len(_TOKEN.findall(" ".join(_NON_ASCII.findall(rest))))
        other = max(_non_ascii_bound(rest, ascii_chars), other_pieces)
        rest = _NON_ASCII.sub(" ", rest)
    pieces = len(_ESTIMATE_PIECE.findall(rest))
    estimate = dense + min(max(pieces, -(-ascii_chars // ASCII_CHARS_PER_TOKEN)), ascii_chars)
    # At most a token a character (see the module docstring), at least the floor.
    return max(min(estimate + other, len(text)), count_floor(text))


def count_text(text: str) -> int:
    """The estimated tokens of `text` (see the module docstring); at most one a character.

    Each part counts on its own: the dense runs; the rest's ASCII, as its
    pieces or a token per ASCII_CHARS_PER_TOKEN characters, whichever is
    more; and the rest's other characters by their UTF-8 length.
    """
    if len(text) <= SLICE_CHARS:
        return _count_text_slice(text)
    remembered = _remembered(text, count_text)
    if remembered is not None:
        return remembered
    return sum(map(_count_text_slice, _slices(text, _SPACE_CUT, _TEXT_CUT)))


TextCounter = Callable[[str], int]
# How count_request_async counts a text in slices with each counter.
_SLICED: dict[TextCounter, tuple[TextCounter, re.Pattern[str], re.Pattern[str]]] = {
    count_text: (_count_text_slice, _SPACE_CUT, _TEXT_CUT),
    count_pieces: (_count_pieces_slice, _PIECE_CUT, _PIECE_CUT),
}
# What a request is counted as: fixed tokens, text, or a JSON value (counted as its JSON).
_Part = int | str | dict[str, Any]


@dataclass(slots=True)
class _Remembered:
    """One call's counts of long texts, and the JSON of its values, by id.

    Each entry holds what its id names, so that the id cannot be reused by
    another object while the entry lives.
    """

    counts: dict[tuple[int, TextCounter], tuple[str, int]] = field(default_factory=dict)
    dumps: dict[int, tuple[dict[str, Any], str]] = field(default_factory=dict)


# Set per call (the call's task has its own context): see remember_this_call.
_REMEMBERED: ContextVar[_Remembered | None] = ContextVar("token_counts", default=None)


def remember_this_call() -> None:
    """Starts remembering, for the rest of the current call, the counts that
    count_request_async makes and the JSON of the request's values."""
    _REMEMBERED.set(_Remembered())


def _remembered(text: str, count: TextCounter) -> int | None:
    remembered = _REMEMBERED.get()
    if remembered is None:
        return None
    hit = remembered.counts.get((id(text), count))
    return hit[1] if hit is not None and hit[0] is text else None


def _text(part: str | dict[str, Any]) -> str:
    """A part as the text to count: a JSON value as its JSON (once per call)."""
    if isinstance(part, str):
        return part
    remembered = _REMEMBERED.get()
    if remembered is None:
        return json.dumps(part)
    hit = remembered.dumps.get(id(part))
    if hit is not None and hit[0] is part:
        return hit[1]
    text = json.dumps(part)
    remembered.dumps[id(part)] = (part, text)
    return text


def _block_parts(blocks: Iterable[ContentBlock]) -> Iterator[_Part]:
    for block in blocks:
        if isinstance(block, TextBlock | ThinkingBlock):
            yield block.text
        elif isinstance(block, ImageBlock):
            yield IMAGE_TOKENS
        elif isinstance(block, ToolUseBlock):
            yield block.name
            yield block.input
        elif isinstance(block, ToolResultBlock):
            yield from _block_parts(block.content)


def _parts(
    system: Iterable[ContentBlock], messages: Iterable[Message], tools: Iterable[Tool]
) -> Iterator[_Part]:
    yield from _block_parts(system)
    for message in messages:
        yield MESSAGE_OVERHEAD_TOKENS
        yield from _block_parts(message.content)
    for tool in tools:
        yield MESSAGE_OVERHEAD_TOKENS
        yield tool.name
        yield tool.description
        yield tool.input_schema


def count_blocks(blocks: Iterable[ContentBlock], count: TextCounter = count_text) -> int:
    return sum(p if isinstance(p, int) else count(_text(p)) for p in _block_parts(blocks))


def count_request(
    system: Iterable[ContentBlock],
    messages: Iterable[Message],
    tools: Iterable[Tool],
    count: TextCounter = count_text,
) -> int:
    """The estimated input tokens of a request (`count_pieces`: the offline tokenizer's;
    `count_floor`: what the estimate is never below; `len`: what it is never above)."""
    return sum(
        p if isinstance(p, int) else count(_text(p)) for p in _parts(system, messages, tools)
    )


async def count_request_async(
    system: Iterable[ContentBlock],
    messages: Iterable[Message],
    tools: Iterable[Tool],
    count: TextCounter = count_text,
) -> int:
    """count_request, for requests of any size: on the event loop, a slice per
    step of server/loop_turns.py, so that other calls wait at most a slice.
    Remembers the counts of long texts for the rest of the call (see
    remember_this_call).

    `count` is count_text or count_pieces.
    """
    count_slice, near, far = _SLICED[count]
    remembered = _REMEMBERED.get()
    total = step = 0
    async with taking_turns() as next_step:
        for part in _parts(system, messages, tools):
            if isinstance(part, int):
                total += part
                continue
            text = _text(part)
            if len(text) <= SLICE_CHARS:
                slices: Iterable[str] = (text,)
            elif (tokens := _remembered(text, count)) is not None:
                total += tokens
                continue
            else:
                slices = _slices(text, near, far)
            tokens = 0
            for piece in slices:
                tokens += count_slice(piece)
                step += len(piece)
                if step >= SLICE_CHARS:
                    step = 0
                    await next_step()
            if len(text) > SLICE_CHARS and remembered is not None:
                remembered.counts[(id(text), count)] = (text, tokens)
            total += tokens
    return total
