"""Rate limits, budgets and the usage ledger.

`backend.py` holds the quota counters in this process (`LocalBackend`)
and `redis_backend.py` in a Redis shared by replicas (Lua scripts);
`quotas.py` says which limits apply to a key; `admission.py` reserves
tokens per minute and budget before a call and settles them after;
`ledger.py` writes one row per call (SQLite; `postgres_ledger.py` when
replicas share one ledger). The interceptor that refuses calls over
their requests per minute or concurrency is interceptors/rate_limit.py; the
admin RPC over the ledger is server/usage_service.py. `Accounting`
assembles them from the `limits`, `budgets`, `ledger` and `redis` config.

Budgets start from the ledger: in-process counters at start, Redis ones
whenever Redis has lost a budget (`budget_spend`, asked by RedisBackend),
and Redis budgets are raised to the ledger's spend every
`budgets.reconcile_interval_s`. What the ledger knows bounds this: a
PostgreSQL ledger shared by the replicas holds every call, an SQLite ledger
only this replica's, and either lacks the calls still in flight (their
settle adds them). The ledger is flushed before a rebuild reads it.

With `ledger.durability: sync`, `Accounting.durable` is what the edges await
(server/calls.py `accounted`) between closing a call's record and telling its
caller how the call ended: the ledger's commit of the call's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from server.accounting.admission import Admission, BudgetAlert, QuotaHold
from server.accounting.backend import (
    Background,
    LedgerSpend,
    LocalBackend,
    QuotaBackend,
    SpendSource,
    alert_key,
)
from server.accounting.ledger import SqliteLedger, UsageLedger, UsageTotals
from server.accounting.quotas import (
    EffectiveLimits,
    QuotaPolicy,
    budget_key,
    budget_of,
    period_starts,
)
from server.calls import CallObserver, Durability
from server.config import ConfigError, GatewayConfig
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


def _backend(config: GatewayConfig, spend_source: SpendSource | None) -> QuotaBackend:
    if config.limits.backend == "redis":
        # Imported only when configured: the redis client is not needed otherwise.
        from server.accounting.redis_backend import RedisBackend

        return RedisBackend(config.redis, spend_source=spend_source)
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
        sync_to_disk=ledger.durability == "sync",
    )


def _unusable_ledger_path(path: Path, err: OSError | sqlite3.Error) -> str:
    if path.is_dir():
        reason = "it is a directory"
    elif isinstance(err, OSError):
        reason = f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    else:
        reason = str(err) or type(err).__name__
    return (
        f"invalid configuration:\n  ledger.path: cannot keep the usage ledger at {path}: {reason}"
    )


class Accounting:
    """Everything the gateway needs to limit, reserve, settle and record calls."""

    def __init__(self, config: GatewayConfig) -> None:
        self._budgets = config.budgets
        self.policy = QuotaPolicy(config.limits, config.budgets)
        self.ledger = _ledger(config)
        # What a call awaits, once its record is closed, before its caller hears
        # how it ended (ledger.durability: sync); None: nothing.
        self.durable: Durability | None = None
        if self.ledger is not None and config.ledger.durability == "sync":
            self.durable = self.ledger.durable
        self.backend = _backend(config, None if self.ledger is None else self.budget_spend)
        self.background = Background()
        self.admission = Admission(self.policy, self.backend, config.budgets, self.background)
        self._reconciling: asyncio.Task[None] | None = None

    @property
    def observers(self) -> list[CallObserver]:
        """CallRecord observers: settle reservations, then write the ledger row."""
        observers: list[CallObserver] = [self.admission.settle]
        if self.ledger is not None:
            observers.append(self.ledger.record)
        return observers

    async def start(self) -> None:
        """Starts the ledger's writer; raises ConfigError naming `ledger.path` when
        SQLite cannot keep the ledger there."""
        if self.ledger is None:
            return
        try:
            await self.ledger.start()
        except (OSError, sqlite3.Error) as err:
            if not isinstance(self.ledger, SqliteLedger):
                raise
            raise ConfigError(_unusable_ledger_path(self.ledger.path, err)) from None
        if isinstance(self.backend, LocalBackend):
            # In-process budgets start from this period's spend in the ledger.
            await self.reconcile_budgets()
        elif self._budgets.reconcile_interval_s > 0:
            self._reconciling = asyncio.get_running_loop().create_task(
                self._reconcile_every(self._budgets.reconcile_interval_s)
            )

    async def reconcile_budgets(self) -> None:
        """Raises every budget of this period the backend holds to the ledger's spend."""
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
                # serving; budgets count from what the backend holds meanwhile.
                log.warning("budgets not reconciled with the usage ledger: %s", err)
                return
            await self.backend.reconcile(
                {budget_key(key_id, kind, label): spent for key_id, spent in spent_by_key.items()}
            )

    async def _reconcile_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile_budgets()
            except Exception:
                log.exception("reconciling budgets with the usage ledger failed")

    async def budget_spend(self, key: str, limit_nanos: int | None) -> LedgerSpend | None:
        """A budget's spend in its period from the ledger (RedisBackend's SpendSource).

        The ledger is flushed first, so this replica's finished calls are in
        it. None when the ledger cannot answer now.
        """
        assert self.ledger is not None
        budget = budget_of(key)
        if budget is None:
            return None
        key_id, start, end = budget
        try:
            await self.ledger.flush()
            totals = await self.ledger.totals(start.timestamp(), end.timestamp(), "", key_id)
        except UnavailableError as err:
            log.warning("budget %s cannot be rebuilt from the usage ledger now: %s", key, err)
            return None
        alerts: tuple[tuple[str, float], ...] = ()
        if limit_nanos is not None:
            alerts = tuple(
                (alert_key(key, threshold), limit_nanos * threshold)
                for threshold in self._budgets.alert_thresholds
            )
        return LedgerSpend(sum(t.cost_nanos for t in totals), alerts, (end - start).total_seconds())

    async def aclose(self) -> None:
        """After the server has drained: settle what is pending, flush the ledger."""
        if self._reconciling is not None:
            self._reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciling
        await self.background.drain()
        if self.ledger is not None:
            await self.ledger.aclose()
        await self.backend.aclose()
