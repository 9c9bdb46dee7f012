"""Exact token counts for OpenAI models, offline: the OpenAI provider's CountTokens.

tiktoken, an optional dependency, tokenizes. The encodings it would download
at run time ship with the gateway instead (server/openai_encodings/: o200k_base
and cl100k_base, 2.5 MB gzipped, MIT like tiktoken) and are checked against
the SHA-256 that tiktoken pins for each. Which encoding a model uses is
tiktoken's own table: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3 and o4-mini use
o200k_base, gpt-4 and gpt-3.5-turbo cl100k_base. A model the table does not
know (the catalog's gpt-6 family, an OpenAI-compatible server's own models)
has no exact count, and neither has anything when tiktoken is not installed
or an encoding file is missing: `count_request` returns None and the caller
keeps the estimate of server/token_estimate.py.

Messages count as OpenAI's cookbook ("How to count tokens with tiktoken")
counts them, which matches the API's `prompt_tokens`: 3 tokens a message plus
its role and content, and 3 for the reply's priming. Tool definitions count by
the cookbook's formula too, but OpenAI does not publish how it renders tools,
tool calls, tool results, images or several content parts, so a request with
any of them is `exact=False` (its text still counted by the tokenizer).

Loading an encoding parses 200,000 lines (about 0.3 s): once per process, on
first use, under a lock. `count_request` does that, and any count of more
than INLINE_MAX_CHARS of text (tokenizing 1 MB takes about 30 ms), in a
thread, so that the event loop never waits for it.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib
import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from server.schema import (
    ContentBlock,
    ImageBlock,
    Message,
    Role,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolResultBlock,
    ToolUseBlock,
)
from server.token_estimate import IMAGE_TOKENS

log = logging.getLogger(__name__)

# Requests with more text than this are counted in a thread.
INLINE_MAX_CHARS = 64 * 1024
# The cookbook's chat format: <|start|>{role}<|message|>{content}<|end|> is 3
# tokens besides role and content; every reply is primed with
# <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3

_DATA_PACKAGE = "server"
_DATA_FOLDER = "openai_encodings"


@dataclass(frozen=True, slots=True)
class _Shipped:
    sha256: str  # of the uncompressed file, as tiktoken_ext.openai_public pins it
    pat_str: str
    special_tokens: dict[str, int]
    # The cookbook's tool-definition overheads (func_init differs by model family).
    func_init: int


# Copied from tiktoken_ext/openai_public.py (tiktoken 0.14.0, MIT);
# tests/test_exact_tokens.py checks them against tiktoken's own.
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SHIPPED: dict[str, _Shipped] = {
    "o200k_base": _Shipped(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        func_init=7,
    ),
    "cl100k_base": _Shipped(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PATTERN,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        func_init=10,
    ),
}


class TextEncoding(Protocol):
    """What the gateway uses of a `tiktoken.Encoding`."""

    @property
    def name(self) -> str: ...

    def encode_ordinary(self, text: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class ChatCount:
    """Input tokens of a request; `exact` when nothing in it was approximated."""

    tokens: int
    exact: bool


_lock = threading.Lock()
_encodings: dict[str, TextEncoding | None] = {}
# Model id -> encoding name (None: no shipped encoding), filled on first use.
_model_encodings: dict[str, str | None] = {}


def _tiktoken() -> Any:
    try:
        return importlib.import_module("tiktoken")
    except ImportError:
        return None


def encoding_name(model: str) -> str | None:
    """The shipped encoding `model` uses, per tiktoken's table; None if none (or no tiktoken)."""
    try:
        return _model_encodings[model]
    except KeyError:
        pass
    tiktoken = _tiktoken()
    name: str | None = None
    if tiktoken is not None:
        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            name = None
    found = name if name in SHIPPED else None
    _model_encodings[model] = found
    return found


def read_ranks(name: str) -> dict[bytes, int]:
    """The shipped encoding's mergeable ranks; ValueError if the file is not tiktoken's."""
    packed = resources.files(_DATA_PACKAGE).joinpath(_DATA_FOLDER, f"{name}.tiktoken.gz")
    data = gzip.decompress(packed.read_bytes())
    if hashlib.sha256(data).hexdigest() != SHIPPED[name].sha256:
        raise ValueError(f"{name}.tiktoken.gz is not the encoding tiktoken pins")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str) -> TextEncoding | None:
    tiktoken = _tiktoken()
    if tiktoken is None:
        log.info("tiktoken is not installed: OpenAI token counts are estimates")
        return None
    shipped = SHIPPED[name]
    try:
        ranks = read_ranks(name)
    except (OSError, ValueError) as err:
        # A package built without its data, or a damaged file: estimate instead.
        log.warning(
            "cannot load the %s encoding (%s): OpenAI token counts are estimates", name, err
        )
        return None
    encoding: TextEncoding = tiktoken.Encoding(
        name=name,
        pat_str=shipped.pat_str,
        mergeable_ranks=ranks,
        special_tokens=shipped.special_tokens,
    )
    return encoding


def load(name: str) -> TextEncoding | None:
    """The shipped encoding `name`, loaded on first use (blocking); None if unavailable."""
    try:
        return _encodings[name]
    except KeyError:
        pass
    with _lock:
        if name not in _encodings:
            _encodings[name] = _build(name)
        return _encodings[name]


