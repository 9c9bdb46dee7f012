"""A fallback to another provider or model never turns an outage into a client error.

Every deployment a call may reach is asked before the first attempt whether
it can take the request (server/routing/router.py, Provider.refusal); one
that cannot is skipped (SKIPPED_INVALID_PARAMETERS in the attempts), and the
call is refused only when none can. `provider_options` keyed by provider
reach only their provider (server/routing/provider_options.py).
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx2
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2

from tests.conftest import detail, rich_status
from tests.fake_upstream import FakeUpstream, Reply
from tests.http_fixtures import base_url
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate, stream_all

ANTHROPIC, OPENAI = "/v1/messages", "/v1/chat/completions"
StatusCode = grpc.StatusCode
RETRY = {"max_attempts": 2, "initial_backoff_s": 0.01, "max_retry_after_s": 1}


def routing(*deployments: tuple[str, str]) -> dict[str, Any]:
    return {
        "retry": RETRY,
        "routes": {"mixed": [{"provider": p, "model": m} for p, m in deployments]},
    }


# The README's route: Claude first, GPT when Claude cannot answer.
CLAUDE_THEN_GPT = routing(("anthropic", "claude-test"), ("openai", "gpt-test"))


def options(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def paths(fake: FakeUpstream) -> list[str]:
    return [r.path for r in fake.requests]


def attempts(error: grpc.aio.AioRpcError) -> list[str]:
    info = detail(rich_status(error), error_details_pb2.DebugInfo)
    assert isinstance(info, error_details_pb2.DebugInfo)
    return list(info.stack_entries)


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    bad = detail(rich_status(error), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    return [v.field for v in bad.field_violations]


async def test_top_k_on_a_claude_outage_reports_the_outage_not_a_client_error(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", top_k=40))
    # GPT takes no top_k: skipped up front, so the caller sees Claude's 529.
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert paths(fake) == [ANTHROPIC, ANTHROPIC]
    listed = attempts(caught.value)
    assert listed[0].startswith("openai/gpt-test: SKIPPED_INVALID_PARAMETERS")
    assert [line.split(":")[0] for line in listed[1:]] == ["anthropic/claude-test"] * 2


async def test_top_k_goes_to_claude_when_it_answers(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    events, _ = await stream_all(gw.stub, ask("mixed", "Hi", top_k=40))
    assert events[0].message_start.provider == "anthropic"
    assert fake.last(ANTHROPIC).body["top_k"] == 40


async def test_portable_parameters_are_served_by_the_fallback(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    response, _ = await generate(gw.stub, ask("mixed", "Hi", temperature=0.5))
    assert response.provider == "openai"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC, OPENAI]
    assert fake.last(OPENAI).body["temperature"] == 0.5


async def test_temperature_with_a_fallback_model_that_takes_no_sampling(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    # Claude 5 models take no sampling parameters.
    gw = await make_routed_gateway(
        routing(("openai", "gpt-test"), ("anthropic", "claude-sonnet-5-5"))
    )
    fake.enqueue(Reply(status=503), Reply(status=503))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", temperature=0.5))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert paths(fake) == [OPENAI, OPENAI]


async def test_refused_when_no_deployment_can_take_the_request(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(routing(("openai", "gpt-test"), ("openai", "gpt-6-sol")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", top_k=40))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    # The first deployment's violations.
    assert violations(caught.value) == ["top_k"]
    assert "'gpt-test' does not accept top_k" in caught.value.details()
    assert fake.requests == []


async def test_per_provider_options_reach_only_their_provider(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    given = {
        "anthropic": {"betas": ["beta-one"], "service_tier": "standard_only"},
        "openai": {"reasoning_effort": "low", "service_tier": "flex"},
    }
    response, _ = await generate(gw.stub, ask("mixed", "Hi", provider_options=options(given)))
    assert response.provider == "openai"
    claude, gpt = fake.requests[0], fake.requests[-1]
    assert claude.headers["anthropic-beta"] == "beta-one"
    assert claude.body["service_tier"] == "standard_only"
    assert "reasoning_effort" not in claude.body
    assert gpt.body["service_tier"] == "flex"
    assert gpt.body["reasoning_effort"] == "low"
    assert "anthropic-beta" not in gpt.headers
    assert "betas" not in gpt.body and "anthropic" not in gpt.body


async def test_a_provider_instance_section_replaces_its_kinds(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(routing(("local", "llama-local"), ("openai", "gpt-test")))
    fake.enqueue(Reply(status=503), Reply(status=503))
    given = {"local": {"repetition_penalty": 1.1}, "openai": {"service_tier": "flex"}}
    await generate(gw.stub, ask("mixed", "Hi", provider_options=options(given)))
    local, gpt = fake.requests[0], fake.requests[-1]
    assert local.body["repetition_penalty"] == 1.1
    assert "service_tier" not in local.body
    assert gpt.body["service_tier"] == "flex"
    assert "repetition_penalty" not in gpt.body


async def test_flat_options_reach_only_the_first_providers_kind(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    given = {"betas": ["beta-one"]}
    response, _ = await generate(gw.stub, ask("mixed", "Hi", provider_options=options(given)))
    assert response.provider == "openai"
    assert fake.requests[0].headers["anthropic-beta"] == "beta-one"
    gpt = fake.requests[-1]
    assert "betas" not in gpt.body and "anthropic-beta" not in gpt.headers


async def test_an_options_section_its_provider_refuses_names_its_path(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(routing(("openai", "gpt-test")))
    given = {"openai": {"max_tokens": 5}}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", provider_options=options(given)))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["provider_options.openai.max_tokens"]
    assert fake.requests == []


async def test_a_deployment_refusing_its_section_is_skipped(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    given = {"openai": {"max_tokens": 5}}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", provider_options=options(given)))
    assert caught.value.code() == StatusCode.UNAVAILABLE
    assert paths(fake) == [ANTHROPIC, ANTHROPIC]


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"anthropic": {"betas": ["b"]}, "service_tier": "auto"}, "provider_options.service_tier"),
        ({"openai": "flex"}, "provider_options.openai"),
    ],
)
async def test_a_malformed_per_provider_form_is_refused(
    make_routed_gateway: RoutedGatewayFactory,
    fake: FakeUpstream,
    given: dict[str, Any],
    field: str,
) -> None:
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("mixed", "Hi", provider_options=options(given)))
    assert caught.value.code() == StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [field]
    assert fake.requests == []


async def test_a_relayed_request_follows_the_same_rule(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    # A Messages request through the HTTP front door: Claude relays it as it
    # came, GPT would translate it and cannot carry top_k.
    gw = await make_routed_gateway(CLAUDE_THEN_GPT)
    fake.enqueue(Reply(status=529), Reply(status=529))
    body = {
        "model": "mixed",
        "max_tokens": 64,
        "top_k": 40,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    async with httpx2.AsyncClient(timeout=10) as client:
        response = await client.post(f"{base_url(gw)}/v1/messages", json=body)
    assert response.status_code == 529
    assert response.json()["error"]["type"] == "overloaded_error"
    assert paths(fake) == [ANTHROPIC, ANTHROPIC]
