"""The response cache (issue 20): in-process gateways on the fake upstream, both edges.

The fake upstream records every request, so `len(fake.requests)` proves a
hit made no upstream call. The memory backend's expiry and bound, the key
and the stored entry are also tested on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.accounting import QuotaHold, SqliteLedger
from server.app import Gateway
from server.auth.cli import create_key
from server.cache import (
    BYPASS,
    EXCLUDED,
    HIT,
    MISS,
    REFRESH,
    CacheDirectives,
    CacheEntry,
    ResponseCache,
    cache_key,
    directives_from_headers,
    directives_from_metadata,
)
from server.cache.backends import MemoryBackend
from server.cache.idempotency import Idempotency
from server.cache.key import cache_key_async
from server.calls import CallRecord
from server.config import CacheConfig, IdempotencyConfig, RedisConfig, load_config
from server.errors import InvalidArgumentError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    RawChunk,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
)
from server.loop_turns import LARGE_REQUEST
from server.providers.offline import OfflineProvider, OfflineSettings
from server.routing import Route, Router
from server.schema import (
    Cost,
    GenerationRequest,
    Message,
    Passthrough,
    Role,
    StopReason,
    TextBlock,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from tests.conftest import TEST_CONFIG, RunningGateway, started, ticks_during
from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking, ToolCall
from tests.fake_upstream import Usage as FakeUsage
from tests.http_fixtures import base_url, start_front_door
from tests.test_auth import auth_config, bearer
from tests.test_metrics import samples, scrape

pytestmark = pytest.mark.usefixtures("_openai_key_in_environment")

CACHE_ON = {"cache.enabled": True, "server.coalesce_stream_deltas": False}


@pytest.fixture
async def gateway(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    gw = await start_front_door(fake, tmp_path, **CACHE_ON)
    yield gw
    await gw.aclose()


def ask(text: str = "Hello", model: str = "claude-test", **fields: Any) -> pb.GenerateRequest:
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])
    return pb.GenerateRequest(model=model, messages=[message], **{"max_tokens": 100, **fields})


async def generate(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest, *metadata: tuple[str, str]
) -> tuple[pb.GenerateResponse, dict[str, str]]:
    call = stub.Generate(req, metadata=metadata or None)
    response = await call
    return response, {k: v for k, v in await call.trailing_metadata() if isinstance(v, str)}


async def stream(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest, *metadata: tuple[str, str]
) -> tuple[list[pb.StreamGenerateResponse], dict[str, str]]:
    call = stub.StreamGenerate(req, metadata=metadata or None)
    events = [event async for event in call]
    return events, {k: v for k, v in await call.trailing_metadata() if isinstance(v, str)}


def without_call_fields(events: list[pb.StreamGenerateResponse]) -> list[bytes]:
    """The events as bytes, less what differs per call: the request id and the cost."""
    out = []
    for event in events:
        copy = pb.StreamGenerateResponse()
        copy.CopyFrom(event)
        if copy.HasField("message_start"):
            copy.message_start.request_id = ""
        if copy.HasField("message_delta"):
            copy.message_delta.ClearField("cost")
        out.append(copy.SerializeToString(deterministic=True))
    return out


RICH = Reply(
    blocks=[
        Thinking("Let me think it over.", signature="sig-xyz"),
        Text("It is sunny in Oslo."),
        ToolCall("toolu_1", "get_weather", {"city": "Oslo", "days": 2}),
    ],
    usage=FakeUsage(30, 20, 5, 3),
)


# -- gRPC: hit, miss, refresh, bypass ---------------------------------------------------


async def test_a_second_generate_is_a_hit_with_no_upstream_call(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    first, trailers = await generate(gateway.stub, ask())
    assert trailers["x-llmgw-cache"] == MISS
    second, trailers = await generate(gateway.stub, ask())
    assert trailers["x-llmgw-cache"] == HIT
    assert len(fake.requests) == 1
    assert second.content == first.content
    assert second.usage == first.usage  # the original usage numbers
    assert second.stop_reason == first.stop_reason
    assert second.request_id != first.request_id
    assert first.cost.total_nanos > 0 and second.cost.total_nanos == 0


async def test_a_streamed_hit_replays_the_same_events_thinking_and_tool_calls(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = await start_front_door(fake, tmp_path, **CACHE_ON, **{"cache.store_tool_calls": True})
    try:
        fake.enqueue(RICH)
        original, trailers = await stream(gw.stub, ask("weather?"))
        assert trailers["x-llmgw-cache"] == MISS
        replay, trailers = await stream(gw.stub, ask("weather?"))
        assert trailers["x-llmgw-cache"] == HIT
        assert len(fake.requests) == 1
        kinds = [e.WhichOneof("event") for e in replay]
        assert kinds.count("content_block_start") == 3  # thinking, text, tool use
        assert len(replay) == len(original) > 10  # each delta its own event
        assert without_call_fields(replay) == without_call_fields(original)
        signatures = [
            e.content_block_delta.thinking_signature
            for e in replay
            if e.HasField("content_block_delta") and e.content_block_delta.thinking_signature
        ]
        assert "".join(signatures) == "sig-xyz"
    finally:
        await gw.aclose()


async def test_a_unary_answer_serves_a_stream_and_the_reverse(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    whole, _ = await generate(gateway.stub, ask("unary first"))
    events, trailers = await stream(gateway.stub, ask("unary first"))
    assert trailers["x-llmgw-cache"] == HIT
    text = "".join(e.content_block_delta.text for e in events if e.HasField("content_block_delta"))
    assert text == whole.content[0].text
    events, _ = await stream(gateway.stub, ask("stream first"))
    whole, trailers = await generate(gateway.stub, ask("stream first"))
    assert trailers["x-llmgw-cache"] == HIT
    assert whole.content[0].text == "Hello from the fake upstream."
    assert len(fake.requests) == 2


async def test_no_cache_refreshes_and_no_store_bypasses(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("old")]), Reply(blocks=[Text("new")]))
    await generate(gateway.stub, ask())
    response, trailers = await generate(gateway.stub, ask(), ("x-llmgw-cache", "no-cache"))
    assert trailers["x-llmgw-cache"] == REFRESH
    assert response.content[0].text == "new"
    response, trailers = await generate(gateway.stub, ask())
    assert (trailers["x-llmgw-cache"], response.content[0].text) == (HIT, "new")
    assert len(fake.requests) == 2
    # no-store: neither served from the cache nor stored.
    _, trailers = await generate(gateway.stub, ask("fresh"), ("x-llmgw-cache", "no-store"))
    assert trailers["x-llmgw-cache"] == BYPASS
    _, trailers = await generate(gateway.stub, ask("fresh"))
    assert trailers["x-llmgw-cache"] == MISS
    assert len(fake.requests) == 4


async def test_an_unknown_cache_directive_is_refused(gateway: RunningGateway) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(gateway.stub, ask(), ("x-llmgw-cache", "forever"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(gateway.stub, ask(), ("x-llmgw-cache-ttl", "-3"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_cache_is_off_by_default_and_per_model(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = await start_front_door(fake, tmp_path)
    try:
        _, trailers = await generate(gw.stub, ask())
        assert "x-llmgw-cache" not in trailers
        assert gw.gateway.cache is None
    finally:
        await gw.aclose()
    gw = await start_front_door(fake, tmp_path, **{"cache.models": {"gpt-test": {"enabled": True}}})
    try:
        _, trailers = await generate(gw.stub, ask())
        assert "x-llmgw-cache" not in trailers
        for outcome in (MISS, HIT):
            _, trailers = await generate(gw.stub, ask(model="gpt-test"))
            assert trailers["x-llmgw-cache"] == outcome
    finally:
        await gw.aclose()


# -- what changes the key ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changed",
    [
        {"temperature": 0.5},
        {"top_p": 0.9},
        {"max_tokens": 101},
        {"system": [pb.ContentBlock(text="Be brief.")]},
        {"stop_sequences": ["END"]},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_a_changed_field_misses(
    gateway: RunningGateway, fake: FakeUpstream, changed: dict[str, Any]
) -> None:
    await generate(gateway.stub, ask())
    req = ask()
    for name, value in changed.items():
        if isinstance(value, list):
            getattr(req, name).extend(value)
        else:
            setattr(req, name, value)
    _, trailers = await generate(gateway.stub, req)
    assert trailers["x-llmgw-cache"] == MISS
    assert len(fake.requests) == 2


async def test_provider_options_and_a_tools_schema_change_the_key(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    def with_tool(schema_type: str) -> pb.GenerateRequest:
        req = ask()
        tool = req.tools.add(name="lookup", description="Looks up.")
        tool.input_schema.update({"type": "object", "properties": {"q": {"type": schema_type}}})
        return req

    await generate(gateway.stub, with_tool("string"))
    _, trailers = await generate(gateway.stub, with_tool("integer"))
    assert trailers["x-llmgw-cache"] == MISS
    _, trailers = await generate(gateway.stub, with_tool("string"))
    assert trailers["x-llmgw-cache"] == HIT
    req = ask()
    req.provider_options.update({"metadata": {"user_id": "u-1"}})
    _, trailers = await generate(gateway.stub, req)
    assert trailers["x-llmgw-cache"] == MISS
    assert len(fake.requests) == 3


def _request(**fields: Any) -> GenerationRequest:
    base = GenerationRequest(
        model="echo",
        messages=[Message(Role.USER, [TextBlock("Hi")])],
        max_tokens=10,
        request_id="r1",
    )
    return dataclasses.replace(base, **fields)


def _route() -> Route:
    provider = OfflineProvider("offline", OfflineSettings())
    return Route(provider, provider.models()[0])


def test_every_request_field_is_in_the_key_unless_excluded() -> None:
    """A field the cache code does not name changes the key: the encoding is generic."""
    route = _route()
    base = cache_key(_request(), route, protocol="grpc", scope="k")
    changes: dict[str, Any] = {
        "model": "other",
        "messages": [Message(Role.USER, [TextBlock("Hi!")])],
        "max_tokens": 11,
        "system": [TextBlock("sys")],
        "tools": [Tool("t", input_schema={"type": "object"})],
        "tool_choice": ToolChoice(ToolChoiceMode.ANY),
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 1,
        "stop_sequences": ["x"],
        "thinking_budget_tokens": 1024,
        "provider_options": {"a": 1},
        "passthrough": Passthrough("anthropic.messages", b"{}", {}),
        "choices": 2,
    }
    excluded = EXCLUDED[GenerationRequest]
    named = set(changes) | excluded
    assert named == {f.name for f in dataclasses.fields(GenerationRequest)}, (
        "a new GenerationRequest field: add a change here (or, if it cannot change the"
        " answer, to EXCLUDED)"
    )
    for name, value in changes.items():
        assert cache_key(_request(**{name: value}), route, protocol="grpc", scope="k") != base, name
    for name, value in {"request_id": "r2", "deadline": 5.0, "incremental": False}.items():
        assert cache_key(_request(**{name: value}), route, protocol="grpc", scope="k") == base, name
    # The edge's protocol and the tenant scope are in the key too.
    assert cache_key(_request(), route, protocol="anthropic.messages", scope="k") != base
    assert cache_key(_request(), route, protocol="grpc", scope="other") != base


async def test_a_large_requests_key_is_hashed_while_the_loop_serves_others() -> None:
    """A large request's key (LARGE_REQUEST) is the same key, its SHA-256 computed
    in a thread (hashlib lets go of the GIL), so other tasks run meanwhile."""
    route = _route()
    large = _request(messages=[Message(Role.USER, [TextBlock("word é 😀 " * 600_000)])])
    small = _request()
    for request in (small, large):
        expected = cache_key(request, route, protocol="grpc", scope="k")
        assert await cache_key_async(request, route, protocol="grpc", scope="k") == expected
    token = LARGE_REQUEST.set(True)
    try:
        keyed, ticks = await ticks_during(cache_key_async(large, route, protocol="grpc", scope="k"))
    finally:
        LARGE_REQUEST.reset(token)
    assert keyed == cache_key(large, route, protocol="grpc", scope="k")
    assert ticks > 0


def test_pass_through_bytes_and_headers_are_in_the_key() -> None:
    route = _route()

    def key(body: bytes, headers: dict[str, str]) -> str:
        passthrough = Passthrough("anthropic.messages", body, json.loads(body), headers)
        return cache_key(_request(passthrough=passthrough), route, protocol="m", scope="k")

    base = key(b'{"a":1}', {"anthropic-beta": "x"})
    assert key(b'{"a":2}', {"anthropic-beta": "x"}) != base
    assert key(b'{"a":1}', {"anthropic-beta": "y"}) != base
    assert key(b'{"a":1}', {"anthropic-beta": "x"}) == base


def test_values_never_encode_alike() -> None:
    route = _route()
    keys = {
        cache_key(_request(provider_options=options), route, protocol="grpc", scope="k")
        for options in (
            {"a": "1"},
            {"a": 1},
            {"a": 1.0},
            {"a": True},
            {"a": None},
            {"a": [1]},
            {"a": b"1"},
            {"a1": ""},
            {"a": "", "b": ""},
        )
    }
    assert len(keys) == 9


# -- what is not stored ----------------------------------------------------------------


async def test_errors_are_not_stored(gateway: RunningGateway, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(status=500))
    with pytest.raises(grpc.aio.AioRpcError):
        await generate(gateway.stub, ask())
    _, trailers = await generate(gateway.stub, ask())
    assert trailers["x-llmgw-cache"] == MISS
    assert len(fake.requests) == 2


async def test_a_stream_failing_midway_is_not_stored(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three four")], error_after=4))
    with pytest.raises(grpc.aio.AioRpcError):
        await stream(gateway.stub, ask())
    _, trailers = await generate(gateway.stub, ask())
    assert trailers["x-llmgw-cache"] == MISS


async def test_a_cancelled_stream_is_not_stored(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("one two three four five six")], event_delay_s=0.05))
    call = gateway.stub.StreamGenerate(ask())
    async for _ in call:
        break
    call.cancel()
    await asyncio.sleep(0.3)
    _, trailers = await generate(gateway.stub, ask())
    assert trailers["x-llmgw-cache"] == MISS
    assert len(fake.requests) == 2


async def test_max_tokens_and_tool_calls_are_not_stored_unless_allowed(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = await start_front_door(fake, tmp_path, **CACHE_ON)
    try:
        fake.enqueue(Reply(stop_reason="max_tokens"), RICH)
        await generate(gw.stub, ask("cut"))
        await generate(gw.stub, ask("tools"))
        for text in ("cut", "tools"):
            _, trailers = await generate(gw.stub, ask(text))
            assert trailers["x-llmgw-cache"] == MISS, text
    finally:
        await gw.aclose()
    allowed = {"cache.store_max_tokens": True, "cache.store_tool_calls": True}
    gw = await start_front_door(fake, tmp_path, **CACHE_ON, **allowed)
    try:
        fake.enqueue(Reply(stop_reason="max_tokens"), RICH)
        await generate(gw.stub, ask("cut"))
        await generate(gw.stub, ask("tools"))
        for text in ("cut", "tools"):
            _, trailers = await generate(gw.stub, ask(text))
            assert trailers["x-llmgw-cache"] == HIT, text
    finally:
        await gw.aclose()


# -- single flight, tenants, budgets ---------------------------------------------------


async def test_fifty_identical_misses_make_one_upstream_call(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(delay_s=0.3))
    results = await asyncio.gather(*(generate(gateway.stub, ask("together")) for _ in range(50)))
    assert len(fake.requests) == 1
    outcomes = sorted(trailers["x-llmgw-cache"] for _, trailers in results)
    assert outcomes == [HIT] * 49 + [MISS]
    assert {r.content[0].text for r, _ in results} == {"Hello from the fake upstream."}


@pytest.mark.parametrize("namespace", ["", "team"])
async def test_two_keys_never_share_an_entry_unless_a_namespace_says_so(
    tmp_path: Path, namespace: str
) -> None:
    config = auth_config(tmp_path)
    config = config.model_copy(update={"cache": CacheConfig(enabled=True, namespace=namespace)})
    create_key(config.auth, name="bootstrap")
    keys = [create_key(config.auth, name=name)[1] for name in ("one", "two")]
    gw = await started(Gateway(config))
    try:
        outcomes = []
        for key in (keys[0], keys[1], keys[0]):
            call = gw.stub.Generate(ask("same", model="echo"), metadata=bearer(key))
            await call
            trailers = dict(await call.trailing_metadata())
            outcomes.append(trailers["x-llmgw-cache"])
        assert outcomes == ([MISS, MISS, HIT] if not namespace else [MISS, HIT, HIT])
    finally:
        await gw.aclose()


async def test_a_hit_is_not_charged_to_token_limits_or_budgets(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = await start_front_door(
        fake, tmp_path, **CACHE_ON, **{"limits.default.tokens_per_minute": 100_000}
    )
    holds: list[object] = []
    # First, before the admission's settle takes the hold off the record.
    gw.gateway.servicer.observers.insert(0, lambda record: holds.append(record.quota_hold))
    try:
        await generate(gw.stub, ask())
        await generate(gw.stub, ask())
        assert isinstance(holds[0], QuotaHold) and holds[1] is None
    finally:
        await gw.aclose()


# -- the ledger -------------------------------------------------------------------------


async def test_the_ledger_records_the_outcome_a_hit_costing_nothing(
    gateway: RunningGateway,
) -> None:
    await generate(gateway.stub, ask())
    await generate(gateway.stub, ask())
    await generate(gateway.stub, ask(), ("x-llmgw-cache", "no-store"))
    ledger = gateway.gateway.accounting.ledger
    assert isinstance(ledger, SqliteLedger)
    await ledger.flush()
    miss, hit, bypass = await ledger.rows()
    assert (miss["cache"], hit["cache"], bypass["cache"]) == (MISS, HIT, BYPASS)
    assert isinstance(miss["cost_nanos"], int) and miss["cost_nanos"] > 0
    assert hit["cost_nanos"] == 0
    assert hit["cache_saved_nanos"] == miss["cost_nanos"]
    assert (hit["input_tokens"], hit["output_tokens"]) == (12, 7)  # the answer's usage
    assert hit["usage_estimated"] == 0
    assert miss["cache_saved_nanos"] == 0


async def test_a_ledger_from_before_the_cache_gains_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE usage (id INTEGER PRIMARY KEY, call_id TEXT, time REAL NOT NULL,"
            " key_id TEXT NOT NULL, request_id TEXT NOT NULL, method TEXT NOT NULL,"
            " model_requested TEXT NOT NULL, model_served TEXT NOT NULL, provider TEXT NOT NULL,"
            " deployment TEXT NOT NULL, input_tokens INTEGER NOT NULL,"
            " output_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL,"
            " cache_write_tokens INTEGER NOT NULL, cost_nanos INTEGER NOT NULL, latency_s REAL,"
            " ttft_s REAL, status TEXT NOT NULL, error_reason TEXT NOT NULL,"
            " usage_estimated INTEGER NOT NULL DEFAULT 0, edge TEXT NOT NULL DEFAULT 'grpc',"
            " end_user TEXT NOT NULL DEFAULT '')"
        )
        conn.execute(
            "INSERT INTO usage (call_id, time, key_id, request_id, method, model_requested,"
            " model_served, provider, deployment, input_tokens, output_tokens,"
            " cache_read_tokens, cache_write_tokens, cost_nanos, status, error_reason)"
            " VALUES ('c0', 1, 'k', 'r', 'Generate', 'm', 'm', 'p', 'p/m', 1, 1, 0, 0, 5, 'OK', '')"
        )
    conn.close()
    ledger = SqliteLedger(path, flush_interval_s=0.05)
    await ledger.start()
    record = CallRecord("Generate", "r1", cache=HIT, cache_saved_nanos=42)
    record.ended_at = record.started_at
    ledger.record(record)
    await ledger.flush()
    old, new = await ledger.rows()
    await ledger.aclose()
    assert (old["cache"], old["cache_saved_nanos"]) == ("", 0)
    assert (new["cache"], new["cache_saved_nanos"]) == (HIT, 42)


# -- the HTTP front door ------------------------------------------------------------------

MESSAGES = ("/v1/messages", {"model": "claude-test", "max_tokens": 50})
CHAT = ("/v1/chat/completions", {"model": "gpt-test"})
RESPONSES = ("/v1/responses", {"model": "gpt-test"})


def _body(endpoint: tuple[str, dict[str, Any]], text: str, streamed: bool) -> dict[str, Any]:
    path, body = endpoint
    if path == "/v1/responses":
        return {**body, "input": text, "stream": streamed}
    return {**body, "messages": [{"role": "user", "content": text}], "stream": streamed}


async def post(
    url: str, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, bytes, httpx2.Headers]:
    async with httpx2.AsyncClient() as client:
        response = await client.post(
            f"{url}{path}",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"}
            | headers,
            timeout=30,
        )
        return response.status_code, response.content, response.headers


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    "endpoint", [MESSAGES, CHAT, RESPONSES], ids=["messages", "chat", "responses"]
)
async def test_a_relayed_hit_replays_the_same_bytes(
    gateway: RunningGateway,
    fake: FakeUpstream,
    endpoint: tuple[str, dict[str, Any]],
    streamed: bool,
) -> None:
    fake.enqueue(Reply(blocks=[Thinking("Hmm.", signature="sig-1"), Text("Four, I think.")]))
    url, body = base_url(gateway), _body(endpoint, "2+2?", streamed)
    status, first, headers = await post(url, endpoint[0], body)
    assert (status, headers["x-llmgw-cache"]) == (200, MISS)
    status, second, headers = await post(url, endpoint[0], body)
    assert (status, headers["x-llmgw-cache"]) == (200, HIT)
    assert second == first
    assert len(fake.requests) == 1


async def test_http_cache_control_and_the_gateways_headers(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    url, body = base_url(gateway), _body(MESSAGES, "headers", False)
    await post(url, "/v1/messages", body)
    _, _, headers = await post(url, "/v1/messages", body, **{"cache-control": "no-cache"})
    assert headers["x-llmgw-cache"] == REFRESH
    _, _, headers = await post(url, "/v1/messages", body, **{"cache-control": "no-store"})
    assert headers["x-llmgw-cache"] == BYPASS
    _, _, headers = await post(url, "/v1/messages", body, **{"x-llmgw-cache": "no-store"})
    assert headers["x-llmgw-cache"] == BYPASS
    _, _, headers = await post(url, "/v1/messages", body)
    assert headers["x-llmgw-cache"] == HIT
    assert len(fake.requests) == 4
    status, _, _ = await post(url, "/v1/messages", body, **{"x-llmgw-cache": "sometimes"})
    assert status == 400


async def test_a_translated_http_answer_and_a_grpc_one_never_share(
    gateway: RunningGateway,
) -> None:
    url = base_url(gateway)
    body = {"model": "echo", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    _, first, headers = await post(url, "/v1/messages", body)
    assert headers["x-llmgw-cache"] == MISS
    _, second, headers = await post(url, "/v1/messages", body)
    assert headers["x-llmgw-cache"] == HIT
    assert json.loads(second)["content"] == json.loads(first)["content"]
    _, trailers = await generate(gateway.stub, ask("hi", model="echo", max_tokens=50))
    assert trailers["x-llmgw-cache"] == MISS  # another protocol, another key


# -- the cache on its own: expiry, the byte bound, entries --------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


ANSWER: list[StreamEvent] = [
    MessageStart("msg_1", "echo", "offline", request_id="r0", usage=Usage(3, 0)),
    ContentBlockStart(0, ThinkingBlock()),
    ThinkingDelta(0, "hm"),
    SignatureDelta(0, "sig"),
    ContentBlockStop(0),
    ContentBlockStart(1, TextBlock("")),
    TextDelta(1, "Hi"),
    ContentBlockStop(1),
    MessageDelta(StopReason.END_TURN, usage=Usage(3, 2), cost=Cost(input_nanos=9)),
    MessageStop(),
    RawChunk(b"\x00raw bytes\xff"),
]


async def _upstream_counting(calls: list[int]) -> Any:
    async def upstream(request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        calls.append(1)
        for event in ANSWER[:-1]:
            yield event

    return upstream


async def _call(cache: ResponseCache, calls: list[int], ttl: float | None = None) -> str:
    record = CallRecord("Generate", "r")
    request, route = _request(), _route()
    cached = await cache.open(
        record, request, route, protocol="grpc", directives=CacheDirectives(ttl_s=ttl)
    )
    assert cached is not None
    upstream = await _upstream_counting(calls)
    try:
        async for _ in cached.events(request, route, upstream):
            pass
    finally:
        await cached.close()
    return record.cache


async def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(CacheConfig(enabled=True, ttl_s=60), RedisConfig(), clock=clock)
    calls: list[int] = []
    assert await _call(cache, calls) == MISS
    clock.now += 59
    assert await _call(cache, calls) == HIT
    clock.now += 2
    assert await _call(cache, calls) == MISS
    # A caller's x-llmgw-cache-ttl shortens the stored answer's life.
    await _call(cache, calls, ttl=None)
    clock.now += 61
    assert await _call(cache, calls, ttl=5) == MISS
    clock.now += 4
    assert await _call(cache, calls) == HIT
    clock.now += 2
    assert await _call(cache, calls) == MISS


async def test_the_memory_backend_evicts_the_least_recently_used_beyond_its_bytes() -> None:
    backend = MemoryBackend(max_bytes=300)
    entry = CacheEntry(ANSWER)
    for key in ("a", "b", "c"):
        await backend.put(key, entry, 100, 60)
    assert backend.bytes == 300 and backend.evictions == 0
    assert await backend.get("a") is not None  # a is now the most recently used
    await backend.put("d", entry, 100, 60)
    assert backend.evictions == 1
    assert await backend.get("b") is None
    assert all([await backend.get(k) for k in ("a", "c", "d")])
    await backend.put("big", entry, 301, 60)  # over the whole bound: not kept
    assert await backend.get("big") is None and backend.bytes == 300


async def test_max_entry_bytes_leaves_a_large_answer_unstored() -> None:
    cache = ResponseCache(CacheConfig(enabled=True, max_entry_bytes=100), RedisConfig())
    calls: list[int] = []
    assert await _call(cache, calls) == MISS
    assert await _call(cache, calls) == MISS
    assert len(calls) == 2


def test_an_entry_survives_its_encoding_event_for_event() -> None:
    entry = CacheEntry(ANSWER, cost_nanos=9, stored_at=1.5)
    again = CacheEntry.decode(entry.encode())
    assert again == entry


def test_directives_from_metadata_and_headers() -> None:
    assert directives_from_metadata([("x-llmgw-cache", "no-cache")]).no_cache
    assert directives_from_metadata([("x-llmgw-cache-ttl", "2.5")]).ttl_s == 2.5
    assert directives_from_headers({"cache-control": "max-age=0, no-store"}).no_store
    assert directives_from_headers({}) == CacheDirectives()
    with pytest.raises(InvalidArgumentError):
        directives_from_headers({"x-llmgw-cache-ttl": "nan"})


async def test_metrics_count_outcomes_bytes_and_lookups(fake: FakeUpstream, tmp_path: Path) -> None:
    metrics = {"metrics.enabled": True, "metrics.port": 0}
    gw = await start_front_door(fake, tmp_path, **CACHE_ON, **metrics)
    try:
        await generate(gw.stub, ask())
        await generate(gw.stub, ask())
        await generate(gw.stub, ask(), ("x-llmgw-cache", "no-store"))
        found = samples(await scrape(gw.gateway.telemetry.metrics_port))
        for outcome in (MISS, HIT, BYPASS):
            labels = frozenset({("edge", "grpc"), ("outcome", outcome)})
            assert found["llmgw_cache_calls_total", labels] == 1.0, outcome
        assert found["llmgw_cache_bytes", frozenset()] > 0
        assert found["llmgw_cache_entries", frozenset()] == 1.0
        assert found["llmgw_cache_evictions_total", frozenset()] == 0.0
        lookups = found["llmgw_cache_lookup_seconds_count", frozenset({("edge", "grpc")})]
        assert lookups == 2.0  # the bypass looked nothing up
    finally:
        await gw.aclose()


# -- what the memory backend counts is what it holds ---------------------------------


async def _kept_bytes_per_answer(
    store: ResponseCache | Idempotency, backend: MemoryBackend, text: str
) -> tuple[float, float]:
    """Makes distinct calls through `store`, the router's echo answering `text`;
    the memory they left behind per answer, as tracemalloc sees it, and as the
    backend counts it."""
    config = load_config(environ={}, overrides=TEST_CONFIG)
    router = Router.from_config(config)
    route = router.resolve("echo")
    assert route is not None

    async def call(i: int) -> None:
        prompt = f"{i} {text}"  # a text of its own, as every caller's is
        request = _request(messages=[Message(Role.USER, [TextBlock(prompt)])], max_tokens=4096)
        request = dataclasses.replace(request, request_id=f"soak-grpc-unary-{i}")
        record = CallRecord("Generate", request.request_id, key_id="key-a")
        if isinstance(store, Idempotency):
            cached = await store.open(record, request, route, protocol="grpc")
        else:
            directives = CacheDirectives()
            cached = await store.open(
                record, request, route, protocol="grpc", directives=directives
            )
        assert cached is not None and cached.outcome == MISS
        try:
            async for _ in cached.events(request, route, router.stream):
                pass
        finally:
            await cached.close()

    for i in range(-50, 0):  # warm: the first calls' one-time allocations
        await call(i)
    n = 300
    gc.collect()
    tracemalloc.start()
    try:
        before, counted = tracemalloc.get_traced_memory()[0], backend.bytes
        for i in range(n):
            await call(i)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert backend.entries == n + 50
    await router.aclose()
    return held / n, (backend.bytes - counted) / n


@pytest.mark.parametrize(
    "text",
    ["hello", "tell me more about it, " * 20, "日本語のテキスト" * 30, "emoji 🙂 " * 40],
    ids=["short", "many-deltas", "cjk", "astral"],
)
async def test_the_memory_backend_counts_what_its_answers_hold(text: str) -> None:
    # The bound of `cache.max_bytes` and `idempotency.max_bytes` is what the
    # process holds: counting only the texts held 2.6 times the bound for short
    # answers (the idempotency store keeps every call's answer).
    cache = ResponseCache(CacheConfig(enabled=True), RedisConfig())
    held, counted = await _kept_bytes_per_answer(cache, cache.backends["memory"], text)
    assert held <= counted <= 1.6 * held, (held, counted)
    await cache.aclose()
    store = Idempotency(IdempotencyConfig(), RedisConfig())
    backend = store._answers.backends["memory"]
    held, counted = await _kept_bytes_per_answer(store, backend, text)
    assert held <= counted <= 1.6 * held, (held, counted)
    await store.aclose()


async def test_the_memory_backend_drops_expired_entries_unasked() -> None:
    # An idempotency store's answers all live as long: without this, each would
    # stay until the bound pushed it out, and the store would fill to its bound.
    clock = Clock()
    backend = MemoryBackend(max_bytes=10_000, clock=clock)
    entry = CacheEntry(ANSWER)
    for key in ("a", "b", "c"):
        await backend.put(key, entry, 100, 60)
        clock.now += 10
    clock.now += 45  # a and b have expired, c has 5 s left
    await backend.put("d", entry, 100, 60)
    assert backend.entries == 2 and backend.bytes == 200 and backend.evictions == 0
    assert await backend.get("c") is not None and await backend.get("d") is not None
    clock.now += 100
    await backend.put("e", entry, 100, 60)
    assert backend.entries == 1 and backend.bytes == 100
