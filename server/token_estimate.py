"""Token estimates, for models without a tokenizer we can run, and the offline tokenizer.

Two counts live here. `count_pieces` is the offline provider's tokenizer:
one token per word, per run of digits and per punctuation mark; the offline
provider streams those pieces one per chunk, and reports them as its usage.
`count_text` is the estimate everything else trusts (the context-window
check, TPM and budget reservations, smart routing, OpenAI CountTokens, the
output of a stream cut short): never below the pieces, and never below a
bound from the text's UTF-8 length, so that text the pieces undercount
cannot slip past a limit. Measured against BPE tokenizers, a word-per-token
count is close on English prose but far below on long unbroken runs (200,000
characters with no space were 4 "tokens") and on scripts without spaces
(4,500 Japanese characters were 603). The bound counts one token per
ASCII_BYTES_PER_TOKEN ASCII characters (BPE tokenizers average about four on
English and code, fewer on random identifiers), one per CJK, kana or hangul
character (BPE tokenizers give each from about 0.7 to over 1 token), and one
per OTHER_BYTES_PER_TOKEN UTF-8 bytes of the rest (Cyrillic, Greek, Arabic:
about two characters a token). It stays at most one token per character,
which the context-window check's cheap bound relies on. Images count a flat
IMAGE_TOKENS. No exact tokenizer runs here: see the README (Token counts).
"""

from __future__ import annotations

import json
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
ASCII_BYTES_PER_TOKEN = 4
OTHER_BYTES_PER_TOKEN = 3
# Han, kana, hangul, CJK punctuation and full-width forms: about a token each.
_WIDE = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
    "\U00020000-\U0003134f]"
)
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


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


def count_text(text: str) -> int:
    """The estimated tokens of `text`: the pieces, or the UTF-8 length bound if higher."""
    pieces = len(_TOKEN.findall(text))
    if text.isascii():
        bound = -(-len(text) // ASCII_BYTES_PER_TOKEN)
    else:
        ascii_chars = len(text.encode("ascii", "ignore"))
        wide = len(text) - len(_WIDE.sub("", text))
        other_bytes = max(0, len(text.encode("utf-8", "surrogatepass")) - ascii_chars - 3 * wide)
        bound = (
            -(-ascii_chars // ASCII_BYTES_PER_TOKEN)
            + wide
            + -(-other_bytes // OTHER_BYTES_PER_TOKEN)
        )
        # Emoji and other 4-byte characters: still at most a token each.
        bound = min(bound, len(text))
    return pieces if pieces > bound else bound


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
