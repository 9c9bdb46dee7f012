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
        kinds = sorted({kind for v in violations for kind in _kinds(v.description)})
        super().__init__(
            violations,
            f"the {what} was blocked by the PII guardrail: it contains {', '.join(kinds)}"
            f" ({len(violations)} place{'s' if len(violations) != 1 else ''})",
        )


def _kinds(description: str) -> list[str]:
    # "contains EMAIL_ADDRESS, CREDIT_CARD"
    return [k.strip() for k in description.removeprefix("contains ").split(",") if k.strip()]


class GuardrailScanBudgetError(InvalidArgumentError):
    """More new text than `guardrails.max_scan_chars`, under `on_error: block`."""

    reason = "GUARDRAIL_SCAN_BUDGET"


class GuardrailUnavailableError(UnavailableError):
    """The analyzer failed or ran out of time, under `on_error: block`; a retry may pass."""

    reason = "GUARDRAIL_UNAVAILABLE"
