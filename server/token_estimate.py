"""A deterministic token estimate for models without a tokenizer we can run.

One token per word, per run of digits and per punctuation mark, which is
close to BPE tokenizers on English prose (within roughly 30%) and exact for
the offline provider, whose "tokenizer" it is. Images count a flat
IMAGE_TOKENS. The same pieces are what the offline provider streams, one
per chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

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


def count_text(text: str) -> int:
    return len(_TOKEN.findall(text))


def count_blocks(blocks: Iterable[ContentBlock]) -> int:
    total = 0
    for block in blocks:
        if isinstance(block, TextBlock):
            total += count_text(block.text)
        elif isinstance(block, ImageBlock):
            total += IMAGE_TOKENS
        elif isinstance(block, ToolUseBlock):
            total += count_text(block.name) + count_text(json.dumps(block.input))
        elif isinstance(block, ToolResultBlock):
            total += count_blocks(block.content)
        elif isinstance(block, ThinkingBlock):
            total += count_text(block.text)
    return total


def count_request(
    system: Iterable[ContentBlock], messages: Iterable[Message], tools: Iterable[Tool]
) -> int:
    """The estimated input tokens of a request."""
    total = count_blocks(system)
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + count_blocks(message.content)
    for tool in tools:
        total += MESSAGE_OVERHEAD_TOKENS + count_text(tool.name) + count_text(tool.description)
        total += count_text(json.dumps(tool.input_schema))
    return total
