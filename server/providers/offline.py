"""The offline provider: deterministic replies with no network and no keys.

It is the embedded default, so a fresh gateway serves model `echo` with no
configuration, and it is a test double for services that call the gateway:
scripted replies (match the last user message, answer with text and/or tool
calls) give a consumer's CI a deterministic LLM. It streams for real, one
token piece per chunk (server/token_estimate.py), honours `max_tokens` and
stop sequences, and reports usage.

Provider options it reads: `chunk_delay_ms`, the interval between chunks.
Chunks follow a fixed timeline (chunk i at i * interval after the first),
as a model emits tokens at its own pace, so time the gateway spends sending
one chunk does not push back the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from server import token_estimate
from server.errors import FieldViolation, InvalidArgumentError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    StreamEvent,
    TextDelta,
    ToolInputDelta,
)
from server.providers.base import Provider, ProviderSettings
from server.schema import (
    Capabilities,
    GenerationRequest,
    Message,
    ModelInfo,
    Role,
    StopReason,
    TextBlock,
    TokenCount,
    TokenCountRequest,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)


class OfflineModel(ProviderSettings):
    id: str
    display_name: str = ""
    aliases: list[str] = []
    context_window: int = Field(128_000, gt=0)
    max_output_tokens: int = Field(8_192, gt=0)
    default_max_tokens: int = Field(4_096, gt=0)


class ScriptMatch(ProviderSettings):
    """Exactly one of: the whole text equals, contains, or matches a regex."""

    equals: str | None = None
    contains: str | None = None
    regex: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if sum(x is not None for x in (self.equals, self.contains, self.regex)) != 1:
            raise ValueError("give exactly one of equals, contains, regex")
        return self

    def matches(self, text: str) -> bool:
        if self.equals is not None:
            return text == self.equals
        if self.contains is not None:
            return self.contains in text
        return re.search(self.regex or "", text) is not None


class ScriptToolCall(ProviderSettings):
    name: str
    input: dict[str, Any] = {}


class ScriptReply(ProviderSettings):
    text: str = ""
    tool_calls: list[ScriptToolCall] = []
    # Forces a stop reason, e.g. "refusal", to test how a service handles it.
    stop_reason: Literal["end_turn", "refusal", "content_filter", "pause_turn"] | None = None


class Script(ProviderSettings):
    """A canned reply: the first script whose `match` fits the last user message wins."""

    match: ScriptMatch | None = None  # None matches everything
    models: list[str] = []  # empty: every offline model
    reply: ScriptReply


class OfflineSettings(ProviderSettings):
    models: list[OfflineModel] = [OfflineModel(id="echo", display_name="Echo (offline)")]
    scripts: list[Script] = []
    chunk_delay_ms: float = Field(0.0, ge=0)


@dataclass(slots=True)
class _Plan:
    text: str
    tool_calls: list[ToolUseBlock]
    stop_reason: StopReason
    stop_sequence: str
    output_tokens: int


class OfflineProvider(Provider):
    """Echoes the last user message, or answers from configured scripts."""

    kind = "offline"
    Settings = OfflineSettings
    # Consumers' tests may rely on one chunk per token piece.
    exact_chunks = True

    def __init__(self, name: str, settings: OfflineSettings) -> None:
        super().__init__(name)
        self._settings = settings
        self._models = [
            ModelInfo(
                id=m.id,
                provider=name,
                display_name=m.display_name or m.id,
                aliases=tuple(m.aliases),
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                default_max_tokens=min(m.default_max_tokens, m.max_output_tokens),
                capabilities=Capabilities(streaming=True, tools=True, images=True),
            )
            for m in settings.models
        ]

    @classmethod
    def create(cls, name: str, settings: Any) -> OfflineProvider:
        return cls(name, settings)

    def models(self) -> Sequence[ModelInfo]:
        return self._models

    async def count_tokens(self, request: TokenCountRequest) -> TokenCount:
        count = token_estimate.count_request(
            request.system, request.messages, request.tools, token_estimate.count_pieces
        )
        return TokenCount(input_tokens=count, estimated=False)

    def refusal(self, request: GenerationRequest) -> InvalidArgumentError | None:
        try:
            _chunk_delay_seconds(request.provider_options, self._settings.chunk_delay_ms)
        except InvalidArgumentError as err:
            return err
        return None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        plan = self._plan(request)
        input_tokens = token_estimate.count_request(
            request.system, request.messages, request.tools, token_estimate.count_pieces
        )
        interval = _chunk_delay_seconds(request.provider_options, self._settings.chunk_delay_ms)
        clock = asyncio.get_running_loop().time
        due = clock()

        yield MessageStart(
            id=f"msg_{os.urandom(12).hex()}",
            model=request.model,
            provider=self.name,
            request_id=request.request_id,
            usage=Usage(input_tokens=input_tokens),
        )
        index = 0
        if plan.text:
            yield ContentBlockStart(index, TextBlock(""))
            if request.incremental or interval:
                for piece in token_estimate.split_pieces(plan.text):
                    if interval:
                        due += interval
                        await asyncio.sleep(max(0.0, due - clock()))
                    yield TextDelta(index, piece)
            else:
                # A whole answer (Generate) on no timeline: one delta folds the same
                # as a delta a piece, for less work per call (as an SDK provider's).
                yield TextDelta(index, plan.text)
            yield ContentBlockStop(index)
            index += 1
        for call in plan.tool_calls:
            yield ContentBlockStart(index, ToolUseBlock(id=call.id, name=call.name))
            encoded = json.dumps(call.input, separators=(",", ":"))
            # Two fragments, as real providers split tool input across deltas.
            middle = len(encoded) // 2
            for fragment in (encoded[:middle], encoded[middle:]):
                if interval:
                    due += interval
                    await asyncio.sleep(max(0.0, due - clock()))
                yield ToolInputDelta(index, fragment)
            yield ContentBlockStop(index)
            index += 1
        yield MessageDelta(
            stop_reason=plan.stop_reason,
            stop_sequence=plan.stop_sequence,
            usage=Usage(input_tokens=input_tokens, output_tokens=plan.output_tokens),
        )
        yield MessageStop()

    def _plan(self, request: GenerationRequest) -> _Plan:
        prompt = _last_user_text(request.messages)
        script = next(
            (
                s
                for s in self._settings.scripts
                if (not s.models or request.model in s.models)
                and (s.match is None or s.match.matches(prompt))
            ),
            None,
        )
        text = script.reply.text if script else prompt
        calls = script.reply.tool_calls if script else []
        forced = (
            StopReason(script.reply.stop_reason) if script and script.reply.stop_reason else None
        )

        stop_reason: StopReason | None = None
        stop_sequence = ""
        cut = min(
            ((pos, seq) for seq in request.stop_sequences if (pos := text.find(seq)) >= 0),
            default=None,
        )
        if cut is not None:
            text, stop_reason, stop_sequence = text[: cut[0]], StopReason.STOP_SEQUENCE, cut[1]

        pieces = token_estimate.split_pieces(text)
        if len(pieces) > request.max_tokens:
            pieces = pieces[: request.max_tokens]
            text, stop_reason, stop_sequence = "".join(pieces), StopReason.MAX_TOKENS, ""
        output_tokens = token_estimate.count_pieces(text)

        tool_calls: list[ToolUseBlock] = []
        if stop_reason is None:
            for position, call in enumerate(calls):
                cost = token_estimate.count_pieces(call.name) + token_estimate.count_pieces(
                    json.dumps(call.input)
                )
                if output_tokens + cost > request.max_tokens:
                    stop_reason = StopReason.MAX_TOKENS
                    break
                output_tokens += cost
                digest = hashlib.sha256(f"{prompt}\0{call.name}\0{position}".encode()).hexdigest()
                tool_calls.append(
                    ToolUseBlock(id=f"toolu_{digest[:24]}", name=call.name, input=call.input)
                )
        if stop_reason is None:
            stop_reason = forced or (StopReason.TOOL_USE if tool_calls else StopReason.END_TURN)
        return _Plan(text, tool_calls, stop_reason, stop_sequence, output_tokens)


def _chunk_delay_seconds(options: dict[str, Any], default_ms: float) -> float:
    value = options.get("chunk_delay_ms", default_ms)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 60_000:
        raise InvalidArgumentError(
            [FieldViolation("provider_options.chunk_delay_ms", "must be a number from 0 to 60000")]
        )
    return value / 1000


def _last_user_text(messages: list[Message]) -> str:
    """The text of the last user message (tool results included), joined by newlines."""
    for message in reversed(messages):
        if message.role is Role.USER:
            parts: list[str] = []
            for block in message.content:
                if isinstance(block, TextBlock):
                    parts.append(block.text)
                elif isinstance(block, ToolResultBlock):
                    parts.extend(b.text for b in block.content if isinstance(b, TextBlock))
            return "\n".join(parts)
    return ""
