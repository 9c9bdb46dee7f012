"""The gateway's connection pool to the Redis that replicas share, made one way for every user.

The limits' counters (server/accounting/redis_backend.py) and the response
cache and request ids (server/cache/backends.py) each hold one client. Each
call in flight may hold a connection for a command, and redis-py's pool
refuses a command outright once `max_connections` are in use (its default
is 100 since redis-py 6): with more calls than that in flight, the limits
failed closed (`MaxConnectionsError`). The pool here is a blocking one: past
`redis.max_connections` a command waits for a free connection, within the
same `redis.timeout_s` that bounds the command, and only then fails as
Redis being unreachable.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from server.config import RedisConfig


def shared_redis(config: RedisConfig) -> aioredis.Redis:
    """A client on a blocking pool of at most `config.max_connections`; every
    command and the wait for a connection bounded by `config.timeout_s`."""
    pool = aioredis.BlockingConnectionPool.from_url(
        config.url,
        max_connections=config.max_connections,
        timeout=config.timeout_s,
        socket_timeout=config.timeout_s,
        socket_connect_timeout=config.timeout_s,
        # A pooled connection that Redis dropped (a restart) is retried once on
        # a new one, at once; a timeout is not retried.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: closing the client closes it
