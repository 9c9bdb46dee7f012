"""The refusals a guardrail makes: each names entity types and places, never values."""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import FieldViolation, InvalidArgumentError, UnavailableError


class GuardrailBlockedError(InvalidArgumentError):
    """The request (or the answer) holds what the `block` action refuses.

    INVALID_ARGUMENT (HTTP 400); each field violation names a place
    (`messages[3].content[0]`) and the entity types found there.
    """

    reason = "GUARDRAIL_BLOCKED"

    def __init__(self, violations: Sequence[FieldViolation], what: str = "request") -> None:
        listed = "; ".join(f"{v.field} {v.description}" for v in violations[:LISTED_PLACES])
        more = len(violations) - LISTED_PLACES
        super().__init__(
            violations,
            f"the {what} was blocked by the PII guardrail: {listed}"
            + (f" (and {more} more place{'s' if more > 1 else ''})" if more > 0 else ""),
        )


# Places named in the message (the HTTP edge's whole answer); BadRequest lists them all.
LISTED_PLACES = 5


class GuardrailScanBudgetError(InvalidArgumentError):
    """More new text than `guardrails.max_scan_chars`, under `on_error: block`."""

    reason = "GUARDRAIL_SCAN_BUDGET"


class GuardrailUnavailableError(UnavailableError):
    """The analyzer failed or ran out of time, under `on_error: block`; a retry may pass."""

    reason = "GUARDRAIL_UNAVAILABLE"
