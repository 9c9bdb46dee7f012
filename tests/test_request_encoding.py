"""A large request's upstream body is written in steps, as the SDK writes it (issue 17, item 3).

A provider serializes the body it sends with the SDK's own `openapi_dumps`
(server/providers/_upstream.py `request_content`); for a request over a MiB
(LARGE_REQUEST, set by either edge) it writes the same bytes in steps that
take turns with the other calls, long texts and images' base64 a piece at a
time (server/json_members.py `encoded_in_steps`, `Base64Text`). A
pass-through body that must be encoded again whole (server/providers/_relay.py
`relayed_body`) is written the same way when large.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from typing import Any

import pytest
from anthropic._utils._json import openapi_dumps as anthropic_dumps
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._utils._json import openapi_dumps as openai_dumps

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server import json_members
from server.http_edge.generation import read_json
from server.json_members import Base64Text, encoded_in_steps
from server.loop_turns import LARGE_REQUEST
from server.providers._relay import relayed_body
from server.providers._upstream import _BODY_ENCODER, image_base64, request_content
from server.schema import Passthrough
from tests.conftest import ticks_during
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.http_fixtures import sdk_client
from tests.upstream_fixtures import generate, stream_all, text
from tests.upstream_fixtures import user_blocks as user


def _body_encode(value: Any) -> bytes:
    async def step() -> None:
        pass

    return asyncio.run(encoded_in_steps(value, step, _BODY_ENCODER.encode)).encode()


# Plain JSON values, as the codecs build bodies: texts with quotes, escapes,
# control characters, non-ASCII and astral characters; nested past WALKED_DEPTH.
_TEXTS = st.text(
    alphabet=st.one_of(
        st.sampled_from('"\\/\n\t\x00\x1fé€😀 abc'), st.characters(blacklist_categories=("Cs",))
    ),
    max_size=40,
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXTS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_TEXTS, inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_JSON, step_chars=st.integers(min_value=1, max_value=12))
def test_the_stepped_encoding_is_the_sdks(value: Any, step_chars: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_members, "STEP_CHARS", step_chars)
        written = _body_encode({"messages": value})
    assert written == anthropic_dumps({"messages": value}) == openai_dumps({"messages": value})


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), prefix=_TEXTS, step_chars=st.integers(1, 40))
def test_base64_text_is_written_as_the_whole_base64(
    data: bytes, prefix: str, step_chars: int
) -> None:
    whole = prefix + base64.b64encode(data).decode("ascii")
    deep: Any = {"url": Base64Text(data, prefix)}
    for _ in range(json_members.WALKED_DEPTH):  # deeper than the walk goes, too
        deep = [deep]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_members, "STEP_CHARS", step_chars)
        written = _body_encode({"a": {"url": Base64Text(data, prefix)}, "deep": deep})
    expected: Any = {"url": whole}
    for _ in range(json_members.WALKED_DEPTH):
        expected = [expected]
    assert written == anthropic_dumps({"a": {"url": whole}, "deep": expected})


def test_images_are_left_to_the_steps_only_in_large_requests() -> None:
    image = random.Random(7).randbytes(300_000)
    assert image_base64(image, "p,") == "p," + base64.b64encode(image).decode("ascii")
    token = LARGE_REQUEST.set(True)
    try:
        left = image_base64(image, "p,")
        assert isinstance(left, Base64Text) and left.text() == "p," + base64.b64encode(
            image
        ).decode("ascii")
        # A small image is made at once, even in a large request.
        assert image_base64(b"small", "") == "c21hbGw="
    finally:
        LARGE_REQUEST.reset(token)


async def test_a_large_requests_body_is_written_in_turns_with_other_calls() -> None:
    rng = random.Random(3)
    words = ["tea", '"quoted"', "back\\slash", "é", "😀", "line\n", "naïve"]
    long_text = " ".join(rng.choice(words) for _ in range(300_000))
    image = rng.randbytes(1_500_000)
    eager = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": long_text},
                    {"type": "image", "data": base64.b64encode(image).decode("ascii")},
                ],
            }
        ],
    }
    # A small request: the SDK's own dumps, at once.
    written, ticks = await ticks_during(request_content(eager, anthropic_dumps))
    assert (written, ticks) == (anthropic_dumps(eager), 0)
    # A large one: the same bytes, while the other tasks run between its steps.
    token = LARGE_REQUEST.set(True)
    try:
        stepped = json.loads(json.dumps(eager))
        stepped["messages"][0]["content"][1]["data"] = image_base64(image)
        written, ticks = await ticks_during(request_content(stepped, anthropic_dumps))
    finally:
        LARGE_REQUEST.reset(token)
    assert written == anthropic_dumps(eager)
    # One step at least for every STEP_CHARS written.
    assert ticks >= len(written) // json_members.STEP_CHARS


# -- End to end: gRPC caller -> gateway -> SDK -> fake upstream ----------------

# Over a MiB together, so the request is large: a long text with escapes and
# non-ASCII characters, and an image larger than IMAGE_AT_ONCE_BYTES.
_LONG_TEXT = ('He said "go" \\ then \t left. Naïve café, 😀.\n' * 14_000)[:600_000]
_IMAGE = b"\x89PNG\r\n\x1a\n" + random.Random(11).randbytes(700_000)


def _large_request(model: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        max_tokens=64,
        messages=[
            user(
                text(_LONG_TEXT),
                pb.ContentBlock(image=pb.ImageBlock(data=_IMAGE, media_type="image/png")),
            )
        ],
    )


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate"])
@pytest.mark.parametrize(
    ("model", "path"),
    [("claude-sonnet-5-5", "/v1/messages"), ("gpt-6-sol", "/v1/chat/completions")],
)
async def test_a_large_request_reaches_the_upstream_as_the_sdk_writes_it(
    upstream_stub: pb_grpc.GenerationServiceStub,
    fake: FakeUpstream,
    model: str,
    path: str,
    method: str,
) -> None:
    fake.enqueue(Reply(blocks=[Text("Seen.")]))
    request = _large_request(model)
    assert request.ByteSize() > 1024 * 1024
    if method == "Generate":
        response, _ = await generate(upstream_stub, request)
        assert [b.text for b in response.content] == ["Seen."]
    else:
        events, _ = await stream_all(upstream_stub, request)
        assert events[-1].WhichOneof("event") == "message_stop"
    received = fake.last(path)
    assert received.raw == anthropic_dumps(received.body)  # the SDK's bytes
    content = received.body["messages"][0]["content"]
    encoded_image = base64.b64encode(_IMAGE).decode("ascii")
    if path == "/v1/messages":
        assert content[0]["text"] == _LONG_TEXT
        assert content[1]["source"]["data"] == encoded_image
    else:
        assert content[0]["text"] == _LONG_TEXT
        assert content[1]["image_url"]["url"] == f"data:image/png;base64,{encoded_image}"


async def test_a_large_count_tokens_request_reaches_the_upstream_as_the_sdk_writes_it(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(count_tokens=4321))
    request = _large_request("claude-sonnet-5-5")
    counted = await upstream_stub.CountTokens(
        pb.CountTokensRequest(model=request.model, messages=request.messages)
    )
    assert (counted.input_tokens, counted.estimated) == (4321, False)
    received = fake.last("/v1/messages/count_tokens")
    assert received.raw == anthropic_dumps(received.body)
    assert received.body["messages"][0]["content"][1]["source"]["data"] == (
        base64.b64encode(_IMAGE).decode("ascii")
    )


# -- A pass-through body re-encoded whole ----------------------------------------


@pytest.mark.parametrize("size", [50_000, 1_500_000])
async def test_a_relayed_body_with_a_changed_key_given_twice_is_re_encoded_in_turns(
    size: int,
) -> None:
    """Where the changed value cannot be written in place (the key is given
    twice: which one an upstream reads is its parser's choice), the document is
    encoded again; a large one while other tasks run, a small one at once."""
    text = ('a "quote" \\ é 😀 \n' * (size // 16))[:size]
    body = json.dumps(
        {"model": "first", "max_tokens": 5, "messages": [{"role": "user", "content": text}]}
    )
    body = body.replace('"max_tokens"', '"model": "second", "max_tokens"').encode()
    document, members = json_members.parse_object(body, json.JSONDecoder())
    assert members is not None and members.duplicated == {"model"}
    passthrough = Passthrough("anthropic.messages", body, document, members=members)
    written, ticks = await ticks_during(relayed_body(passthrough, {"model": "upstream-1"}))
    assert json.loads(written) == {**document, "model": "upstream-1"}
    assert written == json_members.encoded({**document, "model": "upstream-1"}).encode()
    if size > json_members.AT_ONCE_BYTES:
        assert ticks >= len(written) // json_members.STEP_CHARS
    else:
        assert ticks == 0


async def test_a_large_relayed_body_whose_members_are_unknown_finds_them_in_turns() -> None:
    """A body rewritten by the front door (a Responses input without sealed
    reasoning) reaches the provider without its members' places: a large one's
    are found again in steps, and the model is still written in place."""
    text = ('a "quote" \\ é 😀 \n' * 100_000)[:1_500_000]
    body = json.dumps({"model": "first", "input": text}, indent=1).encode()  # its own spacing
    passthrough = Passthrough("openai.responses", body, json.loads(body))
    written, ticks = await ticks_during(relayed_body(passthrough, {"model": "upstream-1"}))
    assert written == body.replace(b'"first"', b'"upstream-1"', 1)
    assert ticks >= len(body) // json_members.STEP_CHARS


async def test_a_large_http_body_translated_reaches_the_upstream_as_the_sdk_writes_it(
    url: str, fake: FakeUpstream
) -> None:
    """A Messages body over a MiB for an OpenAI model: parsed in steps by the front
    door (which marks the request large), translated, its image's base64 and
    long text written in steps for the OpenAI SDK's bytes."""
    fake.enqueue(Reply(blocks=[Text("Seen.")]))
    encoded_image = base64.b64encode(_IMAGE).decode("ascii")
    client = sdk_client(url)
    answer = await client.messages.create(
        model="gpt-test",
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": _LONG_TEXT},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": encoded_image,
                        },
                    },
                ],
            }
        ],
    )
    assert answer.content[0].text == "Seen."  # type: ignore[union-attr]
    received = fake.last("/v1/chat/completions")
    assert len(received.raw) > 1024 * 1024
    assert received.raw == openai_dumps(received.body)  # the SDK's bytes
    content = received.body["messages"][0]["content"]
    assert content[0]["text"] == _LONG_TEXT
    assert content[1]["image_url"]["url"] == f"data:image/png;base64,{encoded_image}"


@pytest.mark.parametrize(("chars", "large"), [(500_000, False), (1_200_000, True)])
async def test_the_front_door_marks_a_body_over_a_mib_large(chars: int, large: bool) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * chars}]})

    async def read() -> bool:
        await read_json(body.encode())
        return LARGE_REQUEST.get()

    assert await asyncio.create_task(read()) is large  # in the call's own context
    assert LARGE_REQUEST.get() is False
