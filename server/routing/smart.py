"""Smart routing: the `auto` alias picks a tier of model from the request.

The tier is, in order of precedence: the caller's explicit hint (a request
tag, `tier` by default); else `large` for long inputs, `medium` for
medium-length inputs, code, tools or images, and `small` otherwise; then
capped at `small` for keys with a low budget. Tiers not configured fall to
the nearest configured one (upwards first). The decision and its reason are
logged and kept on the call's record (server/routing/attempts.py).
"""

from __future__ import annotations

import re

from server.config import SmartRoutingConfig, Tier
from server.identity import current_identity
from server.routing.context_window import estimated_input_tokens
from server.schema import GenerationRequest, ImageBlock, TextBlock, ToolResultBlock

TIERS: tuple[Tier, ...] = ("small", "medium", "large")

# Fenced code, or a line that starts like code in the common languages.
_CODE = re.compile(
    r"```|^\s*(?:def|class|import|from \S+ import|function|const|let|var|fn|func|public|"
    r"private|#include|SELECT|package)\b.*[:;{(=]",
    re.MULTILINE,
)


def _texts(request: GenerationRequest) -> list[str]:
    texts = [b.text for b in request.system]
    for message in request.messages:
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolResultBlock):
                texts.extend(b.text for b in block.content if isinstance(b, TextBlock))
    return texts


def _has_images(request: GenerationRequest) -> bool:
    return any(
        isinstance(block, ImageBlock)
        or (
            isinstance(block, ToolResultBlock)
            and any(isinstance(b, ImageBlock) for b in block.content)
        )
        for message in request.messages
        for block in message.content
    )


def choose_tier(
    request: GenerationRequest, config: SmartRoutingConfig, budget_nanos: int | None = None
) -> tuple[Tier, str]:
    """The tier for a request, and why (one short phrase)."""
    tier: Tier
    hint = request.metadata.tags.get(config.hint_tag, "").strip().lower()
    if hint in TIERS:
        tier, reason = hint, f"hint {config.hint_tag}={hint}"
    else:
        # A request whose length alone makes it large is not tokenized.
        tokens = estimated_input_tokens(request, enough=config.large_input_tokens)
        if tokens >= config.large_input_tokens:
            tier, reason = "large", f"about {tokens} input tokens"
        elif tokens >= config.medium_input_tokens:
            tier, reason = "medium", f"about {tokens} input tokens"
        elif request.tools:
            tier, reason = "medium", "tools"
        elif _has_images(request):
            tier, reason = "medium", "images"
        elif any(_CODE.search(text) for text in _texts(request)):
            tier, reason = "medium", "code"
        else:
            tier, reason = "small", f"short request (about {tokens} input tokens)"
    if (
        config.low_budget_nanos is not None
        and budget_nanos is not None
        and budget_nanos < config.low_budget_nanos
        and tier != "small"
    ):
        tier, reason = "small", f"{reason}; capped by the key's low budget"
    return tier, reason


def configured_tier(tier: Tier, config: SmartRoutingConfig) -> Tier:
    """The tier to use when `tier` has no model: the next larger, else the next smaller."""
    if tier in config.tiers:
        return tier
    at = TIERS.index(tier)
    for candidate in (*TIERS[at + 1 :], *reversed(TIERS[:at])):
        if candidate in config.tiers:
            return candidate
    raise AssertionError("smart routing needs at least one tier")  # config validation


def caller_budget_nanos() -> int | None:
    """The budget of the calling key, if it has one."""
    identity = current_identity()
    return identity.limits.budget_nanos if identity is not None else None
