"""Cost of a call: computed here and nowhere else.

Prices are US dollars per million tokens; costs are integer nano-dollars so
that sums over a ledger are exact. Each usage bucket is priced on its own:
cache reads and writes are never also billed as plain input. A model whose
long prompts cost more (Pricing.long_context) bills a call whose prompt is
longer than the threshold at those rates throughout, output included.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from server.schema import Cost, Pricing, Usage

# nano-dollars per token for a price in dollars per million tokens
_NANOS_PER_TOKEN = Decimal(1_000_000_000) / Decimal(1_000_000)


def _nanos(tokens: int, per_mtok: float) -> int:
    if not tokens or not per_mtok:
        return 0
    # Decimal(str(...)) keeps a configured price like 0.3 exact.
    exact = Decimal(tokens) * Decimal(str(per_mtok)) * _NANOS_PER_TOKEN
    return int(exact.to_integral_value(ROUND_HALF_EVEN))


def compute_cost(usage: Usage, pricing: Pricing) -> Cost:
    """Prices a usage record: at the long-prompt rates, for every bucket, when its
    prompt (input, cache reads and cache writes) is longer than their threshold."""
    if pricing.long_context is not None:
        pricing = pricing.for_prompt(
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
    return Cost(
        input_nanos=_nanos(usage.input_tokens, pricing.input_per_mtok),
        output_nanos=_nanos(usage.output_tokens, pricing.output_per_mtok),
        cache_read_nanos=_nanos(usage.cache_read_input_tokens, pricing.cache_read_per_mtok),
        cache_creation_nanos=_nanos(
            usage.cache_creation_input_tokens, pricing.cache_creation_per_mtok
        ),
    )
