"""Costs per shipped model, cache tokens included and billed once, at their own prices.

Usage for every case: 1,000 input, 500 output, 2,000 cache-read and 400
cache-write tokens. At $P per million tokens a token costs P * 1,000 nano-dollars.
"""

from __future__ import annotations

import pytest

from server.accounting.admission import max_cost_nanos
from server.catalog import ANTHROPIC_MODELS, OPENAI_MODELS
from server.costs import compute_cost
from server.schema import Pricing, Usage

USAGE = Usage(
    input_tokens=1_000,
    output_tokens=500,
    cache_read_input_tokens=2_000,
    cache_creation_input_tokens=400,
)
CATALOG = {**ANTHROPIC_MODELS, **OPENAI_MODELS}

# model: (input, output, cache read, cache write) nano-dollars for USAGE
CASES = {
    "claude-fable-5-1": (10_000_000, 25_000_000, 500_000, 5_000_000),
    "claude-opus-5-5": (4_000_000, 10_000_000, 400_000, 2_000_000),
    "claude-sonnet-5-5": (2_000_000, 5_000_000, 200_000, 1_000_000),
    "claude-haiku-5-5": (100_000, 250_000, 20_000, 50_000),
    "claude-opus-5": (5_000_000, 12_500_000, 1_000_000, 2_500_000),
    "claude-sonnet-5": (2_000_000, 5_000_000, 400_000, 1_000_000),
    "claude-haiku-4-5": (1_000_000, 2_500_000, 200_000, 500_000),
    "gpt-6-sol": (2_000_000, 5_000_000, 400_000, 1_000_000),
    "gpt-6-luna": (100_000, 250_000, 20_000, 50_000),
    "gpt-6.1-terra": (1_000_000, 2_500_000, 100_000, 500_000),
}


def test_every_shipped_model_has_a_case() -> None:
    assert set(CASES) == set(CATALOG)


@pytest.mark.parametrize("model", sorted(CASES))
def test_cost_per_model_with_cache_tokens(model: str) -> None:
    cost = compute_cost(USAGE, Pricing(**CATALOG[model]["pricing"]))
    parts = (cost.input_nanos, cost.output_nanos, cost.cache_read_nanos, cost.cache_creation_nanos)
    assert parts == CASES[model]
    # Cache tokens are not also billed as input: the total is the four parts, once.
    assert cost.total_nanos == sum(CASES[model])


def test_cache_tokens_never_count_as_input() -> None:
    pricing = Pricing(input_per_mtok=3.0, cache_read_per_mtok=0.3, cache_creation_per_mtok=3.75)
    only_cache = compute_cost(Usage(cache_read_input_tokens=1_000_000), pricing)
    assert (only_cache.input_nanos, only_cache.cache_read_nanos) == (0, 300_000_000)


def test_configured_prices_stay_exact() -> None:
    # 0.3 is not exact in binary floating point; costs are computed in decimal.
    cost = compute_cost(Usage(input_tokens=3), Pricing(input_per_mtok=0.3))
    assert cost.input_nanos == 900  # float arithmetic gives 900.0000000000001
    # Half a nano-dollar rounds half-even.
    assert compute_cost(Usage(input_tokens=1), Pricing(input_per_mtok=0.0005)).input_nanos == 0


def test_budget_reservation_is_the_worst_case() -> None:
    """What a call may cost at most: input at the dearer of input and cache-write."""
    pricing = Pricing(**CATALOG["claude-opus-5-5"]["pricing"])
    worst = max_cost_nanos(1_000, 500, pricing)
    assert worst == 1_000 * 5_000 + 500 * 20_000
    for read, write in ((1_000, 0), (0, 1_000), (500, 500)):
        usage = Usage(
            input_tokens=1_000 - read - write,
            output_tokens=500,
            cache_read_input_tokens=read,
            cache_creation_input_tokens=write,
        )
        assert compute_cost(usage, pricing).total_nanos <= worst
