"""send_relayed on the SDKs' aiohttp transport goes to its aiohttp session directly.

server/providers/_relay.py sends a relayed call without httpx2's Request and
send layers when the SDK's client would only hand the request to its aiohttp
transport. What httpx2 would still have done must not be lost: the request a
response names (built only when asked for) is the one the general path
sends, a redirect is followed as the client follows it, and a timeout raises
the SDK's timeout error. tests/test_relay_send.py pins the bytes on the wire
and the error statuses.
"""

from __future__ import annotations

import gzip
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from server.providers import _relay
from server.providers._relay import send_relayed
from tests.fake_upstream import FakeUpstream
from tests.fake_upstream.script import Reply
from tests.test_relay_send import CALLS, arguments, sdk_client, through_post, through_send


@pytest.mark.parametrize(("kind", "path", "protocol"), CALLS)
async def test_the_response_names_the_request_the_general_path_sends(
    fake: FakeUpstream, kind: str, path: str, protocol: str
) -> None:
    client = await sdk_client(kind, fake.anthropic_url if kind == "anthropic" else fake.openai_url)
    try:
        body, options = arguments(kind, path, protocol, False)
        response = await send_relayed(client, path, body, options, stream=False)
        template = await _relay._template(client, path, options, options["timeout"])
        assert template.direct is not None  # sent straight to aiohttp
        expected = _relay._request(
            client, template, options["headers"], options.get("params"), body, options["timeout"]
        )
        sent = response.request
        assert sent.method == expected.method
        assert sent.url == expected.url
        assert sent.headers.raw == expected.headers.raw
        assert sent.content == body
        assert response.content
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_redirect_is_followed_as_client_post_follows_it(
    fake: FakeUpstream, stream: bool
) -> None:
    client = await sdk_client("anthropic", fake.anthropic_url)
    try:
        answers = []
        for send in (through_post, through_send):
            before = len(fake.requests)
            location = f"{fake.anthropic_url}/v1/messages"
            fake.enqueue(Reply(status=307, headers={"location": location}), Reply())
            body, options = arguments("anthropic", "/v1/messages", "anthropic.messages", stream)
            answers.append(await send(client, "/v1/messages", body, options, stream))
            assert len(fake.requests) - before == 2  # the first call and the redirected one
            assert fake.requests[-1].raw == fake.requests[-2].raw == body
        assert answers[0] == answers[1]
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_a_timeout_raises_the_sdk_timeout_error(fake: FakeUpstream, kind: str) -> None:
    client = await sdk_client(kind, fake.anthropic_url if kind == "anthropic" else fake.openai_url)
    path, protocol = next((p, proto) for k, p, proto in CALLS if k == kind)
    error: Any = anthropic.APITimeoutError if kind == "anthropic" else openai.APITimeoutError
    try:
        for send in (through_post, through_send):
            fake.enqueue(Reply(delay_s=1.0))
            body, options = arguments(kind, path, protocol, False)
            options["timeout"] = 0.2
            with pytest.raises(error) as caught:
                await send(client, path, body, options, False)
            assert isinstance(caught.value.request, httpx2.Request)
    finally:
        await client.close()


async def test_an_encoded_answer_is_decoded_as_client_post_decodes_it(fake: FakeUpstream) -> None:
    client = await sdk_client("anthropic", fake.anthropic_url)
    plain = b'{"type":"message","content":[]}'
    try:
        answers = []
        for send in (through_post, through_send):
            encoded = Reply(raw_body=gzip.compress(plain), headers={"content-encoding": "gzip"})
            fake.enqueue(encoded)
            body, options = arguments("anthropic", "/v1/messages", "anthropic.messages", False)
            answers.append(await send(client, "/v1/messages", body, options, False))
        assert answers == [plain, plain]
    finally:
        await client.close()


@pytest.mark.parametrize(("kind", "path", "protocol"), CALLS)
async def test_a_stream_cut_short_raises_what_client_post_raises(
    fake: FakeUpstream, kind: str, path: str, protocol: str
) -> None:
    client = await sdk_client(kind, fake.anthropic_url if kind == "anthropic" else fake.openai_url)
    try:
        raised = []
        for send in (through_post, through_send):
            fake.enqueue(Reply(reset_after=2))
            body, options = arguments(kind, path, protocol, True)
            with pytest.raises(httpx2.TransportError) as caught:
                await send(client, path, body, options, True)
            raised.append(caught.value)
        assert type(raised[1]) is type(raised[0])
        assert isinstance(raised[1].request, httpx2.Request)
    finally:
        await client.close()
