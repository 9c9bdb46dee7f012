"""The context-window check: input plus max_tokens must fit the model's window.

Done before any upstream call, with the gateway's token estimate
(server/token_estimate.py), against each deployment's own limits: a route
whose first deployment is too small goes on to a larger one; when none is
large enough the call is refused with INVALID_ARGUMENT. The estimate is
computed only when a cheap bound (one token at most per character) cannot
already show that the request fits, so ordinary requests pay a few len()s,
and not when the floor (a token per 4 characters, which the estimate is
never below) already shows that it fits nowhere: a request far beyond every
window is refused by its length, without tokenizing.

A long request whose estimate a check will need is estimated earlier, by
`estimate_ahead`, which admission (server/accounting/admission.py) awaits
on every generation call before routing: it counts a slice per step of
server/loop_turns.py and remembers the counts for the rest of the call, so
that this check, smart routing and admission itself, which count
synchronously, find them instead of stalling the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import ContextWindowExceededError, FieldViolation, InvalidArgumentError
from server.routing.route import Deployment, Route
from server.schema import GenerationRequest
from server.token_estimate import (
    COUNT_AT_ONCE_CHARS,
    count_floor,
    count_pieces,
    count_request,
    count_request_async,
    remember_this_call,
)


def estimated_input_tokens(request: GenerationRequest, enough: int | None = None) -> int:
    """The estimated input tokens of `request`; with `enough`, a request whose
    floor alone reaches it is not tokenized: its floor is returned."""
    if enough is not None:
        floor = input_token_floor(request)
        if floor >= enough:
            return floor
    return count_request(request.system, request.messages, request.tools)


def input_token_bound(request: GenerationRequest) -> int:
    """An upper bound of the estimate: every estimated token is at least one character."""
    return count_request(request.system, request.messages, request.tools, len)


def input_token_floor(request: GenerationRequest) -> int:
    """A lower bound of the estimate, from the length of each text alone."""
    return count_request(request.system, request.messages, request.tools, count_floor)


async def estimate_ahead(
    request: GenerationRequest, route: Route, needed: bool = False
) -> int | None:
    """Estimates a long request now, without stalling the event loop, when a
    check of this call will need the estimate (`needed`: the caller's; this
    check's, when the cheap bound does not show a fit; smart routing's), and
    remembers the counts for the rest of the call; else None (a short request
    is counted where needed, in a few milliseconds).

    A request whose floor shows that it fits no deployment is not tokenized:
    its floor is returned, and `fitting` refuses it by its length.
    """
    remember_this_call()
    needed = needed or route.choose is not None
    if not needed and _relayed(request, route):
        return None  # its upstream checks its window (server/routing/router.py)
    bound = input_token_bound(request)
    if bound <= COUNT_AT_ONCE_CHARS:
        return None
    if not needed and _all_fit(route.deployments, request, bound):
        return None  # `fitting` does not estimate it
    floor = input_token_floor(request)
    if floor + request.max_tokens > max(d.model.context_window for d in route.deployments):
        return floor
    tokens = await count_request_async(request.system, request.messages, request.tools)
    # And the offline provider's tokenizer, which counts synchronously (its
    # usage): for ASCII text a tenth of the estimate's cost.
    await count_request_async(request.system, request.messages, request.tools, count_pieces)
    return tokens


def _relayed(request: GenerationRequest, route: Route) -> bool:
    """Whether every deployment would relay the request (the router does not
    check the window of a relayed request)."""
    passthrough = request.passthrough
    return passthrough is not None and all(
        passthrough.protocol in d.provider.relays for d in route.deployments
    )


def _all_fit(deployments: Sequence[Deployment], request: GenerationRequest, bound: int) -> bool:
    """Whether the cheap bound shows that the request fits every deployment."""
    max_tokens = request.max_tokens
    return bound + max_tokens <= min(d.model.context_window for d in deployments) and all(
        max_tokens <= d.model.max_output_tokens for d in deployments
    )


def fitting(deployments: Sequence[Deployment], request: GenerationRequest) -> list[Deployment]:
    """The deployments whose limits the request fits, in their order.

    Raises ContextWindowExceededError when there is none.
    """
    max_tokens = request.max_tokens
    if _all_fit(deployments, request, input_token_bound(request)):
        return list(deployments)
    window = max(d.model.context_window for d in deployments)
    # Beyond the largest window by its floor: refused by its length alone.
    floor = input_token_floor(request)
    at_least = floor + max_tokens > window
    tokens = floor if at_least else estimated_input_tokens(request)
    fit = [
        d
        for d in deployments
        if tokens + max_tokens <= d.model.context_window and max_tokens <= d.model.max_output_tokens
    ]
    if fit:
        return fit
    largest = max(deployments, key=lambda d: d.model.context_window).model
    widest = max(deployments, key=lambda d: d.model.max_output_tokens).model
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
        f"{'at least' if at_least else 'about'} {tokens} input tokens plus max_tokens"
        f" {max_tokens} exceed the"
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
