"""The answer's side: masking, restoring, checking or counting as events pass.

Text is held back by a small window (`stream_window_chars`): a value split
between deltas is seen whole before any of it leaves, and a value still
growing at the window's edge (a key, a PEM block) keeps the cut before its
start. Each release is analysed in the scanner's pool; only text that has
passed goes on, masked or redacted (`mask`, `redact`) or as it is
(`block`, which ends the stream with GUARDRAIL_BLOCKED at the first
finding, before the text that holds it leaves). A tool call's input is held
until its block ends, then analysed string by string and sent as one delta.
`detect` holds nothing: it counts what the whole answer held once it ended.
A unary call (Generate, a non-streamed HTTP answer) goes through the same
code, so it is masked before it is returned.

Relayed answers (a pass-through request served by a provider of its own
format: RawChunk events, the upstream's bytes, which the HTTP edge writes
instead of encoding the events): when the answer must change (mask, redact,
restore), the relayed bytes are dropped and the edge encodes the guarded
events instead, as it does for a translated answer; under `block` the bytes
are held back with the text they carry and released once it has passed;
under `detect` they go through untouched. Thinking blocks, signatures and
every other event pass untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.errors import FieldViolation
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStop,
    RawChunk,
    StreamEvent,
    TextDelta,
    ToolInputDelta,
)
from server.guardrails.errors import GuardrailBlockedError, GuardrailUnavailableError
from server.guardrails.placeholders import PLACEHOLDER, UNFINISHED_PLACEHOLDER, Pseudonyms, Rewriter
from server.guardrails.policy import BLOCK, DETECT, MASK, REDACT, PiiPolicy
from server.guardrails.request_text import _replaced_json, _strings
from server.guardrails.scanner import Finding, Scanner, ScanResult
from server.schema import TextBlock, ToolUseBlock

log = logging.getLogger(__name__)

# (stage, counts by entity type, seconds analysing, failure or None, places)
Report = Callable[[str, dict[str, int], float, str | None, list[str]], None]


def needs_output_stage(policy: PiiPolicy, pseudonyms: Pseudonyms) -> bool:
    return policy.on_output or (policy.action == MASK and policy.restore and bool(pseudonyms))


class OutputGuard:
    """Guards one call's answer (see the module's docstring)."""

    def __init__(
        self,
        policy: PiiPolicy,
        scanner: Scanner,
        pseudonyms: Pseudonyms,
        *,
        window: int,
        incremental: bool,
        report: Report,
    ) -> None:
        self._policy = policy
        self._scanner = scanner
        action = policy.action if policy.on_output else None
        self._rewriter = Rewriter(action, pseudonyms) if action in (MASK, REDACT) else None
        # Only the request's own values come back, not ones the answer made up.
        self._restorer = (
            pseudonyms.copy() if policy.action == MASK and policy.restore and pseudonyms else None
        )
        self._check = action == BLOCK
        self._detect = action == DETECT
        self._changes = self._rewriter is not None or self._restorer is not None
        self._holds = self._changes or self._check
        self._window = window
        self._incremental = incremental
        self._report = report
        self._text: dict[int, str] = {}  # block index -> text held back
        self._json: dict[int, list[str]] = {}  # block index -> tool input held back
        self._seen_text: dict[int, list[str]] = {}  # detect: the answer's text
        self._counts: dict[str, int] = {}
        self._places: list[str] = []
        self._seconds = 0.0
        self._failure: str | None = None
        # Relayed bytes held under `block`: [bytes, characters of content up to
        # their end (None until the next RawChunk)], released once checked.
        self._raw: list[list[Any]] = []
        self._seen = 0
        self._cleared = 0

    async def events(self, upstream: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        try:
            async for event in upstream:
                for out in await self._on(event):
                    yield out
            for out in await self._flush():
                yield out
            if self._raw:
                for raw in self._raw:
                    yield RawChunk(raw[0])
                self._raw.clear()
            if self._detect:
                await self._detect_all()
        finally:
            if self._counts or self._failure:
                self._report("output", self._counts, self._seconds, self._failure, self._places)

    async def _on(self, event: StreamEvent) -> list[StreamEvent]:
        if isinstance(event, RawChunk):
            if self._changes:
                return []  # the edge encodes the guarded events instead
            if self._check:
                if self._raw and self._raw[-1][1] is None:
                    self._raw[-1][1] = self._seen
                self._raw.append([event.data, None])
                return self._released_raw()
            return [event]
        if isinstance(event, ContentBlockStart):
            if isinstance(event.block, TextBlock) and (self._holds or self._detect):
                self._text[event.index] = ""
                self._seen_text[event.index] = []
            elif isinstance(event.block, ToolUseBlock) and (self._holds or self._detect):
                self._json[event.index] = []
            return [event]
        if isinstance(event, TextDelta) and event.index in self._text:
            self._seen += len(event.text)
            if self._detect:
                self._seen_text[event.index].append(event.text)
                return [event]
            self._text[event.index] += event.text
            return await self._release(event.index, final=False)
        if isinstance(event, ToolInputDelta) and event.index in self._json:
            self._seen += len(event.partial_json)
            self._json[event.index].append(event.partial_json)
            return [event] if self._detect else []
        if isinstance(event, ContentBlockStop):
            out: list[StreamEvent] = []
            if event.index in self._text and not self._detect:
                out += await self._release(event.index, final=True)
                del self._text[event.index]
            if event.index in self._json and not self._detect:
                out += await self._tool_input(event.index)
            return [*out, event, *self._released_raw()]
        if isinstance(event, MessageDelta | MessageStop):
            # A relayed stream's typed events may have no ContentBlockStop.
            return [*await self._flush(), event, *self._released_raw()]
        return [event]

    async def _flush(self) -> list[StreamEvent]:
        """Releases every block still held (the answer is ending)."""
        out: list[StreamEvent] = []
        if self._detect:
            return out
        for index in list(self._text):
            out += await self._release(index, final=True)
            del self._text[index]
        for index in list(self._json):
            out += await self._tool_input(index)
        return out

    def _released_raw(self) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        while self._raw and self._raw[0][1] is not None and self._raw[0][1] <= self._cleared:
            out.append(RawChunk(self._raw.pop(0)[0]))
        return out

    async def _scan(self, texts: list[str]) -> list[tuple[Finding, ...]]:
        policy = self._policy
        result: ScanResult = await self._scanner.scan(
            texts, policy.entities, policy.score_threshold, cache=False
        )
        self._seconds += result.seconds
        if result.failure is not None:
            self._failure = result.failure
            if policy.fails_closed and not self._detect:
                raise GuardrailUnavailableError(
                    f"the PII guardrail could not check the answer ({result.failure})"
                )
            log.warning("guardrail: answer not checked (%s); on_error: allow", result.failure)
        return [found or () for found in result.findings]

    def _count(self, findings: tuple[Finding, ...] | list[Finding], place: str) -> None:
        for f in findings:
            self._counts[f.entity_type] = self._counts.get(f.entity_type, 0) + 1
        if findings and place not in self._places:
            self._places.append(place)

    async def _release(self, index: int, *, final: bool) -> list[StreamEvent]:
        text = self._text[index]
        window = self._window
        if not text or (not final and (not self._incremental or len(text) < 2 * window)):
            return []
        findings: tuple[Finding, ...] = ()
        if self._rewriter is not None or self._check:
            (findings,) = await self._scan([text])
        cut = len(text) if final else len(text) - window
        moved = True
        while moved:  # no value cut in two
            moved = False
            for f in findings:
                if f.start < cut < f.end:
                    cut, moved = f.start, True
            if self._restorer is not None and not final:
                for m in PLACEHOLDER.finditer(text, max(0, cut - 64), cut + 64):
                    if m.start() < cut < m.end():
                        cut, moved = m.start(), True
                tail = UNFINISHED_PLACEHOLDER.search(text, 0, cut)
                if tail is not None:
                    cut, moved = tail.start(), True
        if self._check and findings:
            self._count(findings, f"content[{index}]")
            kinds = ", ".join(sorted({f.entity_type for f in findings}))
            raise GuardrailBlockedError(
                [FieldViolation(f"content[{index}]", f"contains {kinds}")], what="answer"
            )
        released = [f for f in findings if f.end <= cut]
        piece = text[:cut]
        self._text[index] = text[cut:]
        self._cleared += cut
        if self._rewriter is not None and released:
            self._count(released, f"content[{index}]")
            piece = self._rewriter.rewrite(piece, released)
        if self._restorer is not None:
            piece = self._restorer.restore(piece)
        return [TextDelta(index, piece)] if piece else []

    async def _tool_input(self, index: int) -> list[StreamEvent]:
        raw = "".join(self._json.pop(index))
        self._cleared += len(raw)
        if not raw:
            return []
        try:
            value = json.loads(raw)
        except ValueError:
            # Not JSON: the fold will refuse it anyway; put back what we may.
            restored = self._restorer.restore_json(raw) if self._restorer else raw
            return [ToolInputDelta(index, restored)]
        place = f"content[{index}].input"
        if self._rewriter is not None or self._check:
            strings = list(_strings(value, place))
            found = await self._scan([text for _, text in strings])
            by_path = {path: f for (path, _), f in zip(strings, found, strict=True) if f}
            if by_path:
                for path, f in by_path.items():
                    self._count(f, path)
                if self._check:
                    kinds = ", ".join(sorted({x.entity_type for f in by_path.values() for x in f}))
                    raise GuardrailBlockedError(
                        [FieldViolation(p, f"contains {kinds}") for p in by_path], what="answer"
                    )
                rewriter = self._rewriter
                assert rewriter is not None
                value = _replaced_json(
                    value,
                    place,
                    lambda path, text: (
                        rewriter.rewrite(text, by_path[path]) if path in by_path else text
                    ),
                )
        if self._restorer is not None:
            restorer = self._restorer
            value = _replaced_json(value, place, lambda _, text: restorer.restore(text))
        return [ToolInputDelta(index, json.dumps(value, ensure_ascii=False))]

    async def _detect_all(self) -> None:
        places: list[str] = []
        texts: list[str] = []
        for index, parts in self._seen_text.items():
            places.append(f"content[{index}]")
            texts.append("".join(parts))
        for index, parts in self._json.items():
            try:
                value = json.loads("".join(parts) or "{}")
            except ValueError:
                continue
            for path, text in _strings(value, f"content[{index}].input"):
                places.append(path)
                texts.append(text)
        if not texts:
            return
        for place, findings in zip(places, await self._scan(texts), strict=True):
            self._count(findings, place)
