"""A translated call's body is the bytes the SDK itself would make of it.

The providers serialize the body of a translated call with the SDK's own
`openapi_dumps` and send it through `_relay.send_relayed`, skipping what
`client.post(body=...)` does first (the Anthropic SDK copies the body through
`_copy_and_prepare`: it drops NotGiven / Omit entries, dumps models, reads
file inputs). For the plain JSON values the codecs build that step changes
nothing; this pins it, to the byte, for a request using every translated
field and every kind of provider option (tests/test_sdk_call_parity.py's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from anthropic._models import FinalRequestOptions as AnthropicRequestOptions
from anthropic._utils._json import openapi_dumps as anthropic_dumps
from openai._models import FinalRequestOptions as OpenAIRequestOptions
from openai._utils._json import openapi_dumps as openai_dumps

from server.config import load_config
from server.grpc_edge.decoding import decode_generate
from server.providers._sdk_provider import SdkProvider
from server.providers._upstream import post_arguments
from server.providers.anthropic_messages import _HEADER_ARGUMENTS
from server.routing import Router
from tests.fake_upstream import FakeUpstream
from tests.test_sdk_call_parity import rich_request
from tests.upstream_fixtures import OPENAI_KEY, OPENAI_KEY_ENV, provider_config


@pytest.fixture
def router(fake: FakeUpstream) -> Iterator[Router]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPENAI_KEY_ENV, OPENAI_KEY)
        config = load_config(environ={}, overrides={"providers": provider_config(fake)})
        yield Router.from_config(config)


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
async def test_the_body_sent_is_the_one_client_post_would_build(
    router: Router, model: str, streaming: bool
) -> None:
    request, route = decode_generate(rich_request(model), router, "rid-bytes")
    provider = route.provider
    assert isinstance(provider, SdkProvider)
    anthropic = model == "claude-test"
    header_arguments = _HEADER_ARGUMENTS if anthropic else None
    body: dict[str, Any] = post_arguments(provider.create_arguments(request), header_arguments)[0]
    if streaming:
        body = {**body, "stream": True}
    client = await provider._sdk.current()
    kind = AnthropicRequestOptions if anthropic else OpenAIRequestOptions
    options = kind.construct(method="post", url="/v1/x", json_data=body, headers={}, timeout=5.0)
    if anthropic:
        options = await client._copy_and_prepare(options)
    built = client._build_request(options)
    ours = anthropic_dumps(body) if anthropic else openai_dumps(body)
    assert ours == built.content
