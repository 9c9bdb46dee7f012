"""Rate limits, budgets and the usage ledger.

`backend.py` holds the quota counters in this process (`LocalBackend`,
aiolimiter buckets) and `redis_backend.py` in a Redis shared by replicas
(Lua scripts); `quotas.py` says which limits apply to a key; `admission.py`
reserves tokens per minute and budget before a call and settles them after;
`ledger.py` writes one row per call (SQLite; `postgres_ledger.py` when
replicas share one ledger). The interceptor that refuses calls over
their requests per minute or concurrency is interceptors/rate_limit.py; the
admin RPC over the ledger is server/usage_service.py. `Accounting`
assembles them from the `limits`, `budgets`, `ledger` and `redis` config.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from server.accounting.admission import Admission, BudgetAlert, QuotaHold
from server.accounting.backend import Background, LocalBackend, QuotaBackend
from server.accounting.ledger import SqliteLedger, UsageLedger, UsageTotals
from server.accounting.quotas import EffectiveLimits, QuotaPolicy, budget_key, period_starts
from server.calls import CallObserver
from server.config import GatewayConfig
from server.errors import UnavailableError

__all__ = [
    "Accounting",
    "Admission",
    "BudgetAlert",
    "EffectiveLimits",
    "QuotaHold",
    "QuotaPolicy",
    "SqliteLedger",
    "UsageLedger",
    "UsageTotals",
]

log = logging.getLogger(__name__)


def _backend(config: GatewayConfig) -> QuotaBackend:
    if config.limits.backend == "redis":
        # Imported only when configured: the redis client is not needed otherwise.
        from server.accounting.redis_backend import RedisBackend

        return RedisBackend(config.redis)
    return LocalBackend()


def _ledger(config: GatewayConfig) -> UsageLedger | None:
    ledger = config.ledger
    if not ledger.enabled:
        return None
    if ledger.backend == "postgres":
        # Imported only when configured: psycopg is not needed otherwise.
        from server.accounting.postgres_ledger import PostgresLedger

        return PostgresLedger(
            ledger.dsn,
            flush_interval_s=ledger.flush_interval_s,
            max_batch=ledger.max_batch,
            max_buffered=ledger.max_buffered,
        )
    return SqliteLedger(
        ledger.path,
        flush_interval_s=ledger.flush_interval_s,
        max_batch=ledger.max_batch,
        max_buffered=ledger.max_buffered,
    )


class Accounting:
    """Everything the gateway needs to limit, reserve, settle and record calls."""

    def __init__(self, config: GatewayConfig) -> None:
        self.policy = QuotaPolicy(config.limits, config.budgets)
        self.backend = _backend(config)
        self.background = Background()
        self.admission = Admission(self.policy, self.backend, config.budgets, self.background)
        self.ledger = _ledger(config)

    @property
    def observers(self) -> list[CallObserver]:
        """CallRecord observers: settle reservations, then write the ledger row."""
        observers: list[CallObserver] = [self.admission.settle]
        if self.ledger is not None:
            observers.append(self.ledger.record)
        return observers

    async def start(self) -> None:
        if self.ledger is None:
            return
        await self.ledger.start()
        if isinstance(self.backend, LocalBackend):
            await self._seed_budgets()

    async def _seed_budgets(self) -> None:
        """In-process budgets start from this period's spend in the ledger."""
        assert self.ledger is not None
        now = datetime.now(UTC)
        day, month = period_starts(now)
        for kind, start, label in (
            ("daily", day, now.strftime("%Y-%m-%d")),
            ("monthly", month, now.strftime("%Y-%m")),
        ):
            try:
                spent_by_key = await self.ledger.spent_by_key(start.timestamp())
            except UnavailableError as err:
                # A shared ledger that is down must not keep the gateway from
                # serving; budgets then count from zero until the next start.
                log.warning("budgets start from zero: %s", err)
                return
            for key_id, spent in spent_by_key.items():
                self.backend.seed(budget_key(key_id, kind, label), spent)

    async def aclose(self) -> None:
        """After the server has drained: settle what is pending, flush the ledger."""
        await self.background.drain()
        if self.ledger is not None:
            await self.ledger.aclose()
        await self.backend.aclose()
