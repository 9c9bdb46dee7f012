"""What the three JSON decoders (Messages, Chat Completions, Responses) share.

Each reads a body in one pass while collecting, rather than raising, what it
meets: hard violations (raised together at the end), what a translation to
another API would lose (`untranslatable`), and hints a translation leaves out
(`dropped`). A dialect's decoder subclasses FieldCollector and says how its
API spells "left out" (`empty`) and what its untranslatable fields are told.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, TypeGuard

from server.errors import FieldViolation, InvalidArgumentError
from server.schema import UNPRICED_SERVICE_TIER, UNPRICED_SERVICE_TIERS


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return is_int(value)


def compact(value: Any) -> str:
    """JSON without spaces (a stand-in's text for the token estimate); "" when
    the value cannot be encoded (digits past the int limit, deep nesting)."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return ""


class FieldCollector:
    """Collects a body's violations, untranslatable fields and dropped hints."""

    __slots__ = ("dropped", "untranslatable", "violations")

    # What an untranslatable field is told, by default.
    UNTRANSLATABLE: ClassVar[str]

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []
        self.untranslatable: list[FieldViolation] = []
        self.dropped: list[str] = []

    @staticmethod
    def empty(value: Any) -> bool:
        """None, [] and {}: what the APIs treat as a field left out."""
        return value is None or (isinstance(value, list | dict) and not value)

    def bad(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def unsupported(self, field: str, description: str | None = None) -> None:
        self.untranslatable.append(FieldViolation(field, description or self.UNTRANSLATABLE))

    def raise_if_invalid(self) -> None:
        if self.violations:
            raise InvalidArgumentError(self.violations)

    def extras(
        self,
        raw: dict[str, Any],
        known: frozenset[str],
        path: str,
        droppable: frozenset[str] = frozenset(),
    ) -> None:
        """Lists the keys of `raw` outside `known` that carry a value: as dropped when
        they are only hints (`droppable`), as untranslatable otherwise."""
        for key, value in raw.items():
            if key not in known and not self.empty(value):
                field = f"{path}.{key}" if path else key
                if key in droppable:
                    self.dropped.append(field)
                else:
                    self.unsupported(field)


def refuse_unpriced_tier(d: FieldCollector, body: dict[str, Any]) -> None:
    """A `service_tier` the gateway does not price (server/schema.py) is refused."""
    tier = body.get("service_tier")
    if isinstance(tier, str) and tier in UNPRICED_SERVICE_TIERS:
        d.bad("service_tier", UNPRICED_SERVICE_TIER.format(tier=tier))
