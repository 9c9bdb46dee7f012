"""Which limits apply to a caller, and the budget periods they are counted in.

A key's limits come from, in order: `limits.keys[<id>]` / `budgets.keys[<id>]`
in the configuration, the key store (`keys create --rpm --tpm --budget-usd`,
carried in Identity.limits; the store's budget is a monthly cap), then
`limits.default` / `budgets.default`. Calls without an identity (auth
disabled for local development) count as key "". When nothing is configured
and the key carries no limits, `limits_for` answers None at the cost of a
tuple comparison: the hot path stays untouched.
"""

from __future__ import annotations

import calendar
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.accounting.backend import BudgetCounter
from server.config import (
    BudgetsConfig,
    KeyBudgetConfig,
    KeyLimitsConfig,
    LimitsConfig,
    configured_limit_sections,
)
from server.identity import Identity, KeyLimits

log = logging.getLogger(__name__)

NANOS_PER_USD = 1_000_000_000
_NO_LIMITS = KeyLimits()
_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """The limits one key is held to (None: unlimited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    daily_nanos: int | None = None
    monthly_nanos: int | None = None

    @property
    def gates_calls(self) -> bool:
        """Checked by the interceptor, before the request is decoded."""
        return self.requests_per_minute is not None or self.max_concurrent is not None

    @property
    def needs_admission(self) -> bool:
        """Checked once the request is decoded (tokens and cost are estimated)."""
        return self.tokens_per_minute is not None or self.has_budget

    @property
    def has_budget(self) -> bool:
        return self.daily_nanos is not None or self.monthly_nanos is not None


def _usd(value: float | None) -> int | None:
    return None if value is None else round(value * NANOS_PER_USD)


def _smallest(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


class QuotaPolicy:
    """Resolves the limits of each caller from configuration and key store."""

    def __init__(self, limits: LimitsConfig, budgets: BudgetsConfig) -> None:
        self._limits = limits
        self._budgets = budgets
        self._configured = bool(configured_limit_sections(limits, budgets))
        self._cache: dict[tuple[str, KeyLimits], EffectiveLimits | None] = {}

    @property
    def configured(self) -> bool:
        """Whether any limit is configured (keys from the store may still carry some)."""
        return self._configured

    def limits_for(self, identity: Identity | None) -> EffectiveLimits | None:
        """The caller's limits, or None when it has none at all."""
        key_id, stored = (
            ("", _NO_LIMITS) if identity is None else (identity.key_id, identity.limits)
        )
        if not self._configured and stored == _NO_LIMITS:
            return None
        return self.limits_for_key(key_id, stored)

    def limits_for_key(
        self, key_id: str, stored: KeyLimits | None = None
    ) -> EffectiveLimits | None:
        """The limits of a key, given what the key store holds for it."""
        stored = stored or _NO_LIMITS
        cache_key = (key_id, stored)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        resolved = self._cache[cache_key] = self._resolve(key_id, stored)
        return resolved

    def _resolve(self, key_id: str, stored: KeyLimits) -> EffectiveLimits | None:
        own = self._limits.keys.get(key_id, KeyLimitsConfig())
        default = self._limits.default
        own_budget = self._budgets.keys.get(key_id, KeyBudgetConfig())
        default_budget = self._budgets.default

        def pick(name: str, from_store: int | None) -> int | None:
            value: int | None = getattr(own, name)
            if value is None:
                value = from_store
            if value is None:
                value = getattr(default, name)
            return value

        daily = _usd(own_budget.daily_usd)
        if daily is None:
            daily = _usd(default_budget.daily_usd)
        monthly = _usd(own_budget.monthly_usd)
        if monthly is None:
            monthly = _smallest(stored.budget_nanos, _usd(default_budget.monthly_usd))
        limits = EffectiveLimits(
            requests_per_minute=pick("requests_per_minute", stored.requests_per_minute),
            tokens_per_minute=pick("tokens_per_minute", stored.tokens_per_minute),
            max_concurrent=pick("max_concurrent", None),
            daily_nanos=daily,
            monthly_nanos=monthly,
        )
        return limits if limits != EffectiveLimits() else None


@dataclass(frozen=True, slots=True)
class BudgetPeriod:
    """One budget of a key in the period that contains a moment."""

    kind: str  # "daily" or "monthly"
    label: str  # "2026-11-05" or "2026-11"
    counter: BudgetCounter
    ends: datetime  # start of the next period, UTC

    def seconds_left(self, now: datetime) -> float:
        return max(1.0, (self.ends - now).total_seconds())

    @property
    def length_s(self) -> float:
        return 86_400.0 if self.kind == "daily" else 31 * 86_400.0


_LABELS = {"daily": "%Y-%m-%d", "monthly": "%Y-%m"}
# budget_key's shape, read back by budget_of.
_BUDGET_KEY = re.compile(r"budget:\{(?P<key_id>.*)\}:(?P<kind>daily|monthly):(?P<label>.+)")


def budget_key(key_id: str, kind: str, label: str) -> str:
    # {key_id} is a Redis hash tag: a key's budgets share a cluster slot.
    return f"budget:{{{key_id}}}:{kind}:{label}"


def budget_of(key: str) -> tuple[str, datetime, datetime] | None:
    """The key id and the UTC start and end of the period a budget key names."""
    match = _BUDGET_KEY.fullmatch(key)
    if match is None:
        return None
    kind = match["kind"]
    start = datetime.strptime(match["label"], _LABELS[kind]).replace(tzinfo=UTC)
    return match["key_id"], start, period_end(kind, start)


def period_end(kind: str, start: datetime) -> datetime:
    """The start of the next period after the (UTC) day or month beginning at `start`."""
    if kind == "daily":
        return start + timedelta(days=1)
    return start + timedelta(days=calendar.monthrange(start.year, start.month)[1])


def budget_periods(key_id: str, limits: EffectiveLimits, now: datetime) -> list[BudgetPeriod]:
    """The key's budgets counted at `now` (UTC day and UTC month)."""
    day, month = period_starts(now)
    periods = []
    for kind, start, limit in (
        ("daily", day, limits.daily_nanos),
        ("monthly", month, limits.monthly_nanos),
    ):
        if limit is not None:
            label = now.strftime(_LABELS[kind])
            counter = BudgetCounter(budget_key(key_id, kind, label), limit)
            periods.append(BudgetPeriod(kind, label, counter, period_end(kind, start)))
    return periods


def period_starts(now: datetime) -> tuple[datetime, datetime]:
    """Starts of the UTC day and month containing `now`."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)
