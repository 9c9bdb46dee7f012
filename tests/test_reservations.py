"""Budget reservations cover the most a call can cost (issue 14, items 2 and 3).

Through the real SDK path to the fake upstream: a fallback to a dearer
deployment is reserved at the dearer price; a model served by prefix
without a listed price is not free; and prompts the old word count
underestimated (long unbroken text, CJK) are reserved at what they cost.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from server.catalog import ANTHROPIC_MODELS
from tests.conftest import RunningGateway, detail, free_port, rich_status
from tests.fake_upstream import FakeUpstream, Reply, Usage
from tests.upstream_fixtures import SINGLE_ATTEMPT, ask, provider_config, start_upstream_gateway

CHEAP = {"input_per_mtok": 1.0, "output_per_mtok": 5.0}
DEAR = {"input_per_mtok": 10.0, "output_per_mtok": 50.0}


def nanos(tokens: int, per_mtok: float) -> int:
    return round(tokens * per_mtok * 1000)


def providers(fake: FakeUpstream) -> dict[str, Any]:
    config = copy.deepcopy(provider_config(fake))
    config["anthropic"]["models"] += [
        {"id": "claude-cheap", "pricing": CHEAP},
        {"id": "claude-dear", "pricing": DEAR},
    ]
    # Nobody listens there: every call to it fails before any content.
    config["down"] = {
        "type": "anthropic",
        "api_key": "unused",
        "base_url": f"http://127.0.0.1:{free_port()}",
        "route_prefixes": [],
        "models": [{"id": "claude-cheap-down", "upstream_id": "claude-cheap", "pricing": CHEAP}],
    }
    return config


Factory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def budgeted_gateway(
    fake: FakeUpstream, tmp_path: Path, _openai_key_in_environment: None
) -> AsyncIterator[Factory]:
    running: list[RunningGateway] = []

    async def make(daily_usd: float, **overrides: Any) -> RunningGateway:
        gw = await start_upstream_gateway(
            fake,
            **{
                "providers": providers(fake),
                "routing": {
                    **SINGLE_ATTEMPT,
                    "routes": {
                        "cheap-then-dear": [
                            {"provider": "down", "model": "claude-cheap-down"},
                            {"provider": "anthropic", "model": "claude-dear"},
                        ]
                    },
                },
                "budgets.default.daily_usd": daily_usd,
                "ledger.path": str(tmp_path / "usage.sqlite3"),
                **overrides,
            },
        )
        running.append(gw)
        return gw

    yield make
    for gw in running:
        await gw.aclose()


async def spent(gw: RunningGateway) -> int:
    await asyncio.sleep(0.05)  # settling runs right after each call
    [(_, spent_nanos, reserved)] = await gw.gateway.accounting.admission.budget_state(
        "", gw.gateway.accounting.policy.limits_for_key("")
    )
    assert reserved == 0
    return spent_nanos


async def outcomes(calls: list[Awaitable[object]]) -> list[grpc.StatusCode]:
    async def one(call: Awaitable[object]) -> grpc.StatusCode:
        try:
            await call
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def test_a_fallback_to_a_dearer_deployment_is_reserved_at_its_price(
    budgeted_gateway: Factory, fake: FakeUpstream
) -> None:
    output = 1_000
    call_cost = nanos(12, DEAR["input_per_mtok"]) + nanos(output, DEAR["output_per_mtok"])
    limit = 2.5 * call_cost  # room for two calls served by the dear deployment
    gw = await budgeted_gateway(limit / 1e9)
    fake.enqueue(*(Reply(usage=Usage(input_tokens=12, output_tokens=output)) for _ in range(10)))
    codes = await outcomes(
        [gw.stub.Generate(ask("cheap-then-dear", "Hi", max_tokens=output)) for _ in range(10)]
    )
    # Reserved at the cheap primary's price, all ten would run and spend 4x the budget.
    assert codes.count(grpc.StatusCode.OK) == 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    assert await spent(gw) == 2 * call_cost <= limit


async def test_a_model_served_by_prefix_is_priced_at_its_family_dearest(
    budgeted_gateway: Factory, fake: FakeUpstream
) -> None:
    gw = await budgeted_gateway(0.01)
    router = gw.gateway.router
    listed = [router.resolve(m) for m in ("claude-fable-5-1", "claude-haiku-5-5")]
    assert all(r is not None for r in listed)
    unlisted_haiku = router.resolve("claude-haiku-9")
    unlisted_other = router.resolve("claude-nova-1")
    assert unlisted_haiku is not None and unlisted_other is not None
    fable = router.resolve("claude-fable-5-1")
    assert fable is not None
    # Its family: the shipped catalog's Haiku models.
    haikus = [m["pricing"] for i, m in ANTHROPIC_MODELS.items() if i.startswith("claude-haiku-")]
    assert haikus
    priced = unlisted_haiku.model.pricing
    assert priced.output_per_mtok == max(p["output_per_mtok"] for p in haikus)
    assert priced.input_per_mtok == max(p["input_per_mtok"] for p in haikus)
    assert unlisted_other.model.pricing.output_per_mtok == fable.model.pricing.output_per_mtok > 0

    # A budgeted key pays for it: 8,000 output tokens at Fable's price are
    # far over a one-cent budget, and the call is refused before the upstream.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-nova-1", "Hi", max_tokens=8_000))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake.requests == []
    fake.enqueue(Reply(usage=Usage(input_tokens=10, output_tokens=20)))
    await gw.stub.Generate(ask("claude-nova-1", "Hi", max_tokens=20))
    assert await spent(gw) == nanos(10, 10.0) + nanos(20, 50.0)


async def test_configured_price_for_unlisted_models(
    budgeted_gateway: Factory, fake: FakeUpstream
) -> None:
    gw = await budgeted_gateway(1.0)
    assert gw.gateway.router.resolve("claude-nova-1") is not None
    config = providers(fake)
    config["anthropic"]["unlisted_pricing"] = {"input_per_mtok": 7.0, "output_per_mtok": 70.0}
    priced = await budgeted_gateway(1.0, providers=config)
    route = priced.gateway.router.resolve("claude-nova-1")
    assert route is not None
    assert (route.model.pricing.input_per_mtok, route.model.pricing.output_per_mtok) == (7.0, 70.0)


@pytest.mark.parametrize(
    ("prompt", "real_input"),
    [
        ("x" * 40_000, 10_000),  # no space: the word count said 1 token
        ("日本語の文章です。" * 500, 4_500),  # 4,500 characters: the word count said about 500
    ],
    ids=["unbroken", "japanese"],
)
async def test_a_budget_for_ten_calls_admits_at_most_ten(
    budgeted_gateway: Factory, fake: FakeUpstream, prompt: str, real_input: int
) -> None:
    call_cost = nanos(real_input, DEAR["input_per_mtok"]) + nanos(10, DEAR["output_per_mtok"])
    limit = 10 * call_cost
    gw = await budgeted_gateway(limit / 1e9)
    fake.enqueue(
        *(Reply(usage=Usage(input_tokens=real_input, output_tokens=10)) for _ in range(20))
    )
    codes = await outcomes(
        [gw.stub.Generate(ask("claude-dear", prompt, max_tokens=10)) for _ in range(20)]
    )
    assert 1 <= codes.count(grpc.StatusCode.OK) <= 10
    assert await spent(gw) <= limit


async def test_a_request_that_can_never_fit_the_tpm_says_so(
    budgeted_gateway: Factory, fake: FakeUpstream
) -> None:
    gw = await budgeted_gateway(1.0, **{"limits.default.tokens_per_minute": 1_000})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("claude-dear", "Hi", max_tokens=2_000))
    # Not "retry in 60 s": no wait would let it through.
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    status = rich_status(caught.value)
    info = detail(status, error_details_pb2.ErrorInfo)
    failure = detail(status, error_details_pb2.QuotaFailure)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert isinstance(failure, error_details_pb2.QuotaFailure)
    assert info.reason == "REQUEST_OVER_LIMIT"
    assert failure.violations[0].subject == "key::tokens_per_minute"
    assert "can never fit" in caught.value.details()
    assert detail(status, error_details_pb2.RetryInfo) is None
    assert "retry-after" not in dict(caught.value.trailing_metadata() or ())
    assert fake.requests == []
    fake.enqueue(Reply())
    await gw.stub.Generate(ask("claude-dear", "Hi", max_tokens=500))  # one that fits still runs
