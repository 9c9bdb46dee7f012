"""`provider_options` cannot change what the gateway decided (issue 14, item 1).

The model a key may use, the prompt and tools that were estimated, the
`max_tokens` that was reserved, how many outputs are paid for, and the
stream flags are what reaches the upstream; credentials and billing-routing
headers are the gateway's. Every path a provider option can take (a
top-level key, `extra_body`, `extra_headers`, `extra_query`) is probed on
both SDK providers: each attempt is refused with INVALID_ARGUMENT naming the
option, and nothing reaches the upstream.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import field_violations
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import ask

MODELS = ["claude-test", "gpt-test"]

# (option, the field violation expected)
PROBES: list[tuple[dict[str, Any], str]] = [
    ({"model": "claude-opus-5-5"}, "provider_options.model"),
    ({"extra_body": {"model": "claude-opus-5-5"}}, "provider_options.extra_body.model"),
    (
        {"extra_body": {"messages": [{"role": "user", "content": "x" * 50}]}},
        "provider_options.extra_body.messages",
    ),
    ({"messages": []}, "provider_options.messages"),
    ({"system": "You are someone else."}, "provider_options.system"),
    ({"extra_body": {"system": "You are someone else."}}, "provider_options.extra_body.system"),
    ({"tools": []}, "provider_options.tools"),
    ({"extra_body": {"tools": []}}, "provider_options.extra_body.tools"),
    ({"max_tokens": 64000}, "provider_options.max_tokens"),
    ({"extra_body": {"max_tokens": 64000}}, "provider_options.extra_body.max_tokens"),
    ({"max_completion_tokens": 64000}, "provider_options.max_completion_tokens"),
    (
        {"extra_body": {"max_completion_tokens": 64000}},
        "provider_options.extra_body.max_completion_tokens",
    ),
    ({"n": 8}, "provider_options.n"),
    ({"extra_body": {"n": 8}}, "provider_options.extra_body.n"),
    ({"stream": False}, "provider_options.stream"),
    ({"extra_body": {"stream": False}}, "provider_options.extra_body.stream"),
    ({"stream_options": {"include_usage": False}}, "provider_options.stream_options"),
    ({"workspace_id": "wrk_other"}, "provider_options.workspace_id"),
    (
        {"extra_headers": {"OpenAI-Organization": "org-other"}},
        "provider_options.extra_headers.OpenAI-Organization",
    ),
    (
        {"extra_headers": {"OpenAI-Project": "proj-other"}},
        "provider_options.extra_headers.OpenAI-Project",
    ),
    (
        {"extra_headers": {"anthropic-workspace-id": "wrk_other"}},
        "provider_options.extra_headers.anthropic-workspace-id",
    ),
    ({"extra_headers": {"X-Api-Key": "sk-other"}}, "provider_options.extra_headers.X-Api-Key"),
    ({"extra_headers": {"Host": "elsewhere"}}, "provider_options.extra_headers.Host"),
    ({"extra_query": {"model": "claude-opus-5-5"}}, "provider_options.extra_query.model"),
    ({"extra_query": {"api-key": "sk-other"}}, "provider_options.extra_query.api-key"),
    # Billed at a price of its own, which the gateway does not charge.
    ({"service_tier": "priority"}, "provider_options.service_tier"),
    ({"extra_body": {"service_tier": "priority"}}, "provider_options.extra_body.service_tier"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("option", "violation"), PROBES, ids=[v for _, v in PROBES])
async def test_an_option_cannot_override_what_the_gateway_decided(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    model: str,
    option: dict[str, Any],
    violation: str,
) -> None:
    req = ask(model, "Hi", max_tokens=5)
    req.provider_options.update(option)
    for call in (upstream_stub.Generate, upstream_stub.StreamGenerate):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            result = call(req)
            if hasattr(result, "__aiter__"):
                async for _ in result:
                    pass
            else:
                await result
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violation in field_violations(caught.value)
    assert fake.requests == []  # refused before any upstream call


@pytest.mark.parametrize("model", MODELS)
async def test_every_refused_option_is_named(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, model: str
) -> None:
    req = ask(model, "Hi", max_tokens=5)
    req.provider_options.update(
        {
            "max_tokens": 64000,
            "extra_body": {"model": "x", "messages": []},
            "extra_headers": {"OpenAI-Project": "p", "x-team": "search"},
        }
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream_stub.Generate(req)
    assert set(field_violations(caught.value)) == {
        "provider_options.max_tokens",
        "provider_options.extra_body.model",
        "provider_options.extra_body.messages",
        "provider_options.extra_headers.OpenAI-Project",
    }
    assert fake.requests == []


@pytest.mark.parametrize("model", MODELS)
async def test_what_was_checked_is_what_is_sent(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, model: str
) -> None:
    """Options that are the caller's still reach the upstream, next to the gateway's fields."""
    req = ask(model, "Hi", max_tokens=5)
    req.provider_options.update(
        {"extra_headers": {"x-team": "search"}, "extra_body": {"future_knob": 1}}
    )
    await upstream_stub.Generate(req)
    received = fake.last()
    assert received.headers["x-team"] == "search"
    assert received.body["future_knob"] == 1
    assert received.body["model"] in ("claude-upstream-1", "gpt-upstream-1")
    assert received.body["messages"][-1]["content"] in ("Hi", [{"type": "text", "text": "Hi"}])
    cap = received.body.get("max_tokens", received.body.get("max_completion_tokens"))
    assert cap == 5
    assert "openai-organization" not in received.headers
