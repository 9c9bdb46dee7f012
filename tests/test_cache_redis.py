"""The response cache's Redis backend: shared by gateways, and never failing a call.

Two in-process gateways share one real redis-server (tests/redis_fixtures.py)
and the fake upstream, whose request count shows which calls reached it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.cache import BYPASS, HIT, MISS
from server.cache.backends import RedisCacheBackend
from tests.conftest import RunningGateway
from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking
from tests.http_fixtures import base_url, start_front_door
from tests.redis_fixtures import RedisServer, redis_server
from tests.test_cache import ask, generate, post, stream, without_call_fields

pytestmark = pytest.mark.usefixtures("_openai_key_in_environment")


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server


@asynccontextmanager
async def gateways(
    fake: FakeUpstream, tmp_path: Path, url: str, count: int = 2
) -> AsyncIterator[list[RunningGateway]]:
    settings = {
        "cache.enabled": True,
        "cache.backend": "redis",
        "redis.url": url,
        "redis.timeout_s": 0.5,
        "server.coalesce_stream_deltas": False,
    }
    started = [await start_front_door(fake, tmp_path, **settings) for _ in range(count)]
    try:
        yield started
    finally:
        for gw in started:
            await gw.aclose()


async def test_an_answer_made_by_one_gateway_is_a_hit_on_another(
    fake: FakeUpstream, tmp_path: Path, redis: RedisServer
) -> None:
    fake.enqueue(Reply(blocks=[Thinking("Hm.", signature="sig-r"), Text("Shared answer.")]))
    async with gateways(fake, tmp_path, redis.url) as (one, two):
        original, trailers = await stream(one.stub, ask("shared"))
        assert trailers["x-llmgw-cache"] == MISS
        replay, trailers = await stream(two.stub, ask("shared"))
        assert trailers["x-llmgw-cache"] == HIT
        assert without_call_fields(replay) == without_call_fields(original)
        _, trailers = await generate(one.stub, ask("shared"))
        assert trailers["x-llmgw-cache"] == HIT
        assert len(fake.requests) == 1
    # Stored compressed, under the configured prefix, with an expiry.
    client = aioredis.Redis.from_url(redis.url)
    try:
        keys = await client.keys("llmgw:cache:*")
        assert len(keys) == 1
        zlib.decompress(await client.get(keys[0]))
        assert 0 < await client.ttl(keys[0]) <= 3600
    finally:
        await client.aclose()


async def test_a_relayed_stream_is_replayed_byte_for_byte_by_another_gateway(
    fake: FakeUpstream, tmp_path: Path, redis: RedisServer
) -> None:
    body = {
        "model": "claude-test",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "bytes"}],
    }
    async with gateways(fake, tmp_path, redis.url) as (one, two):
        _, first, headers = await post(base_url(one), "/v1/messages", body)
        assert headers["x-llmgw-cache"] == MISS
        _, second, headers = await post(base_url(two), "/v1/messages", body)
        assert headers["x-llmgw-cache"] == HIT
        assert second == first
        assert len(fake.requests) == 1


async def test_identical_misses_on_two_gateways_make_one_upstream_call(
    fake: FakeUpstream, tmp_path: Path, redis: RedisServer
) -> None:
    fake.enqueue(Reply(delay_s=0.3))
    async with gateways(fake, tmp_path, redis.url) as (one, two):
        calls = [generate(gw.stub, ask("together")) for gw in (one, two) for _ in range(10)]
        results = await asyncio.gather(*calls)
        assert len(fake.requests) == 1
        outcomes = sorted(trailers["x-llmgw-cache"] for _, trailers in results)
        assert outcomes == [HIT] * 19 + [MISS]


async def test_a_callers_ttl_expires_the_entry_in_redis(
    fake: FakeUpstream, tmp_path: Path, redis: RedisServer
) -> None:
    async with gateways(fake, tmp_path, redis.url, count=1) as (gw,):
        await generate(gw.stub, ask("short"), ("x-llmgw-cache-ttl", "0.3"))
        _, trailers = await generate(gw.stub, ask("short"))
        assert trailers["x-llmgw-cache"] == HIT
        await asyncio.sleep(0.5)
        _, trailers = await generate(gw.stub, ask("short"))
        assert trailers["x-llmgw-cache"] == MISS


async def test_calls_go_on_without_the_cache_while_redis_is_down(
    fake: FakeUpstream, tmp_path: Path, redis: RedisServer
) -> None:
    async with gateways(fake, tmp_path, redis.url, count=1) as (gw,):
        await redis.stop()
        for _ in range(2):
            response, trailers = await generate(gw.stub, ask("down"))
            assert trailers["x-llmgw-cache"] == BYPASS
            assert response.content[0].text == "Hello from the fake upstream."
        backend = gw.gateway.cache.backends["redis"]  # type: ignore[union-attr]
        assert isinstance(backend, RedisCacheBackend) and backend.failures >= 2
        assert len(fake.requests) == 2
        await redis.restart()
        outcomes = []
        for _ in range(2):
            _, trailers = await generate(gw.stub, ask("down"))
            outcomes.append(trailers["x-llmgw-cache"])
        assert outcomes == [MISS, HIT]
        assert len(fake.requests) == 3
