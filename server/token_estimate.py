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
OpenAI models are in server/openai_tokenizer.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable

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


def count_pieces(text: str) -> int:
    """The offline provider's tokenizer: the pieces `split_pieces` gives."""
    return len(_TOKEN.findall(text))


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


def count_text(text: str) -> int:
    """The estimated tokens of `text` (see the module docstring); at most one a character.

    Each part counts on its own: the dense runs; the rest's ASCII, as its
    pieces or a token per ASCII_CHARS_PER_TOKEN characters, whichever is
    more; and the rest's other characters by their UTF-8 length.
    """
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
    # At most a token a character (see the module docstring).
    return min(estimate + other, len(text))


TextCounter = Callable[[str], int]


def count_blocks(blocks: Iterable[ContentBlock], count: TextCounter = count_text) -> int:
    total = 0
    for block in blocks:
        if isinstance(block, TextBlock):
            total += count(block.text)
        elif isinstance(block, ImageBlock):
            total += IMAGE_TOKENS
        elif isinstance(block, ToolUseBlock):
            total += count(block.name) + count(json.dumps(block.input))
        elif isinstance(block, ToolResultBlock):
            total += count_blocks(block.content, count)
        elif isinstance(block, ThinkingBlock):
            total += count(block.text)
    return total


def count_request(
    system: Iterable[ContentBlock],
    messages: Iterable[Message],
    tools: Iterable[Tool],
    count: TextCounter = count_text,
) -> int:
    """The estimated input tokens of a request (`count_pieces`: the offline tokenizer's)."""
    total = count_blocks(system, count)
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + count_blocks(message.content, count)
    for tool in tools:
        total += MESSAGE_OVERHEAD_TOKENS + count(tool.name) + count(tool.description)
        total += count(json.dumps(tool.input_schema))
    return total
