"""Costs per shipped model, cache tokens included and billed once, at their own prices;
a long prompt at its model's long-prompt rates, in the bill and in the reservation.

Usage for every case: 1,000 input, 500 output, 2,000 cache-read and 400
cache-write tokens. At $P per million tokens a token costs P * 1,000 nano-dollars.
"""

from __future__ import annotations

import pytest

from server.accounting.admission import max_cost_nanos
from server.catalog import ANTHROPIC_MODELS, OPENAI_MODELS
from server.costs import compute_cost
from server.providers._upstream import PricingSettings
from server.schema import LongContextPricing, Pricing, Usage, dearest_pricing

USAGE = Usage(
    input_tokens=1_000,
    output_tokens=500,
    cache_read_input_tokens=2_000,
    cache_creation_input_tokens=400,
)
CATALOG = {**ANTHROPIC_MODELS, **OPENAI_MODELS}


def listed(model: str) -> Pricing:
    """A shipped model's prices, read as a configured model's are."""
    return PricingSettings.model_validate(CATALOG[model]["pricing"]).pricing()


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
    cost = compute_cost(USAGE, listed(model))
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
    pricing = listed("claude-opus-5-5")
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


# claude-haiku-5-5: prompts over 100,000 tokens cost 5x, output included (its page
# on platform.claude.com, November 2026).
HAIKU_LONG = (500, 2_500, 50, 625)  # nano-dollars per token: input, output, read, write


@pytest.mark.parametrize(
    ("prompt", "long"),
    [((100_000, 0, 0), False), ((100_001, 0, 0), True), ((40_000, 50_000, 10_001), True)],
    ids=["at-the-threshold", "one-over", "cache-tokens-count"],
)
def test_a_long_prompt_is_billed_at_the_long_rates_throughout(
    prompt: tuple[int, int, int], long: bool
) -> None:
    plain, read, write = prompt
    usage = Usage(plain, 1_000, read, write)
    cost = compute_cost(usage, listed("claude-haiku-5-5"))
    rates = HAIKU_LONG if long else (100, 500, 10, 125)
    assert (cost.input_nanos, cost.output_nanos, cost.cache_read_nanos) == (
        plain * rates[0],
        1_000 * rates[1],
        read * rates[2],
    )
    assert cost.cache_creation_nanos == write * rates[3]


def test_a_reservation_for_a_long_prompt_is_at_the_long_rates() -> None:
    pricing = listed("claude-haiku-5-5")
    assert max_cost_nanos(100_000, 1_000, pricing) == 100_000 * 125 + 1_000 * 500
    worst = max_cost_nanos(150_000, 1_000, pricing)
    assert worst == 150_000 * 625 + 1_000 * 2_500  # input at the dearer cache-write rate
    for read, write in ((150_000, 0), (0, 150_000), (0, 0)):
        usage = Usage(150_000 - read - write, 1_000, read, write)
        assert compute_cost(usage, pricing).total_nanos <= worst


def test_configured_long_context_prices_are_validated_and_used() -> None:
    settings = PricingSettings.model_validate(
        {
            "input_per_mtok": 1.0,
            "output_per_mtok": 2.0,
            "long_context": {"above_tokens": 10, "input_per_mtok": 3.0, "output_per_mtok": 4.0},
        }
    )
    assert settings.pricing().long_context == LongContextPricing(10, 3.0, 4.0, 0.0, 0.0)
    assert compute_cost(Usage(11, 1), settings.pricing()).total_nanos == 11 * 3_000 + 4_000
    with pytest.raises(ValueError, match="above_tokens"):
        PricingSettings.model_validate(
            {"long_context": {"input_per_mtok": 1, "output_per_mtok": 1}}
        )


def test_an_unlisted_model_priced_at_its_familys_dearest_keeps_the_long_rates() -> None:
    family = [listed(m) for m in ANTHROPIC_MODELS]
    dearest = dearest_pricing(family)
    assert dearest.long_context is not None
    assert dearest.long_context.above_tokens == 100_000
    # Above the threshold: never below what any model of the family would bill.
    usage = Usage(200_000, 1_000)
    assert compute_cost(usage, dearest).total_nanos >= max(
        compute_cost(usage, p).total_nanos for p in family
    )
    assert dearest_pricing([listed("claude-opus-5-5")]).long_context is None
