"""More calls in flight than Redis connections: commands wait for one (server/redis_connection.py).

redis-py's own pool refuses a command once its 100 connections are in use;
three replicas' worth of calls in flight made the limits fail closed with
MaxConnectionsError (tests/test_quota_window.py, in CI). A real redis-server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.config import RedisConfig
from server.redis_connection import shared_redis
from tests.redis_fixtures import redis_server


async def test_more_commands_at_once_than_connections_all_succeed(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as redis:
        config = RedisConfig(url=redis.url, timeout_s=5.0, max_connections=4)
        client = shared_redis(config)
        try:
            # Each command holds its connection 50 ms: 40 of them need 10 turns of the pool.
            results = await asyncio.gather(
                *(client.blpop([f"none-{n}"], timeout=0.05) for n in range(40))
            )
            assert results == [None] * 40
            assert client.connection_pool.max_connections == 4
        finally:
            await client.aclose()
