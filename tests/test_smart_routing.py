"""Smart routing (server/routing/smart.py): the `auto` alias picks a tier per request."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from llmgateway.v1 import generation_pb2 as pb
from server.config import ConfigError, SmartRoutingConfig, load_config
from server.routing import Router
from server.routing.smart import choose_tier, configured_tier
from server.schema import (
    CallerMetadata,
    GenerationRequest,
    ImageBlock,
    Message,
    Role,
    TextBlock,
    Tool,
)
from tests.conftest import TEST_CONFIG, user
from tests.fake_upstream import FakeUpstream, Reply
from tests.upstream_fixtures import RoutedGatewayFactory, ask, fold_stream, generate, stream_all

COUNT_PATH = "/v1/messages/count_tokens"

CONFIG = SmartRoutingConfig(
    tiers={"small": "tiny", "medium": "echo", "large": "echo"},
    medium_input_tokens=100,
    large_input_tokens=5000,
    low_budget_nanos=1_000_000,
)


def req(
    text: str = "What is the capital of France?",
    *,
    tools: bool = False,
    image: bool = False,
    tags: dict[str, str] | None = None,
) -> GenerationRequest:
    content: list[Any] = [TextBlock(text)]
    if image:
        content.append(ImageBlock(data=b"\x89PNG", media_type="image/png"))
    return GenerationRequest(
        model="auto",
        messages=[Message(Role.USER, content)],
        max_tokens=10,
        request_id="smart",
        tools=[Tool("get_weather")] if tools else [],
        metadata=CallerMetadata(tags=tags or {}),
    )


CASES = [
    (req(), None, "small"),
    (req(" ".join(["word"] * 200)), None, "medium"),
    (req(" ".join(["word"] * 6000)), None, "large"),
    (req("Why does this fail?\n```python\nprint(1/0)\n```"), None, "medium"),
    (req("Fix it:\ndef f(x):\n    return x +"), None, "medium"),
    (req(tools=True), None, "medium"),
    (req(image=True), None, "medium"),
    (req(tags={"tier": "large"}), None, "large"),
    (req(" ".join(["word"] * 6000), tags={"tier": "small"}), None, "small"),
    (req(tags={"tier": "huge"}), None, "small"),  # not a tier: ignored
    (req(" ".join(["word"] * 6000)), 500, "small"),  # a low budget caps the tier
    (req(" ".join(["word"] * 6000)), 5_000_000, "large"),
]


@pytest.mark.parametrize(("request_", "budget", "tier"), CASES)
def test_the_expected_tier_for_each_request(
    request_: GenerationRequest, budget: int | None, tier: str
) -> None:
    chosen, reason = choose_tier(request_, CONFIG, budget)
    assert chosen == tier
    assert reason


def test_a_missing_tier_falls_to_the_nearest() -> None:
    config = SmartRoutingConfig(tiers={"small": "a", "large": "b"})
    assert configured_tier("medium", config) == "large"
    assert configured_tier("small", config) == "small"
    only_small = SmartRoutingConfig(tiers={"small": "a"})
    assert configured_tier("large", only_small) == "small"


async def test_auto_routes_through_the_gateway_and_logs_why(
    make_routed_gateway: RoutedGatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.routing.router")
    smart = {"tiers": {"small": "tiny", "large": "echo"}, "large_input_tokens": 500}
    gw = await make_routed_gateway({"smart": smart}, providers=TEST_CONFIG["providers"])
    short, _ = await generate(gw.stub, ask("auto", "Hello there"))
    assert short.model == "tiny"
    assert (short.routing.alias, short.routing.tier) == ("auto", "small")
    assert short.routing.reason
    hinted = ask("auto", "Hello there", metadata=pb.CallerMetadata(tags={"tier": "large"}))
    large, _ = await generate(gw.stub, hinted)
    assert large.model == "echo"
    assert (large.routing.tier, large.routing.reason) == ("large", "hint tier=large")
    # The stream carries the same decision in its message_start, and folds to Generate.
    events, _ = await stream_all(gw.stub, hinted)
    assert events[0].message_start.routing == large.routing
    assert fold_stream(events).routing == large.routing
    # A model asked for by name carries no routing decision.
    direct, _ = await generate(gw.stub, ask("echo", "Hello there"))
    assert not direct.HasField("routing")
    assert "auto -> large tier (hint tier=large), model echo" in caplog.text
    assert "auto" in [m.id for m in gw.gateway.router.models()]


async def test_auto_is_listed_as_what_it_is_and_counts_with_the_tier_it_would_use(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    smart = {"tiers": {"small": "gpt-test", "large": "claude-test"}, "large_input_tokens": 500}
    gw = await make_routed_gateway({"smart": smart})
    listed = {m.id: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
    auto, small, large = listed["auto"], listed["gpt-test"], listed["claude-test"]
    # Not an Anthropic model at the small tier's prices: no provider of its own,
    # the tiers it goes to, and the dearest price of each kind.
    assert auto.provider == ""
    assert "small -> gpt-test" in auto.display_name
    assert "large -> claude-test" in auto.display_name
    for price in ("input_per_mtok", "output_per_mtok"):
        dearest = max(getattr(small.pricing, price), getattr(large.pricing, price))
        assert getattr(auto.pricing, price) == dearest
    # CountTokens on auto counts with the tier the request would go to: a short
    # text on the small tier (OpenAI, counted here), a long one on the large
    # (Anthropic's counting endpoint).
    fake.enqueue(Reply(count_tokens=1234))
    short = pb.CountTokensRequest(model="auto", messages=[user("Hello there")])
    counted = await gw.stub.CountTokens(short)
    assert not [r for r in fake.requests if r.path == COUNT_PATH]
    assert counted.input_tokens < 20
    long = pb.CountTokensRequest(model="auto", messages=[user("word " * 1000)])
    assert (await gw.stub.CountTokens(long)).input_tokens == 1234
    assert fake.last(COUNT_PATH).body["model"] == "claude-upstream-1"


def test_tiers_must_name_served_models() -> None:
    config = load_config(
        environ={},
        overrides={
            "providers": TEST_CONFIG["providers"],
            "routing": {"smart": {"tiers": {"small": "nope"}}},
        },
    )
    with pytest.raises(ConfigError, match=r"routing\.smart\.tiers\.small: no model or route"):
        Router.from_config(config)


def test_routes_must_name_configured_providers_and_models() -> None:
    for deployment, key in (
        ({"provider": "elsewhere", "model": "echo"}, r"routing\.routes\.r\[0\]\.provider"),
        ({"provider": "offline", "model": "nope"}, r"routing\.routes\.r\[0\]\.model"),
    ):
        config = load_config(
            environ={},
            overrides={
                "providers": TEST_CONFIG["providers"],
                "routing": {"routes": {"r": [deployment]}},
            },
        )
        with pytest.raises(ConfigError, match=key):
            Router.from_config(config)
