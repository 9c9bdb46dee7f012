"""Configuring the SDK-backed providers: YAML, environment defaults, the catalog, keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.catalog import ANTHROPIC_MODELS, OPENAI_MODELS
from server.config import ConfigError, load_config
from server.grpc_edge.encoding import encode_models
from server.routing import Router, build_providers


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_no_providers_configured_enables_those_with_keys_in_the_environment() -> None:
    assert set(load_config(environ={}).providers) == {"offline"}
    config = load_config(
        environ={
            "ANTHROPIC_API_KEY": "sk-ant-x",
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        }
    )
    assert set(config.providers) == {"offline", "anthropic", "openai"}
    assert config.providers["anthropic"].settings() == {"api_key_env": "ANTHROPIC_API_KEY"}
    assert config.providers["openai"].settings() == {
        "api_key_env": "OPENAI_API_KEY",
        "base_url": "http://127.0.0.1:9/v1",
    }
    # The configuration names the variable; the key itself is nowhere in it.
    assert "sk-ant-x" not in repr(config)


async def test_environment_defaults_serve_the_shipped_catalog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = {"ANTHROPIC_API_KEY": "sk-ant-env-secret", "OPENAI_API_KEY": "sk-env-secret"}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    router = Router(build_providers(load_config(environ=keys)))
    try:
        assert {m.id for m in router.models("anthropic")} == set(ANTHROPIC_MODELS)
        assert {m.id for m in router.models("openai")} == set(OPENAI_MODELS)
        assert router.resolve("echo") is not None
        haiku = next(m for m in router.models("anthropic") if m.id == "claude-haiku-4-5")
        assert (haiku.context_window, haiku.max_output_tokens) == (200_000, 64_000)
        assert haiku.pricing.input_per_mtok == 1.0
        # ListModels shows a long-prompt price tier where the catalog has one.
        longer = next(m for m in router.models("anthropic") if m.id == "claude-haiku-5-5")
        listed = encode_models([longer, haiku]).models
        tier = listed[0].pricing.long_context
        assert (tier.above_tokens, tier.input_per_mtok, tier.output_per_mtok) == (100_000, 0.5, 2.5)
        assert not listed[1].pricing.HasField("long_context")
        for provider in router.providers:
            assert "env-secret" not in repr(vars(provider))
    finally:
        await router.aclose()


@pytest.mark.parametrize(
    ("section", "key"),
    [
        (
            "type: anthropic\n    api_key_env: UPSTREAM_TEST_UNSET_VARIABLE\n",
            "providers.x.api_key: Value error, no API key: set api_key, or the environment"
            " variable UPSTREAM_TEST_UNSET_VARIABLE",
        ),
        ("type: openai\n    base_url: http://127.0.0.1:9/v1\n", "providers.x.api_key"),
        ("type: anthropic\n    api_key: k\n    timeout_s: 0\n", "providers.x.timeout_s"),
        (
            "type: openai\n    api_key: k\n    models: [{id: m, colour: red}]\n",
            "providers.x.models.0.colour",
        ),
        (
            "type: openai\n    api_key: k\n    models: [{id: m, sampling: [top_z]}]\n",
            "providers.x.models.0.sampling.0",
        ),
        (
            "type: anthropic\n    api_key: k\n    models: [{id: m, thinking: always}]\n",
            "providers.x.models.0.thinking",
        ),
        (
            "type: openai\n    api_key: k\n    max_tokens_field: length\n",
            "providers.x.max_tokens_field",
        ),
    ],
)
def test_bad_provider_settings_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, key: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = load_config(write(tmp_path, f"providers:\n  x:\n    {section}"), environ={})
    with pytest.raises(ConfigError) as caught:
        build_providers(config)
    assert key in str(caught.value)


async def test_a_configured_model_takes_what_it_leaves_out_from_the_catalog(tmp_path: Path) -> None:
    text = (
        "providers:\n"
        "  claude:\n"
        "    type: anthropic\n"
        "    api_key: sk-ant-file-secret\n"
        "    models:\n"
        "      - {id: sonnet, upstream_id: claude-sonnet-5-5, default_max_tokens: 2000}\n"
        "      - {id: claude-custom-1, context_window: 50000}\n"
    )
    router = Router(build_providers(load_config(write(tmp_path, text), environ={})))
    try:
        sonnet, custom = router.models("claude")
        assert (sonnet.id, sonnet.display_name, sonnet.context_window) == (
            "sonnet",
            "Claude Sonnet 5.5",
            1_000_000,
        )
        assert sonnet.default_max_tokens == 2000
        assert sonnet.capabilities.thinking
        # Not in the catalog: the conservative defaults, no price, no thinking.
        assert (custom.context_window, custom.max_output_tokens) == (50_000, 8_192)
        assert custom.pricing.input_per_mtok == 0.0
        assert not custom.capabilities.thinking
        assert "sk-ant-file-secret" not in repr(router.providers[0].__dict__)
    finally:
        await router.aclose()
