"""Placeholders that stay the same for a whole conversation, and putting values back.

`mask` replaces each value with `<ENTITY_TYPE_n>`, numbered per type in the
order values first appear in the request: system text, then the messages in
order. A conversation only grows at its end, so every turn numbers the
values of the turns before it the same way, and the masked prefix, which a
provider's prompt cache keys on, does not change. The gateway keeps no
state between calls for this: the numbering is a function of the request.

With `restore: true` the answer's placeholders are replaced by the values
they stand for (for the caller's eyes and for the tools it runs).

Overlapping findings are resolved first (the longer, then the higher-scoring
one wins), then values are replaced by their offsets, in text order. Not
with presidio-anonymizer: its engine took 35 us per block with findings,
7 ms of a 200-block transcript resent under `mask` (bench/guardrails.py),
for what is a join of slices here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from server.guardrails.policy import REDACT
from server.guardrails.scanner import Finding

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*?)_(\d+)>")
# An unfinished placeholder at the end of a streamed text: held back until it ends.
UNFINISHED_PLACEHOLDER = re.compile(r"<[A-Z0-9_]{0,40}$")


class Pseudonyms:
    """One conversation's values and their placeholders."""

    __slots__ = ("_by_value", "_counts", "_values")

    def __init__(self) -> None:
        self._by_value: dict[str, str] = {}
        self._values: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def placeholder(self, entity_type: str, value: str) -> str:
        found = self._by_value.get(value)
        if found is None:
            number = self._counts.get(entity_type, 0) + 1
            self._counts[entity_type] = number
            found = self._by_value[value] = f"<{entity_type}_{number}>"
            self._values[found] = value
        return found

    def copy(self) -> Pseudonyms:
        """A snapshot: later placeholders are not in it."""
        other = Pseudonyms()
        other._by_value = dict(self._by_value)
        other._values = dict(self._values)
        other._counts = dict(self._counts)
        return other

    def __bool__(self) -> bool:
        return bool(self._values)

    def restore(self, text: str) -> str:
        """`text` with each known placeholder replaced by its value."""
        if "<" not in text or not self._values:
            return text
        return PLACEHOLDER.sub(lambda m: self._values.get(m.group(0), m.group(0)), text)

    def restore_json(self, text: str) -> str:
        """Like restore, in JSON text: values are put back JSON-escaped."""
        if "<" not in text or not self._values:
            return text

        def value(match: re.Match[str]) -> str:
            original = self._values.get(match.group(0))
            return match.group(0) if original is None else json.dumps(original)[1:-1]

        return PLACEHOLDER.sub(value, text)


def kept(findings: Iterable[Finding]) -> list[Finding]:
    """Findings without overlaps, in text order: of overlapping ones, the longest
    (then the highest score) stays."""
    ranked = sorted(findings, key=lambda f: (-(f.end - f.start), -f.score, f.start))
    chosen: list[Finding] = []
    for finding in ranked:
        if all(finding.end <= c.start or finding.start >= c.end for c in chosen):
            chosen.append(finding)
    return sorted(chosen, key=lambda f: f.start)


class Rewriter:
    """Applies `mask` or `redact` to texts, with one conversation's placeholders."""

    __slots__ = ("action", "pseudonyms")

    def __init__(self, action: str, pseudonyms: Pseudonyms) -> None:
        self.action = action
        self.pseudonyms = pseudonyms

    def rewrite(self, text: str, findings: Iterable[Finding]) -> str:
        chosen = kept(findings)
        if not chosen:
            return text
        pieces: list[str] = []
        at = 0
        for f in chosen:  # in text order: numbers are given in reading order
            pieces.append(text[at : f.start])
            if self.action != REDACT:
                pieces.append(self.pseudonyms.placeholder(f.entity_type, text[f.start : f.end]))
            at = f.end
        pieces.append(text[at:])
        return "".join(pieces)
