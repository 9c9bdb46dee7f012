"""Key changes told to every gateway process at once, over Redis pub/sub.

Each process keeps key records in memory for `auth.cache_ttl_s`
(server/auth/keys.py), so a key revoked, rotated or updated by one process
(KeyService, or `python -m server keys ...`) is seen by the others only when
their cached record expires. Where the gateways share a Redis (the `redis`
section, see `redis_configured`), the process that changed a key publishes
its id on `<redis.key_prefix>keys:changed`, and every process subscribes and
drops that key's record at once (`KeyStore.forget`): its next call reads the
store. The message holds the key id and what changed, never a secret.

Redis is a shortcut, never a dependency: a publish is bounded by
`redis.timeout_s` and never fails the change it announces; the listener runs
in its own task, reconnects with a growing, jittered delay, and each time it
subscribes again drops every cached record (what was published while it was
away is lost). While Redis is unreachable the cache TTL still bounds how
long a change takes, authentication goes on, and that is logged once per
outage, not once per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import Callable
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.config import GatewayConfig, RedisConfig

log = logging.getLogger(__name__)

KeyChange = Literal["revoked", "rotated", "updated"]
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
# The listener's reconnection delay: doubled after each failure up to the
# cap, then scaled by a random factor in [0.5, 1] so replicas do not come
# back in step.
_BACKOFF_INITIAL_S = 0.1
_BACKOFF_MAX_S = 5.0
# How long one read waits before the loop looks again (and Redis is pinged).
_READ_WAIT_S = 5.0


def channel_of(config: RedisConfig) -> str:
    return f"{config.key_prefix}keys:changed"


def redis_configured(config: GatewayConfig) -> bool:
    """Whether the gateways share a Redis: the `redis` section is given (in the
    file or LLMGW_REDIS__*), or the limits, cache or request ids use it."""
    return (
        "redis" in config.model_fields_set
        or config.limits.backend == "redis"
        or (config.cache.used and config.cache.backend == "redis")
        or (config.idempotency.window_s > 0 and config.idempotency.backend == "redis")
    )


def _message(key_id: str, change: KeyChange) -> str:
    return json.dumps({"key_id": key_id, "change": change})


def _key_id_in(data: Any) -> str | None:
    """The key id a message names, or None for anything else (never trusted further)."""
    try:
        key_id = json.loads(data)["key_id"]
    except (ValueError, TypeError, KeyError):
        return None
    return key_id if isinstance(key_id, str) and _KEY_ID.match(key_id) else None


def _client(config: RedisConfig, **options: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        config.url,
        socket_timeout=config.timeout_s,
        socket_connect_timeout=config.timeout_s,
        # Failures come back here at once: the listener reconnects on its own
        # schedule and knows when it missed messages.
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[RedisConnectionError],
        **options,
    )


class KeyChangeFeed:
    """Publishes this process's key changes and applies everyone's to `forget`.

    `forget(key_id)` drops one key's cached record, `forget(None)` all of
    them. `start()` begins listening in a task; `aclose()` stops it.
    """

    def __init__(self, config: RedisConfig, forget: Callable[[str | None], None]) -> None:
        self._config = config
        self._channel = channel_of(config)
        self._forget = forget
        self._publisher = _client(config)
        self._task: asyncio.Task[None] | None = None
        self._publish_failing = False
        # Set while subscribed (tests wait on it); cleared when the link drops.
        self.subscribed = asyncio.Event()
        # Changes received from Redis and applied (a metric or a test reads it).
        self.received = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name="key-change-feed"
            )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._publisher.aclose()

    async def publish(self, key_id: str, change: KeyChange) -> bool:
        """Tells the other processes; False when Redis could not be reached in time."""
        try:
            async with asyncio.timeout(self._config.timeout_s):
                await self._publisher.publish(self._channel, _message(key_id, change))
        except (RedisError, OSError, TimeoutError) as err:
            if not self._publish_failing:
                self._publish_failing = True
                log.warning(
                    "cannot publish a key change on Redis (%s): other gateways see it"
                    " within auth.cache_ttl_s; logged once until Redis answers again",
                    type(err).__name__,
                )
            return False
        if self._publish_failing:
            self._publish_failing = False
            log.info("publishing key changes on Redis again")
        return True

    async def _listen(self) -> None:
        failures = 0
        while True:
            client = _client(self._config, health_check_interval=_READ_WAIT_S)
            pubsub = client.pubsub()
            try:
                async with asyncio.timeout(self._config.timeout_s):
                    await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=_READ_WAIT_S)
                    kind = None if message is None else message.get("type")
                    if kind == "message":
                        self._apply(message.get("data"))
                    elif kind == "subscribe":
                        # Whatever was published while this process was not
                        # listening is lost: every cached record goes (each
                        # costs one lookup).
                        self._forget(None)
                        self.subscribed.set()
                        if failures:
                            log.info("listening for key changes on Redis again")
                        failures = 0
            except (RedisError, OSError, TimeoutError) as err:
                self._lost(failures, type(err).__name__)
                failures += 1
            except Exception:
                log.exception("the key-change listener failed; starting it again")
                self.subscribed.clear()
                failures += 1
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
                    await client.aclose()
            delay = min(_BACKOFF_MAX_S, _BACKOFF_INITIAL_S * 2 ** min(failures - 1, 16))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _lost(self, failures: int, error: str) -> None:
        self.subscribed.clear()
        if failures == 0:
            log.warning(
                "not listening for key changes on Redis (%s): changes made by other"
                " gateways are seen within auth.cache_ttl_s until it is back; retrying"
                " in the background, logged once",
                error,
            )

    def _apply(self, data: Any) -> None:
        key_id = _key_id_in(data)
        if key_id is None:
            log.debug("ignored a malformed message on the key-change channel")
            return
        self.received += 1
        self._forget(key_id)


def announce(config: GatewayConfig, key_id: str, change: KeyChange) -> bool:
    """Publishes one change from a process that serves nothing (the command
    line), blocking for at most `redis.timeout_s`; False when Redis is not
    configured or could not be reached (the gateways then see the change
    within auth.cache_ttl_s). Never raises."""
    if not redis_configured(config):
        return False
    settings = config.redis
    try:
        client = redis.Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
        )
        with contextlib.closing(client):
            client.publish(channel_of(settings), _message(key_id, change))
    except (RedisError, OSError) as err:
        log.warning(
            "cannot publish the key change on Redis (%s): gateways see it within auth.cache_ttl_s",
            type(err).__name__,
        )
        return False
    return True
