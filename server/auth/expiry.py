"""Keys close to their expiry, reported before they stop working.

Once a day per process (at start-up, then on the first authenticated call a
day later, in a worker thread, never on a call's path) the watch reads the
key store and, for each active key within EXPIRY_WARNING_DAYS of its
expiry, logs one structured WARNING (logger `llmgw.keys`, fields `key_id`,
`key_name`, `expires_at`, `days_left`) and appends a `key.expiring` audit
event. The metric (`llmgw_api_keys`, keys by `days_left` bucket) is counted
from the store when scraped, at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from server.auth.keys import DAY_S, EXPIRY_WARNING_DAYS, KeyRecord, KeyStore
from server.telemetry.audit import KEY_EXPIRING, audit_event

log = logging.getLogger("llmgw.keys")

CHECK_INTERVAL_S = DAY_S
# The `days_left` label's values, each an upper bound in days (exclusive).
DAYS_LEFT_BUCKETS: tuple[tuple[str, float], ...] = (
    ("expired", 0.0),
    ("lt_1", 1.0),
    ("lt_7", 7.0),
    ("lt_14", 14.0),
    ("lt_30", 30.0),
    ("lt_90", 90.0),
    ("later", math.inf),
)
NEVER = "never"
_COUNTS_MAX_AGE_S = 60.0


def days_left_bucket(record: KeyRecord, now: float) -> str:
    if record.expires_at is None:
        return NEVER
    days = (record.expires_at - now) / DAY_S
    return next(label for label, bound in DAYS_LEFT_BUCKETS if days < bound or bound == math.inf)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ExpiryWatch:
    """Warns of expiring keys once a day, and counts keys by days left for the metric."""

    def __init__(
        self,
        store: KeyStore,
        *,
        warn_within_days: float = EXPIRY_WARNING_DAYS,
        interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._within_s = warn_within_days * DAY_S
        self._interval = interval_s
        self.clock = clock
        self._monotonic = monotonic
        self._checked_at = -math.inf
        self._checking: asyncio.Task[None] | None = None
        self._counts: dict[str, int] = {}
        self._counted_at = -math.inf

    def check(self) -> list[KeyRecord]:
        """Reports every active key expiring within the window; returns them (blocking)."""
        self._checked_at = self._monotonic()
        now = self.clock()
        try:
            records = self._store.list()
        except Exception as err:  # a locked or unreadable store: try again next time
            log.warning("cannot check the API keys' expiry: %s", type(err).__name__)
            return []
        expiring = [
            record
            for record in records
            if not record.revoked
            and record.expires_at is not None
            # Expired ones too, for a window as long: then they are left alone.
            and abs(record.expires_at - now) < self._within_s
        ]
        for record in expiring:
            assert record.expires_at is not None
            days_left = round((record.expires_at - now) / DAY_S, 1)
            state = "expired" if days_left <= 0 else "expires"
            log.warning(
                "API key %s (%s) %s at %s: rotate it (`python -m server keys rotate %s`)",
                record.id,
                record.name,
                state,
                _iso(record.expires_at),
                record.id,
                extra={
                    "key_id": record.id,
                    "key_name": record.name,
                    "expires_at": _iso(record.expires_at),
                    "days_left": days_left,
                },
            )
            audit_event(
                KEY_EXPIRING,
                key_id=record.id,
                name=record.name,
                expires_at=record.expires_at,
                days_left=days_left,
            )
        return expiring

    def check_if_due(self) -> None:
        """Starts a check in a worker thread when the last one is a day old; never waits."""
        if self._checking is not None or self._monotonic() - self._checked_at < self._interval:
            return
        self._checked_at = self._monotonic()  # one check per interval, even if it fails
        self._checking = asyncio.get_running_loop().create_task(self._check_in_thread())

    async def _check_in_thread(self) -> None:
        try:
            await asyncio.to_thread(self.check)
        finally:
            self._checking = None

    def counts(self) -> dict[str, int]:
        """Active keys by days-left bucket, from the store at most a minute ago (blocking)."""
        if self._monotonic() - self._counted_at >= _COUNTS_MAX_AGE_S:
            now = self.clock()
            counts = {label: 0 for label, _ in DAYS_LEFT_BUCKETS} | {NEVER: 0}
            try:
                records = self._store.list()
            except Exception:
                records = []
            for record in records:
                if not record.revoked:
                    counts[days_left_bucket(record, now)] += 1
            self._counts, self._counted_at = counts, self._monotonic()
        return dict(self._counts)