def encoding_for(model: str) -> TextEncoding | None:
    """The encoding of `model`, loaded if need be (blocking); None when there is no exact count."""
    name = encoding_name(model)
    return None if name is None else load(name)


# -- Counting -----------------------------------------------------------------


class _ChatCounter:
    """Adds up a request the way the OpenAI provider's codec sends it."""

    def __init__(self, encoding: TextEncoding) -> None:
        self._encoding = encoding
        self.tokens = REPLY_PRIMING_TOKENS
        self.exact = True

    def text(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text)) if text else 0

    def message(self, role: str, content: int) -> None:
        self.tokens += TOKENS_PER_MESSAGE + self.text(role) + content

    def system(self, blocks: Sequence[TextBlock]) -> None:
        # Several blocks go as content parts, whose rendering is not published.
        self.exact &= len(blocks) == 1
        self.message("system", sum(self.text(b.text) for b in blocks))

    def user(self, message: Message) -> None:
        parts = 0
        content = 0
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                texts = [b.text for b in block.content if isinstance(b, TextBlock)]
                text = "\n".join(texts)
                self.exact = False
                self.message("tool", self.text(f"Error: {text}" if block.is_error else text))
            elif isinstance(block, TextBlock):
                parts += 1
                content += self.text(block.text)
            elif isinstance(block, ImageBlock):
                parts += 1
                self.exact = False
                content += IMAGE_TOKENS
        if parts:
            self.exact &= parts == 1
            self.message("user", content)

    def assistant(self, message: Message) -> None:
        # Texts are joined into one string; thinking is not sent to Chat Completions.
        text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
        content = self.text(text)
        for block in message.content:
            if isinstance(block, ToolUseBlock):
                self.exact = False
                content += TOKENS_PER_MESSAGE + self.text(block.name)
                content += self.text(json.dumps(block.input))
            elif isinstance(block, ImageBlock):
                self.exact = False
                content += IMAGE_TOKENS
        self.message("assistant", content)

    def tools(self, tools: Sequence[Tool], func_init: int) -> None:
        """The cookbook's formula for function definitions (checked there on a flat schema)."""
        if not tools:
            return
        self.exact = False
        for tool in tools:
            self.tokens += func_init + self.text(
                f"{tool.name}:{tool.description.removesuffix('.')}"
            )
            properties = tool.input_schema.get("properties") or {}
            if properties:
                self.tokens += 3  # prop_init
            for key, spec in properties.items():
                spec = spec if isinstance(spec, dict) else {}
                self.tokens += 3  # prop_key
                enum = spec.get("enum")
                if isinstance(enum, list):
                    self.tokens += -3 + sum(3 + self.text(str(item)) for item in enum)
                kind = spec.get("type", "")
                description = str(spec.get("description", "")).removesuffix(".")
                self.tokens += self.text(f"{key}:{kind}:{description}")
                # The cookbook does not count nested schemas: their JSON, as a pad.
                rest = {k: v for k, v in spec.items() if k not in ("type", "description", "enum")}
                if rest:
                    self.tokens += self.text(json.dumps(rest))
        self.tokens += 12  # func_end


def count_chat(
    encoding: TextEncoding,
    system: Sequence[TextBlock],
    messages: Iterable[Message],
    tools: Sequence[Tool],
) -> ChatCount:
    """Input tokens of a Chat Completions request, with `encoding` (blocking)."""
    counter = _ChatCounter(encoding)
    if system:
        counter.system(system)
    for message in messages:
        if message.role is Role.USER:
            counter.user(message)
        else:
            counter.assistant(message)
    counter.tools(tools, SHIPPED[encoding.name].func_init)
    return ChatCount(counter.tokens, counter.exact)


def _blocks_chars(blocks: Iterable[ContentBlock]) -> int:
    total = 0
    for block in blocks:
        if isinstance(block, TextBlock | ThinkingBlock):
            total += len(block.text)
        elif isinstance(block, ToolResultBlock):
            total += _blocks_chars(block.content)
        elif isinstance(block, ToolUseBlock):
            return INLINE_MAX_CHARS + 1  # its size is not known without serializing it
    return total


def _small(system: Sequence[TextBlock], messages: Sequence[Message], tools: Sequence[Tool]) -> bool:
    if tools:
        return False
    total = _blocks_chars(system)
    for message in messages:
        total += _blocks_chars(message.content)
        if total > INLINE_MAX_CHARS:
            return False
    return total <= INLINE_MAX_CHARS


def _count_blocking(
    model: str, system: Sequence[TextBlock], messages: Sequence[Message], tools: Sequence[Tool]
) -> ChatCount | None:
    encoding = encoding_for(model)
    return None if encoding is None else count_chat(encoding, system, messages, tools)


async def count_request(
    model: str,
    system: Sequence[TextBlock],
    messages: Sequence[Message],
    tools: Sequence[Tool],
) -> ChatCount | None:
    """Input tokens of a request to `model` (its upstream name); None without an exact tokenizer.

    Counts on the event loop only when the encoding is loaded and the request
    is small; otherwise in a thread.
    """
    name = _model_encodings.get(model, "")
    if name is None:
        return None
    if name in _encodings:
        encoding = _encodings[name]
        if encoding is None:
            return None
        if _small(system, messages, tools):
            return count_chat(encoding, system, messages, tools)
    # A model or encoding not seen yet (imports tiktoken, loads), or a large request.
    return await asyncio.to_thread(_count_blocking, model, system, messages, tools)
