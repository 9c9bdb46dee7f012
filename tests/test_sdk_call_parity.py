"""The providers send what the SDKs' typed methods would send, to the byte.

The providers call the SDK's generic `client.post` instead of
`messages.create` / `chat.completions.create`, so that responses come back
as parsed JSON rather than pydantic models (the reason is in
`post_arguments`, server/providers/_upstream.py). The request must not
change for it: for a request using every translated field and every kind
of provider option, the fake upstream receives the same method, path,
query, headers and JSON body both ways, streaming and not. A new SDK
release that changes what its typed method sends fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import duration_pb2

from llmgateway.v1 import generation_pb2 as pb
from server.config import load_config
from server.grpc_edge.decoding import decode_generate
from server.providers._sdk_provider import SdkProvider
from server.routing import Router
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import OPENAI_KEY, OPENAI_KEY_ENV, PNG, provider_config, user_blocks
from tests.upstream_fixtures import text as text_block

TOOL = pb.Tool(name="lookup", description="Looks a word up.")
TOOL.input_schema.update({"type": "object", "properties": {"word": {"type": "string"}}})

OPTIONS: dict[str, dict[str, Any]] = {
    "claude-test": {
        "betas": ["context-1m-2025-08-07"],
        "service_tier": "standard_only",
        "user_profile_id": "prof_123",  # an argument `create` sends as a header
        "extra_headers": {"x-team": "search"},
        "extra_query": {"trace": "1"},
        "extra_body": {"future_knob": {"depth": 3}},
        "another_knob": True,
    },
    "gpt-test": {
        "service_tier": "flex",
        "seed": 7,
        "extra_headers": {"x-team": "search"},
        "extra_query": {"trace": "1"},
        "extra_body": {"future_knob": {"depth": 3}},
        "another_knob": True,
    },
}


def rich_request(model: str) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model=model,
        system=[text_block("Be brief.")],
        messages=[
            user_blocks(
                text_block(
                    "Compare",
                    cache_control=pb.CacheControl(ttl=duration_pb2.Duration(seconds=3600)),
                ),
                pb.ContentBlock(image=pb.ImageBlock(data=PNG, media_type="image/png")),
            )
        ],
        tools=[TOOL],
        tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO),
        max_tokens=4096,
        temperature=0.5,
        stop_sequences=["END"],
        thinking=pb.ThinkingConfig(budget_tokens=2048),
        metadata=pb.CallerMetadata(end_user_id="user-42"),
    )
    request.provider_options.update(OPTIONS[model])
    return request


@pytest.fixture
def router(fake: FakeUpstream) -> Iterator[Router]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPENAI_KEY_ENV, OPENAI_KEY)
        config = load_config(environ={}, overrides={"providers": provider_config(fake)})
        yield Router.from_config(config)


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
@pytest.mark.parametrize("incremental", [False, True], ids=["unary", "stream"])
async def test_the_upstream_request_is_the_one_the_typed_method_sends(
    fake: FakeUpstream, router: Router, model: str, incremental: bool
) -> None:
    request, route = decode_generate(rich_request(model), router, "rid-parity")
    request.incremental = incremental
    provider = route.provider
    assert isinstance(provider, SdkProvider)
    events = [event async for event in provider.stream(request)]
    assert events, "the provider's call did not complete"
    ours = fake.last()

    kwargs = provider.create_arguments(request)
    client = await provider._sdk.current()
    timeout = provider._timeout  # what a call without a deadline gets
    if model == "claude-test":
        create = client.messages.create
    else:
        create = client.chat.completions.create
        if not incremental:
            kwargs.pop("stream_options")
    if incremental:
        stream = await create(**kwargs, stream=True, timeout=timeout)
        _ = [chunk async for chunk in stream]
    else:
        await create(**kwargs, timeout=timeout)
    typed = fake.last()

    assert typed is not ours
    assert (ours.method, ours.path, ours.query) == (typed.method, typed.path, typed.query)
    assert ours.query == "trace=1"
    assert ours.body == typed.body
    assert ours.body["future_knob"] == {"depth": 3} and ours.body["another_knob"] is True
    assert ours.headers == typed.headers
    assert ours.headers["x-team"] == "search"
    if model == "claude-test":
        assert ours.headers["anthropic-user-profile-id"] == "prof_123"
        assert "user_profile_id" not in ours.body
