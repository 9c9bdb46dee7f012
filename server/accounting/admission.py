"""Token-per-minute limits and budgets: reserved before a call, settled after it.

Both need the decoded request (its estimated input tokens, its max_tokens)
and the routed model's prices, so they are checked in one place: the
servicer calls `Admission.admit` right after decoding, routing and the
model-access check, and before the router calls any upstream. Requests per
minute and concurrency need neither and are refused earlier, by
interceptors/rate_limit.py.

`admit` reserves the worst case: input tokens (estimated with
server/token_estimate.py) plus max_tokens against the key's one-minute TPM window, and the
cost of that usage against every budget of the key (the UTC day's and the
month's), atomically in the backend. The reservation rides on the call's
CallRecord (`quota_hold`), and `settle`, a CallRecord observer, corrects it
to the actual usage and cost when the record closes, which happens exactly
once on every exit path (success, error, cancel, deadline, a crash of the
handler). A refusal is RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx2

from server.accounting.backend import Background, BudgetCounter, QuotaBackend, alert_key
from server.accounting.quotas import (
    NANOS_PER_USD,
    BudgetPeriod,
    EffectiveLimits,
    QuotaPolicy,
    budget_periods,
)
from server.calls import CallRecord, random_id
from server.config import BudgetsConfig
from server.costs import compute_cost
from server.errors import (
    BudgetExceededError,
    OverLimitError,
    QuotaViolation,
    RateLimitExceededError,
)
from server.identity import current_identity
from server.routing import Route
from server.routing.context_window import estimate_ahead, estimated_input_tokens
from server.schema import GenerationRequest, Pricing, Usage

log = logging.getLogger(__name__)

# Called with each budget alert (a metric counter can hook in here).
AlertHook = Callable[["BudgetAlert"], None]


def tpm_key(key_id: str) -> str:
    return f"tpm:{{{key_id}}}"


@dataclass(slots=True)
class QuotaHold:
    """What one call holds until it ends: TPM tokens and budget reservations."""

    key_id: str
    holder: str
    tokens_per_minute: int = 0
    tokens: int = 0
    # The TPM window slot the tokens were charged to: what is unused goes back there.
    tokens_slot: int | None = None
    budgets: tuple[BudgetPeriod, ...] = ()
    reserved_nanos: int = 0


@dataclass(frozen=True, slots=True)
class BudgetAlert:
    key_id: str
    period: str  # "daily" or "monthly"
    label: str
    threshold: float
    spent_nanos: int
    limit_nanos: int


def max_cost_nanos(input_tokens: int, max_tokens: int, pricing: Pricing) -> int:
    """The most a call can cost: all input at the dearer of input and cache-write prices,
    at the long-prompt rates when the prompt is over their threshold."""
    pricing = pricing.for_prompt(input_tokens)
    worst = Pricing(
        input_per_mtok=max(pricing.input_per_mtok, pricing.cache_creation_per_mtok),
        output_per_mtok=pricing.output_per_mtok,
    )
    usage = Usage(input_tokens=input_tokens, output_tokens=max_tokens)
    return compute_cost(usage, worst).total_nanos


def route_max_cost_nanos(input_tokens: int, max_tokens: int, route: Route) -> int:
    """The most a call on `route` can cost: at its dearest deployment.

    A fallback (or the smart alias choosing a bigger tier) may serve the call
    on any deployment of the route, so the reservation is priced at the one
    that would cost most, and settled to what the call really cost.
    """
    return max(
        max_cost_nanos(input_tokens, max_tokens, deployment.model.pricing)
        for deployment in route.deployments
    )


def _usd(nanos: int) -> str:
    return f"${nanos / NANOS_PER_USD:.6f}"


class Admission:
    """Reserves TPM and budget before a call; settles them from its CallRecord."""

    def __init__(
        self,
        policy: QuotaPolicy,
        backend: QuotaBackend,
        budgets: BudgetsConfig,
        background: Background,
    ) -> None:
        self._policy = policy
        self._backend = backend
        self._config = budgets
        self._background = background
        self.alert_hooks: list[AlertHook] = []

    def limits_for_caller(self) -> EffectiveLimits | None:
        return self._policy.limits_for(current_identity())

    async def admit(self, record: CallRecord, request: GenerationRequest, route: Route) -> None:
        """Reserves what the call may use, or raises a QuotaExceededError."""
        limits = self._policy.limits_for(current_identity())
        needed = limits is not None and limits.needs_admission
        # Every generation call passes here before routing: a long request is
        # estimated now without stalling the event loop, for the checks after
        # this one too (server/routing/context_window.py).
        long_estimate = await estimate_ahead(request, route, needed)
        if limits is None or not needed:
            return
        key_id = record.key_id
        input_tokens = estimated_input_tokens(request) if long_estimate is None else long_estimate
        hold = QuotaHold(key_id, random_id())
        # On the record before the first await: whatever happens next, its
        # close settles what was taken.
        record.quota_hold = hold
        tpm = limits.tokens_per_minute
        if tpm is not None:
            tokens = input_tokens + request.max_tokens * request.choices
            wait, slot = await self._backend.take(tpm_key(key_id), tpm, tokens, hold.holder)
            if math.isinf(wait):
                raise OverLimitError(
                    [
                        QuotaViolation(
                            f"key:{key_id}:tokens_per_minute",
                            f"{tokens} tokens (estimated input plus max_tokens) can never fit"
                            f" this key's {tpm} tokens per minute; lower max_tokens or the input",
                        )
                    ],
                    metadata={"limit": "tokens_per_minute", "key_id": key_id},
                )
            if wait:
                raise RateLimitExceededError(
                    [
                        QuotaViolation(
                            f"key:{key_id}:tokens_per_minute",
                            f"{tokens} tokens (estimated input plus max_tokens) exceed what is"
                            f" left of this key's {tpm} tokens per minute",
                        )
                    ],
                    retry_after=wait,
                    metadata={"limit": "tokens_per_minute", "key_id": key_id},
                )
            hold.tokens_per_minute, hold.tokens, hold.tokens_slot = tpm, tokens, slot
        if limits.has_budget:
            now = datetime.now(UTC)
            periods = budget_periods(key_id, limits, now)
            cost = route_max_cost_nanos(input_tokens, request.max_tokens * request.choices, route)
            result = await self._backend.reserve(
                [p.counter for p in periods], cost, hold.holder, self._config.reservation_ttl_s
            )
            if not result.ok:
                period = next(p for p in periods if p.counter == result.refused)
                raise self._over_budget(key_id, period, cost, result.spent_nanos, now)
            hold.budgets, hold.reserved_nanos = tuple(periods), cost

    @staticmethod
    def _over_budget(
        key_id: str, period: BudgetPeriod, cost: int, spent: int, now: datetime
    ) -> BudgetExceededError:
        limit = period.counter.limit_nanos
        return BudgetExceededError(
            [
                QuotaViolation(
                    f"key:{key_id}:budget:{period.kind}",
                    f"this call may cost up to {_usd(cost)}, more than what is left of the key's"
                    f" {period.kind} budget ({_usd(max(0, limit - spent))} of {_usd(limit)})",
                )
            ],
            retry_after=period.seconds_left(now),
            metadata={"limit": f"budget_{period.kind}", "key_id": key_id, "period": period.label},
        )

    def settle(self, record: CallRecord) -> None:
        """CallRecord observer: corrects the reservations to what the call used."""
        hold = record.quota_hold
        if not isinstance(hold, QuotaHold):
            return
        record.quota_hold = None
        if hold.tokens:
            usage = record.usage
            used = (
                usage.input_tokens
                + usage.output_tokens
                + usage.cache_read_input_tokens
                + usage.cache_creation_input_tokens
            )
            if used != hold.tokens:
                self._background.run(
                    "give back tokens",
                    self._backend.give_back(
                        tpm_key(hold.key_id),
                        hold.tokens_per_minute,
                        hold.tokens - used,
                        hold.tokens_slot,
                        hold.holder,
                    ),
                )
        if hold.budgets:
            self._background.run(
                "settle budget", self._settle_budget(hold, record.cost.total_nanos)
            )

    async def _settle_budget(self, hold: QuotaHold, actual: int) -> None:
        keys = [p.counter.key for p in hold.budgets]
        spends = await self._backend.settle(keys, hold.holder, actual)
        if actual > 0 and spends:
            await self._alert(hold.key_id, hold.budgets, spends, actual)

    async def _alert(
        self, key_id: str, periods: Sequence[BudgetPeriod], spends: Sequence[int], actual: int
    ) -> None:
        for period, spent in zip(periods, spends, strict=True):
            limit = period.counter.limit_nanos
            for threshold in self._config.alert_thresholds:
                mark = limit * threshold
                # Only the call that crossed the mark may fire it; first_time
                # makes that once per period across replicas too.
                if not spent - actual < mark <= spent:
                    continue
                key = alert_key(period.counter.key, threshold)
                if await self._backend.first_time(key, period.length_s):
                    self._fire(
                        BudgetAlert(key_id, period.kind, period.label, threshold, spent, limit)
                    )

    def _fire(self, alert: BudgetAlert) -> None:
        log.warning(
            "budget alert: key %s reached %d%% of its %s budget (%s of %s, period %s)",
            alert.key_id,
            round(alert.threshold * 100),
            alert.period,
            _usd(alert.spent_nanos),
            _usd(alert.limit_nanos),
            alert.label,
            extra={
                "event": "budget_alert",
                "key_id": alert.key_id,
                "budget_period": alert.period,
                "period_label": alert.label,
                "threshold": alert.threshold,
                "spent_nanos": alert.spent_nanos,
                "limit_nanos": alert.limit_nanos,
            },
        )
        for hook in self.alert_hooks:
            hook(alert)
        if self._config.alert_webhook_url:
            self._background.run("budget webhook", self._post(alert))

    async def _post(self, alert: BudgetAlert) -> None:
        url = self._config.alert_webhook_url
        assert url is not None
        body = {
            "event": "budget_alert",
            "key_id": alert.key_id,
            "period": alert.period,
            "period_label": alert.label,
            "threshold": alert.threshold,
            "spent_nanos": alert.spent_nanos,
            "limit_nanos": alert.limit_nanos,
        }
        try:
            async with httpx2.AsyncClient(timeout=5.0) as client:
                response = await client.post(
                    url, content=json.dumps(body), headers={"content-type": "application/json"}
                )
            if response.status_code >= 300:
                log.warning("budget webhook answered HTTP %d", response.status_code)
        except httpx2.HTTPError as err:
            log.warning("budget webhook failed: %s", type(err).__name__)

    async def budget_state(
        self, key_id: str, limits: EffectiveLimits | None
    ) -> list[tuple[BudgetPeriod, int, int]]:
        """(period, spent, reserved) of each budget the key has now."""
        if limits is None:
            return []
        states = []
        for period in budget_periods(key_id, limits, datetime.now(UTC)):
            spent, reserved = await self._backend.budget_state(period.counter.key)
            states.append((period, spent, reserved))
        return states

    def counters(self, key_id: str, limits: EffectiveLimits) -> list[BudgetCounter]:
        return [p.counter for p in budget_periods(key_id, limits, datetime.now(UTC))]
