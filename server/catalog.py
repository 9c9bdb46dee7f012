"""The shipped model catalog, and routing of unlisted ids by prefix.

A provider configured without a `models` list serves the catalog of its
kind; a configured model leaves out what the catalog already knows. Limits
and list prices were taken from the providers' public model and pricing
pages in November 2026. Cache-write prices are the 5-minute (Anthropic) or
30-minute (OpenAI) rates: a one-hour write is priced at that rate too,
because Usage has a single cache-creation count.

A model id nobody lists but with a provider's prefix (`claude-`, `gpt-`,
...) still routes to that provider (Provider.unlisted_model, asked by
Router.resolve), with the conservative limits of
UpstreamModel's defaults, so that a new model works on the day it ships;
it is priced at the dearest listed price of its family
(SdkProvider.unlisted_model), never free.
"""

from __future__ import annotations

from typing import Any

_ADAPTIVE_1M: dict[str, Any] = {
    "context_window": 1_000_000,
    "max_output_tokens": 128_000,
    # Adaptive thinking is on by default and counts against max_tokens.
    "default_max_tokens": 16_384,
    "thinking": "adaptive",
    # Non-default temperature/top_p/top_k are a 400 on these models.
    "sampling": [],
}


def _price(inp: float, out: float, read: float, write: float) -> dict[str, float]:
    return {
        "input_per_mtok": inp,
        "output_per_mtok": out,
        "cache_read_per_mtok": read,
        "cache_creation_per_mtok": write,
    }


ANTHROPIC_MODELS: dict[str, dict[str, Any]] = {
    "claude-fable-5-1": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Fable 5.1",
        "pricing": _price(10.0, 50.0, 0.25, 12.5),
    },
    "claude-opus-5-5": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Opus 5.5",
        "pricing": _price(4.0, 20.0, 0.20, 5.0),
    },
    "claude-sonnet-5-5": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Sonnet 5.5",
        "pricing": _price(2.0, 10.0, 0.10, 2.5),
    },
    "claude-haiku-5-5": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Haiku 5.5",
        # Prompts over 100,000 tokens (input and cache together) cost 5x, output too.
        "pricing": {
            **_price(0.10, 0.50, 0.01, 0.125),
            "long_context": {"above_tokens": 100_000, **_price(0.50, 2.50, 0.05, 0.625)},
        },
    },
    "claude-opus-5": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Opus 5",
        "pricing": _price(5.0, 25.0, 0.50, 6.25),
    },
    "claude-sonnet-5": {
        **_ADAPTIVE_1M,
        "display_name": "Claude Sonnet 5",
        "pricing": _price(2.0, 10.0, 0.20, 2.5),
    },
    "claude-haiku-4-5": {
        "display_name": "Claude Haiku 4.5",
        "context_window": 200_000,
        "max_output_tokens": 64_000,
        "default_max_tokens": 8_192,
        "thinking": "budget",
        "pricing": _price(1.0, 5.0, 0.10, 1.25),
    },
}

_GPT6: dict[str, Any] = {
    "context_window": 1_050_000,
    "max_output_tokens": 128_000,
    "default_max_tokens": 16_384,
    "reasoning": True,
    "cache_breakpoints": True,
    # Sampling parameters apply only with reasoning_effort "none".
    "sampling": [],
}

OPENAI_MODELS: dict[str, dict[str, Any]] = {
    "gpt-6-sol": {**_GPT6, "display_name": "GPT-6 Sol", "pricing": _price(2.0, 10.0, 0.20, 2.5)},
    "gpt-6-luna": {
        **_GPT6,
        "display_name": "GPT-6 Luna",
        "pricing": _price(0.10, 0.50, 0.01, 0.125),
    },
    "gpt-6.1-terra": {
        **_GPT6,
        "display_name": "GPT-6.1 Terra",
        "pricing": _price(1.0, 5.0, 0.05, 1.25),
    },
}

ANTHROPIC_PREFIXES = ("claude-",)
OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt-")
