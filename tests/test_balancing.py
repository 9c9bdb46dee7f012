"""Load balancing among deployments of one priority (server/routing/balancer.py)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from server.routing.balancer import least_in_flight_order, weighted_order
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import (
    ANTHROPIC_KEY,
    RoutedGatewayFactory,
    ask,
    generate,
    provider_config,
)


@dataclass(frozen=True)
class Target:
    name: str
    weight: float


def test_weighted_order_gives_each_its_share_of_first_tries() -> None:
    group = [Target("a", 3), Target("b", 1), Target("c", 6)]
    rng = random.Random(1)
    firsts = Counter(weighted_order(group, rng)[0].name for _ in range(20_000))
    for target in group:
        assert abs(firsts[target.name] / 20_000 - target.weight / 10) < 0.015
    # The whole group is ordered: the others are the fallbacks within it.
    assert sorted(t.name for t in weighted_order(group, rng)) == ["a", "b", "c"]


def test_least_in_flight_prefers_the_least_loaded_per_unit_of_weight() -> None:
    group = [Target("a", 1), Target("b", 2), Target("c", 1)]
    order = least_in_flight_order(group, {"a": 3, "b": 4, "c": 1}, random.Random(0))
    assert [t.name for t in order] == ["c", "b", "a"]


async def test_weights_are_respected_over_many_calls(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    providers = provider_config(fake)
    # A second Anthropic deployment (another key) of the same model.
    providers["anthropic-b"] = {
        **providers["anthropic"],
        "api_key": "sk-ant-test-second-key",
        "models": [{**providers["anthropic"]["models"][0], "aliases": []}],
    }
    routing = {
        "routes": {
            "claude-test": [
                {"provider": "anthropic", "model": "claude-test", "weight": 3},
                {"provider": "anthropic-b", "model": "claude-test", "weight": 1},
            ]
        }
    }
    gw = await make_routed_gateway(routing, providers=providers, rng=random.Random(42))
    calls = 200
    for _ in range(calls):
        await generate(gw.stub, ask("claude-test", "Hi"))
    keys = Counter(r.headers["authorization"].removeprefix("Bearer ") for r in fake.requests)
    assert sum(keys.values()) == calls
    # Expected 150: the tolerance is four standard deviations (about 6 each).
    assert abs(keys[ANTHROPIC_KEY] - 150) <= 25
