"""The context-window check: input plus max_tokens must fit the model's window.

Done before any upstream call, with the gateway's token estimate
(server/token_estimate.py), against each deployment's own limits: a route
whose first deployment is too small goes on to a larger one; when none is
large enough the call is refused with INVALID_ARGUMENT. The estimate is
computed only when a cheap bound (one token at most per character) cannot
already show that the request fits, so ordinary requests pay a few len()s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from server.errors import ContextWindowExceededError, FieldViolation, InvalidArgumentError
from server.routing.route import Deployment
from server.schema import (
    ContentBlock,
    GenerationRequest,
    ImageBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from server.token_estimate import IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS, count_request


def estimated_input_tokens(request: GenerationRequest) -> int:
    return count_request(request.system, request.messages, request.tools)


def _chars(blocks: Iterable[ContentBlock]) -> int:
    total = 0
    for block in blocks:
        if isinstance(block, TextBlock | ThinkingBlock):
            total += len(block.text)
        elif isinstance(block, ImageBlock):
            total += IMAGE_TOKENS
        elif isinstance(block, ToolUseBlock):
            total += len(block.name) + len(json.dumps(block.input))
        elif isinstance(block, ToolResultBlock):
            total += _chars(block.content)
    return total


def input_token_bound(request: GenerationRequest) -> int:
    """An upper bound of the estimate: every estimated token is at least one character."""
    total = _chars(request.system)
    for message in request.messages:
        total += MESSAGE_OVERHEAD_TOKENS + _chars(message.content)
    for tool in request.tools:
        total += MESSAGE_OVERHEAD_TOKENS + len(tool.name) + len(tool.description)
        total += len(json.dumps(tool.input_schema))
    return total


def fitting(deployments: Sequence[Deployment], request: GenerationRequest) -> list[Deployment]:
    """The deployments whose limits the request fits, in their order.

    Raises ContextWindowExceededError when there is none.
    """
    max_tokens = request.max_tokens
    smallest = min(d.model.context_window for d in deployments)
    if input_token_bound(request) + max_tokens <= smallest and all(
        max_tokens <= d.model.max_output_tokens for d in deployments
    ):
        return list(deployments)
    tokens = estimated_input_tokens(request)
    fit = [
        d
        for d in deployments
        if tokens + max_tokens <= d.model.context_window and max_tokens <= d.model.max_output_tokens
    ]
    if fit:
        return fit
    largest = max(deployments, key=lambda d: d.model.context_window).model
    widest = max(deployments, key=lambda d: d.model.max_output_tokens).model
    window = largest.context_window
    # The messages are Anthropic's own, word for word: clients such as Claude
    # Code read them to lower max_tokens, or to compact the conversation.
    if max_tokens > widest.max_output_tokens:
        limit = widest.max_output_tokens
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "max_tokens",
                    f"{max_tokens} exceeds the {limit} output tokens of model {widest.id!r}",
                )
            ],
            f"max_tokens: {max_tokens} > {limit}, which is the maximum allowed number of"
            f" output tokens for {widest.id}",
        )
    violation = FieldViolation(
        "messages",
        f"about {tokens} input tokens plus max_tokens {max_tokens} exceed the"
        f" {window}-token context window of model {largest.id!r}",
    )
    if tokens >= window:
        message = f"prompt is too long: {tokens} tokens > {window} maximum"
    else:
        message = (
            f"input length and `max_tokens` exceed context limit: {tokens} + {max_tokens}"
            f" > {window}, decrease input length or `max_tokens` and try again"
        )
    raise ContextWindowExceededError([violation], message)
