"""The ledger records what happened (issue 14, item 7).

A call whose deadline ran out is DEADLINE_EXCEEDED, not CANCELLED; a
cancelled OpenAI stream (whose usage would have come only in its last chunk)
pays for its input; an upstream that reports no usage is not a free call.
Estimated rows are flagged `usage_estimated`. A long prompt is billed at its
model's long-prompt rates.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.calls import CallRecord, accounted, open_record
from server.costs import compute_cost
from server.schema import Pricing, Usage
from server.token_estimate import count_text
from tests.conftest import RunningGateway, request
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.fake_upstream.script import Usage as Reported
from tests.redis_fixtures import limited_gateway
from tests.test_ledger import ledger_rows
from tests.upstream_fixtures import PRICING, ask, provider_config, start_upstream_gateway

PROMPT = "Summarise the history of the printing press in three short paragraphs."


@pytest.fixture
async def gateway(
    fake: FakeUpstream, tmp_path: Path, _openai_key_in_environment: None
) -> AsyncIterator[RunningGateway]:
    gw = await start_upstream_gateway(
        fake,
        **{"ledger.path": str(tmp_path / "usage.sqlite3"), "ledger.flush_interval_s": 0.05},
    )
    yield gw
    await gw.aclose()


async def rows(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    await asyncio.sleep(0.3)  # two flush intervals
    ledger = gw.gateway.config.ledger
    return ledger_rows(Path(ledger.path))


def priced(usage: Usage) -> int:
    return compute_cost(usage, Pricing(**PRICING)).total_nanos


async def test_calls_whose_deadline_ran_out_are_deadline_exceeded(tmp_path: Path) -> None:
    slow = {"chunk_delay_ms": 100}
    async with limited_gateway(tmp_path) as gw:

        async def late(i: int) -> grpc.StatusCode:
            try:
                call = request("a b c d e f g h", request_id=f"late{i}", provider_options=slow)
                await gw.stub.Generate(call, timeout=0.25)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(late(i) for i in range(28)))
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        await asyncio.sleep(0.3)
        recorded = ledger_rows(gw.ledger_path)
    assert len(recorded) == 28
    assert {row["status"] for row in recorded.values()} == {"DEADLINE_EXCEEDED"}


@pytest.mark.parametrize(
    ("remaining", "status"),
    [
        (-0.01, grpc.StatusCode.DEADLINE_EXCEEDED),
        # The caller's clock ran out a few ms before ours: its cancel is the deadline.
        (0.004, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.5, grpc.StatusCode.CANCELLED),
        (None, grpc.StatusCode.CANCELLED),
    ],
)
async def test_a_cancel_at_the_deadline_is_recorded_as_the_deadline(
    remaining: float | None, status: grpc.StatusCode
) -> None:
    closed: list[CallRecord] = []
    record = open_record("Generate", "echo")
    now = asyncio.get_running_loop().time()
    deadline = None if remaining is None else now + remaining
    with pytest.raises(asyncio.CancelledError):
        async with accounted(record, [closed.append], deadline):
            raise asyncio.CancelledError
    assert [r.status for r in closed] == [status]


async def test_a_cancelled_openai_stream_pays_for_its_input(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    words = " ".join(f"word{i}" for i in range(40))
    fake.enqueue(Reply(blocks=[Text(words)], event_delay_s=0.05))
    stream = gateway.stub.StreamGenerate(ask("gpt-test", PROMPT, request_id="cut"))
    deltas = 0
    async for event in stream:
        deltas += event.HasField("content_block_delta")
        if deltas == 2:
            stream.cancel()
            break
    row = (await rows(gateway))["cut"]
    assert row["status"] == "CANCELLED"
    # OpenAI reports usage only in the stream's last chunk, which never came.
    assert row["input_tokens"] >= count_text(PROMPT) > 0
    assert row["output_tokens"] >= 2
    assert row["usage_estimated"] == 1
    usage = Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
    assert row["cost_nanos"] == priced(usage) > 0


NO_USAGE_COMPLETION = {
    "id": "chatcmpl-nousage",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-upstream-1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Gutenberg, around 1440, in Mainz."},
            "finish_reason": "stop",
        }
    ],
}


def no_usage_stream() -> bytes:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Gutenberg, around 1440,"}}]},
        {"choices": [{"index": 0, "delta": {"content": " in Mainz."}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    events = [
        "data: "
        + json.dumps(
            {
                "id": "chatcmpl-nousage",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-upstream-1",
                **chunk,
            }
        )
        + "\n\n"
        for chunk in chunks
    ]
    return ("".join(events) + "data: [DONE]\n\n").encode()


async def test_an_upstream_that_reports_no_usage_is_not_a_free_call(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(raw_body=json.dumps(NO_USAGE_COMPLETION).encode()),
        Reply(raw_body=no_usage_stream()),
    )
    response = await gateway.stub.Generate(ask("gpt-test", PROMPT, request_id="unary"))
    assert response.content[0].text == "Gutenberg, around 1440, in Mainz."
    events = [
        e async for e in gateway.stub.StreamGenerate(ask("gpt-test", PROMPT, request_id="sse"))
    ]
    assert events
    recorded = await rows(gateway)
    for request_id in ("unary", "sse"):
        row = recorded[request_id]
        assert row["status"] == "OK"
        assert row["usage_estimated"] == 1
        assert row["input_tokens"] >= count_text(PROMPT)
        assert row["output_tokens"] >= 3
        usage = Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
        assert row["cost_nanos"] == priced(usage) > 0


async def test_reported_usage_is_not_flagged(gateway: RunningGateway, fake: FakeUpstream) -> None:
    fake.enqueue(Reply(), Reply())
    await gateway.stub.Generate(ask("gpt-test", PROMPT, request_id="openai"))
    await gateway.stub.Generate(ask("claude-test", PROMPT, request_id="anthropic"))
    recorded = await rows(gateway)
    for request_id in ("openai", "anthropic"):
        row = recorded[request_id]
        assert (row["input_tokens"], row["output_tokens"], row["usage_estimated"]) == (12, 7, 0)


@pytest.mark.usefixtures("_openai_key_in_environment")
async def test_a_long_prompt_is_billed_at_its_models_long_prompt_rates(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """claude-haiku-5-5 bills a prompt over 100,000 tokens (cache reads included) at
    5x, output too (server/catalog.py); a shorter one at its listed rates."""
    providers = provider_config(fake)
    providers["anthropic"]["models"].append({"id": "claude-haiku-5-5"})
    gw = await start_upstream_gateway(
        fake,
        providers=providers,
        **{"ledger.path": str(tmp_path / "usage.sqlite3"), "ledger.flush_interval_s": 0.05},
    )
    try:
        fake.enqueue(
            Reply(usage=Reported(input_tokens=96_000, output_tokens=1_000,
                                 cache_read_input_tokens=5_000)),
            Reply(usage=Reported(input_tokens=96_000, output_tokens=1_000)),
        )  # fmt: skip
        await gw.stub.Generate(ask("claude-haiku-5-5", PROMPT, request_id="long"))
        await gw.stub.Generate(ask("claude-haiku-5-5", PROMPT, request_id="short"))
        recorded = await rows(gw)
    finally:
        await gw.aclose()
    assert recorded["long"]["cost_nanos"] == 96_000 * 500 + 1_000 * 2_500 + 5_000 * 50
    assert recorded["short"]["cost_nanos"] == 96_000 * 100 + 1_000 * 500
