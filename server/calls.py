"""One record per generation call, handed to observers once the call is over.

The servicer opens a CallRecord when a Generate or StreamGenerate call
starts, fills it from the events as they pass (who served, time to first
token, cumulative usage and cost) and closes it exactly once on every way
out: success, a gateway error, an unexpected error, the caller cancelling
or its deadline passing. Closing hands it to each observer: the usage
ledger, metrics, the per-call log line. So whatever consumes "a call
happened" reads one record, filled in one place, and a cancelled or failed
stream is accounted for with the output it had produced.

Observers run synchronously on the event loop when the call ends: they
must not block (queue the work, as the ledger does). With
`ledger.durability: sync` an edge then awaits its Durability (the ledger's
commit of the row) before the caller hears how the call ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from server.costs import compute_cost
from server.errors import GatewayError, ShuttingDownError
from server.events import (
    MessageDelta,
    MessageStart,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.identity import current_identity
from server.schema import Cost, GenerationRequest, Pricing, StopReason, Usage
from server.token_estimate import count_request, count_text

log = logging.getLogger(__name__)

CallObserver = Callable[["CallRecord"], None]
# Awaited once a record is closed, before the caller is told the outcome: returns
# when the call's ledger row is committed (server/accounting: ledger.durability).
Durability = Callable[["CallRecord"], Awaitable[None]]
_CONTENT = (TextDelta, ToolInputDelta, ThinkingDelta, SignatureDelta)
# What a record keeps of delta texts not counted yet (CallRecord._count_later):
# a few KiB a call at most.
UNCOUNTED_DELTAS = 64
UNCOUNTED_CHARS = 4096


def new_call_id() -> str:
    """A unique call id that sorts by creation time: nanoseconds, then 48 random bits.

    The ledgers keep a unique index on it. Ids in time order are added at the
    right edge of that index; random ones land on random pages, which costs
    more as the ledger grows (SQLite, 60,000 rows in batches of 500: 12.4 us
    a row with random ids, 6.1 us with these).
    """
    return f"{time.time_ns():016x}{os.urandom(6).hex()}"


def random_id() -> str:
    """32 random hex digits: what `uuid.uuid4().hex` gives, without building a UUID
    (0.8 µs instead of 4.5; a call makes up to three: its request id, its hold,
    its concurrency slot)."""
    return os.urandom(16).hex()


@dataclass(slots=True)
class CallRecord:
    """What one generation call did. Times are time.monotonic() seconds."""

    method: str  # "Generate" or "StreamGenerate"
    request_id: str
    # Unique per call (request ids are the caller's and may repeat).
    call_id: str = field(default_factory=new_call_id)
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    key_id: str = ""
    model_requested: str = ""
    # Filled from MessageStart: who actually served the call.
    model_served: str = ""
    provider: str = ""
    upstream_request_id: str = ""
    response_id: str = ""  # the provider's id of the message (gen_ai.response.id)
    first_token_at: float | None = None
    usage: Usage = field(default_factory=Usage)
    cost: Cost = field(default_factory=Cost)
    stop_reason: StopReason | None = None
    status: grpc.StatusCode = grpc.StatusCode.OK
    error_reason: str = ""  # the ErrorInfo reason of a failed call
    ended_at: float | None = None
    # Prices of the routed model, set by the servicer once routed: they price
    # the partial output of a call that ends before its final usage arrives.
    pricing: Pricing | None = None
    # Output tokens counted from the deltas (server/token_estimate.py); the
    # usage of a stream cancelled or broken before its final MessageDelta.
    # Counted lazily (see `_count_later`): read `streamed_output_tokens`.
    counted_output_tokens: int = 0
    # Delta texts not counted yet, and their characters: a call whose final
    # usage arrives never counts them.
    uncounted: list[str] = field(default_factory=list, repr=False, compare=False)
    uncounted_chars: int = field(default=0, repr=False, compare=False)
    # What server/accounting/admission.py reserved (tokens, budget) for this
    # call; settled from this record when it closes.
    quota_hold: object | None = None
    final_usage: bool = False  # a MessageDelta carried the call's usage
    # The decoded request, set by the servicer: estimates its input tokens
    # when the upstream never reported them.
    request: GenerationRequest | None = None
    # The tokens (and so the cost) are the gateway's estimate, not the
    # provider's: it reported no usage, or the call ended before it did.
    usage_estimated: bool = False
    # The edge that served the call ("grpc" or "http"), and who the caller
    # says it is for (CallerMetadata.end_user_id, or Claude Code's session id).
    edge: str = "grpc"
    end_user: str = ""
    # The response cache's outcome (server/cache/): "hit", "miss", "bypass",
    # "refresh", or "" when the cache is off for the call's model. A hit
    # reached no upstream: it costs 0, and `cache_saved_nanos` is what the
    # answer cost when it was made; `cache_lookup_s` is the lookup's time.
    cache: str = ""
    cache_saved_nanos: int = 0
    cache_lookup_s: float | None = None

    def observe(self, event: StreamEvent) -> None:
        """Takes what matters for accounting from one event (cheap: runs per event)."""
        if isinstance(event, _CONTENT):
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if self.final_usage:
                return  # the provider's count is in: the deltas need none
            if isinstance(event, TextDelta | ThinkingDelta):
                self._count_later(event.text)
            elif isinstance(event, ToolInputDelta):
                self._count_later(event.partial_json)
        elif isinstance(event, MessageDelta):
            # Cumulative: the latest replaces, never adds.
            if event.usage is not None:
                self.usage = event.usage
                self.final_usage = True
                self.uncounted.clear()
                self.uncounted_chars = 0
            if event.cost is not None:
                self.cost = event.cost
            if event.stop_reason is not None:
                self.stop_reason = event.stop_reason
        elif isinstance(event, MessageStart):
            self.model_served = event.model
            self.provider = event.provider
            self.upstream_request_id = event.upstream_request_id
            self.response_id = event.id
            if event.pricing is not None:
                self.pricing = event.pricing
            if event.usage is not None:
                self.usage = event.usage

    def _count_later(self, text: str) -> None:
        """Keeps a delta's text to count if the call ends without its final usage.

        Counting a delta costs a few microseconds, per delta: most calls end
        with the provider's usage and never need the count. What waits is
        bounded (UNCOUNTED_DELTAS, UNCOUNTED_CHARS); beyond, it is counted
        then. Each delta counts on its own, as when it was counted on arrival.
        """
        uncounted = self.uncounted
        uncounted.append(text)
        self.uncounted_chars += len(text)
        if len(uncounted) >= UNCOUNTED_DELTAS or self.uncounted_chars >= UNCOUNTED_CHARS:
            self.counted_output_tokens += sum(map(count_text, uncounted))
            uncounted.clear()
            self.uncounted_chars = 0

    @property
    def streamed_output_tokens(self) -> int:
        """The estimated output tokens of the deltas observed so far."""
        return self.counted_output_tokens + sum(map(count_text, self.uncounted))

    @property
    def deployment(self) -> str:
        """The deployment that served, named as the router names it (provider/model)."""
        return f"{self.provider}/{self.model_served}" if self.provider else ""

    def _fill_missing_usage(self) -> None:
        """Estimates what the provider did not report, so no call that reached it is free.

        Runs when a call ends without its final usage: a stream cancelled,
        timed out or broken before the last event (OpenAI reports input tokens
        only there), or an upstream that reports no usage at all (some
        OpenAI-compatible servers). Output counts the deltas that passed; input
        is estimated from the request once an upstream started answering (its
        MessageStart passed). The row is flagged `usage_estimated`.
        """
        if self.final_usage or self.cache == "hit":
            return  # a hit is replayed, never estimated: it cost nothing
        usage = self.usage
        input_tokens = usage.input_tokens
        if not input_tokens and self.provider and self.request is not None:
            request = self.request
            input_tokens = count_request(request.system, request.messages, request.tools)
        output_tokens = max(usage.output_tokens, self.streamed_output_tokens)
        if (input_tokens, output_tokens) != (usage.input_tokens, usage.output_tokens):
            self.usage = Usage(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_read_input_tokens=usage.cache_read_input_tokens,
                cache_creation_input_tokens=usage.cache_creation_input_tokens,
            )
            self.usage_estimated = True
        elif self.cost.total_nanos:
            return
        if self.pricing is not None:
            self.cost = compute_cost(self.usage, self.pricing)

    @property
    def latency_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at


def open_record(method: str, model: str) -> CallRecord:
    """A record for a call starting now; the servicer sets its request id once known."""
    identity = current_identity()
    return CallRecord(
        method=method,
        request_id="",
        key_id=identity.key_id if identity is not None else "",
        model_requested=model,
    )


def close_record(
    record: CallRecord,
    observers: list[CallObserver],
    status: grpc.StatusCode,
    error_reason: str = "",
) -> None:
    """Ends the record and hands it to every observer (a failing observer is logged)."""
    if record.ended_at is not None:
        return
    record.ended_at = time.monotonic()
    record.status = status
    record.error_reason = error_reason
    record._fill_missing_usage()
    for observer in observers:
        try:
            observer(record)
        except Exception:
            log.exception("call observer %r failed (request_id=%s)", observer, record.request_id)


async def close_durably(
    record: CallRecord,
    observers: list[CallObserver],
    durable: Durability | None,
    status: grpc.StatusCode,
    error_reason: str = "",
) -> None:
    """close_record, then waits on `durable` (the ledger's commit of the row), if any.

    A record closed already is left alone: its row was waited on when it closed.
    """
    if record.ended_at is not None:
        return
    close_record(record, observers, status, error_reason)
    if durable is not None:
        # Right after the close, with no await between: the ledger waits for
        # the rows buffered so far, this call's the newest.
        await durable(record)


class Drain:
    """The gateway's drain, as the calls it cuts see it.

    Once the drain's grace has run out (or a second signal asks to exit), the
    server cancels the calls still in flight: their callers see UNAVAILABLE,
    and their records say so (SHUTTING_DOWN) rather than CANCELLED.
    """

    __slots__ = ("cutting",)

    def __init__(self) -> None:
        self.cutting = False


# A cancel that arrives with less than this left of the caller's deadline is
# recorded as DEADLINE_EXCEEDED: the caller's clock ran out, a few ms ahead
# of ours, and cancelled.
DEADLINE_SLACK_S = 0.1


@asynccontextmanager
async def accounted(
    record: CallRecord,
    observers: list[CallObserver],
    deadline: float | None,
    *,
    durable: Durability | None = None,
    drain: Drain | None = None,
) -> AsyncIterator[None]:
    """Closes `record` with the call's outcome, whichever way the call ends.

    Each edge runs its call inside this, within its own error boundary, so it
    sees the GatewayError itself (its code and reason) before the edge turns
    it into a status. `deadline` is the caller's, on the event loop's clock.
    With `durable`, a call that ends with an answer for its caller (a result
    or an error) leaves here only once its row is committed; a cancelled
    call, whose caller is gone, does not wait.
    """
    try:
        yield
    except GatewayError as err:
        await close_durably(record, observers, durable, err.code, err.reason)
        raise
    except (asyncio.CancelledError, GeneratorExit):
        if drain is not None and drain.cutting:
            code, reason = ShuttingDownError.code, ShuttingDownError.reason
        else:
            # The caller's own deadline cancels it a little before ours runs out
            # (ours counts from when its request arrived): a cancel this close
            # to the deadline is the deadline.
            expired = (
                deadline is not None
                and deadline - asyncio.get_running_loop().time() <= DEADLINE_SLACK_S
            )
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            reason = ""
        close_record(record, observers, code, reason)
        raise
    except grpc.aio.AbortError:
        close_record(record, observers, grpc.StatusCode.UNKNOWN, "ABORTED")
        raise
    except Exception:
        await close_durably(record, observers, durable, grpc.StatusCode.INTERNAL, "INTERNAL")
        raise
    else:
        await close_durably(record, observers, durable, grpc.StatusCode.OK)
