"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) with details, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import RunningGateway, detail, field_violations, request, rich_status, user
from tests.upstream_fixtures import assistant


def tool_result(tool_use_id: str) -> pb.ContentBlock:
    return pb.ContentBlock(tool_result=pb.ToolResultBlock(tool_use_id=tool_use_id))


def tool_use(tool_id: str) -> pb.ContentBlock:
    return pb.ContentBlock(tool_use=pb.ToolUseBlock(id=tool_id, name="lookup"))


BAD_REQUESTS: list[tuple[str, pb.GenerateRequest, str]] = [
    ("no-model", pb.GenerateRequest(messages=[user("hi")]), "model"),
    ("empty-messages", pb.GenerateRequest(model="echo"), "messages"),
    (
        "unspecified-role",
        pb.GenerateRequest(
            model="echo", messages=[pb.Message(content=[pb.ContentBlock(text="x")])]
        ),
        "messages[0].role",
    ),
    (
        "unknown-role-number",
        pb.GenerateRequest(
            model="echo",
            messages=[pb.Message(role=7, content=[pb.ContentBlock(text="x")])],  # type: ignore[arg-type]
        ),
        "messages[0].role",
    ),
    (
        "empty-content",
        pb.GenerateRequest(model="echo", messages=[pb.Message(role=pb.ROLE_USER)]),
        "messages[0].content",
    ),
    (
        "unset-block",
        pb.GenerateRequest(
            model="echo", messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock()])]
        ),
        "messages[0].content[0]",
    ),
    ("zero-max-tokens", request(max_tokens=0), "max_tokens"),
    ("negative-max-tokens", request(max_tokens=-5), "max_tokens"),
    ("max-tokens-above-model-limit", request(model="tiny", max_tokens=51), "max_tokens"),
    ("temperature-too-high", request(temperature=2.5), "temperature"),
    ("temperature-negative", request(temperature=-0.1), "temperature"),
    ("temperature-nan", request(temperature=math.nan), "temperature"),
    ("top-p-above-one", request(top_p=1.5), "top_p"),
    ("top-k-zero", request(top_k=0), "top_k"),
    ("empty-stop-sequence", request(stop_sequences=["ok", ""]), "stop_sequences[1]"),
    (
        "tool-result-without-tool-use",
        pb.GenerateRequest(
            model="echo", messages=[pb.Message(role=pb.ROLE_USER, content=[tool_result("toolu_x")])]
        ),
        "messages[0].content[0].tool_result.tool_use_id",
    ),
    (
        "tool-result-for-another-id",
        pb.GenerateRequest(
            model="echo",
            messages=[
                user("hi"),
                assistant(tool_use("toolu_a")),
                pb.Message(role=pb.ROLE_USER, content=[tool_result("toolu_b")]),
            ],
        ),
        "messages[2].content[0].tool_result.tool_use_id",
    ),
    (
        "tool-use-in-user-message",
        pb.GenerateRequest(
            model="echo", messages=[pb.Message(role=pb.ROLE_USER, content=[tool_use("toolu_a")])]
        ),
        "messages[0].content[0]",
    ),
    (
        "first-message-from-assistant",
        pb.GenerateRequest(model="echo", messages=[assistant(pb.ContentBlock(text="hi"))]),
        "messages[0].role",
    ),
    ("bad-tool-name", request(tools=[pb.Tool(name="has space")]), "tools[0].name"),
    (
        "duplicate-tool-name",
        request(tools=[pb.Tool(name="a"), pb.Tool(name="a")]),
        "tools[1].name",
    ),
    (
        "tool-choice-names-missing-tool",
        request(
            tools=[pb.Tool(name="a")],
            tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_TOOL, tool_name="b"),
        ),
        "tool_choice.tool_name",
    ),
    (
        "tool-choice-any-without-tools",
        request(tool_choice=pb.ToolChoice(mode=pb.ToolChoice.MODE_ANY)),
        "tool_choice.mode",
    ),
    (
        "image-without-media-type",
        pb.GenerateRequest(
            model="echo",
            messages=[
                pb.Message(
                    role=pb.ROLE_USER,
                    content=[pb.ContentBlock(image=pb.ImageBlock(data=b"\x89PNG"))],
                )
            ],
        ),
        "messages[0].content[0].image.media_type",
    ),
    (
        "image-url-not-http",
        pb.GenerateRequest(
            model="echo",
            messages=[
                pb.Message(
                    role=pb.ROLE_USER,
                    content=[pb.ContentBlock(image=pb.ImageBlock(url="file:///etc/passwd"))],
                )
            ],
        ),
        "messages[0].content[0].image.url",
    ),
    (
        "thinking-on-model-without-it",
        request(thinking=pb.ThinkingConfig(budget_tokens=10)),
        "thinking",
    ),
    ("bad-request-id", request(request_id="has spaces in it"), "request_id"),
]


@pytest.mark.parametrize(
    ("req", "field"), [(r, f) for _, r, f in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS]
)
@pytest.mark.parametrize("method", ["Generate", "StreamGenerate"])
async def test_bad_request_is_invalid_argument_with_field(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest, field: str, method: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Generate":
            await stub.Generate(req)
        else:
            [_ async for _ in stub.StreamGenerate(req)]
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    violations = field_violations(error)
    assert field in violations, violations
    assert field in error.details()
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "llmgateway")


async def test_all_violations_are_reported_together(stub: pb_grpc.GenerationServiceStub) -> None:
    req = pb.GenerateRequest(model="echo", temperature=9, top_p=-1, max_tokens=0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(req)
    assert {"messages", "temperature", "top_p", "max_tokens"} <= set(field_violations(caught.value))


async def test_unknown_model_is_not_found(stub: pb_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(request(model="gpt-17"), metadata=(("x-request-id", "nf-1"),))
    error = caught.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND"
    assert dict(info.metadata) == {"model": "gpt-17", "request_id": "nf-1"}
    assert ("x-request-id", "nf-1") in tuple(error.trailing_metadata() or ())


async def test_bad_provider_option_is_invalid_argument(stub: pb_grpc.GenerationServiceStub) -> None:
    req = request()
    req.provider_options.update({"chunk_delay_ms": "slow"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "provider_options.chunk_delay_ms" in field_violations(caught.value)


async def test_undecodable_bytes_are_not_unknown(running: RunningGateway) -> None:
    raw = running.channel.unary_unary(
        "/llmgateway.v1.GenerationService/Generate",
        request_serializer=None,
        response_deserializer=None,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\xff\xff\xff\xff not a protobuf")
    assert caught.value.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)


_texts = st.text(max_size=20)
_blocks = st.one_of(
    st.builds(pb.ContentBlock, text=_texts),
    st.just(pb.ContentBlock()),
    st.builds(lambda i, n: pb.ContentBlock(tool_use=pb.ToolUseBlock(id=i, name=n)), _texts, _texts),
    st.builds(lambda i: pb.ContentBlock(tool_result=pb.ToolResultBlock(tool_use_id=i)), _texts),
    st.builds(
        lambda d, m: pb.ContentBlock(image=pb.ImageBlock(data=d, media_type=m)),
        st.binary(max_size=8),
        st.sampled_from(["", "image/png", "text/plain"]),
    ),
    st.builds(lambda t: pb.ContentBlock(thinking=pb.ThinkingBlock(text=t)), _texts),
)
_messages = st.builds(
    lambda role, blocks: pb.Message(role=role, content=blocks),
    st.integers(min_value=-1, max_value=4),
    st.lists(_blocks, max_size=3),
)
_requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["echo", "tiny", "", "missing"]),
    messages=st.lists(_messages, max_size=4),
    max_tokens=st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1)),
    temperature=st.one_of(st.none(), st.floats(width=32)),
    top_p=st.one_of(st.none(), st.floats(width=32)),
    top_k=st.one_of(st.none(), st.integers(min_value=-5, max_value=500)),
    stop_sequences=st.lists(_texts, max_size=3),
    request_id=_texts,
    tools=st.lists(st.builds(pb.Tool, name=_texts), max_size=2),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(req=_requests)
async def test_arbitrary_requests_get_a_definite_answer(
    stub: pb_grpc.GenerationServiceStub, req: pb.GenerateRequest
) -> None:
    try:
        await stub.Generate(req)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            error.code(),
            error.details(),
        )
        rich_status(error)  # always with google.rpc details


def _with_nan_schema() -> pb.GenerateRequest:
    req = request(tools=[pb.Tool(name="lookup")])
    req.tools[0].input_schema.update({"type": "object", "properties": {"x": {"max": math.nan}}})
    return req


def _with_infinite_tool_input() -> pb.GenerateRequest:
    use = pb.ToolUseBlock(id="toolu_a", name="lookup")
    use.input.update({"values": [1, -math.inf]})
    return pb.GenerateRequest(
        model="echo", messages=[user("hi"), assistant(pb.ContentBlock(tool_use=use))]
    )


def _with_infinite_option() -> pb.GenerateRequest:
    req = request()
    req.provider_options.update({"odd key": math.inf})
    return req


def _with_ttl(seconds: int, nanos: int = 0) -> pb.GenerateRequest:
    req = request()
    req.messages[0].content[0].cache_control.ttl.seconds = seconds
    req.messages[0].content[0].cache_control.ttl.nanos = nanos
    return req


# Values a Struct or a Duration can carry that the gateway cannot use: once
# INTERNAL with a traceback (issue 17), now the field that holds them, named.
ODD_VALUES: list[tuple[str, pb.GenerateRequest, str]] = [
    ("nan-in-input-schema", _with_nan_schema(), "tools[0].input_schema.properties.x.max"),
    (
        "inf-in-tool-input",
        _with_infinite_tool_input(),
        "messages[1].content[0].tool_use.input.values[1]",
    ),
    ("inf-in-provider-options", _with_infinite_option(), 'provider_options["odd key"]'),
    ("huge-ttl", _with_ttl(10**14), "messages[0].content[0].cache_control.ttl"),
    ("huge-negative-ttl", _with_ttl(-(10**14)), "messages[0].content[0].cache_control.ttl"),
    ("ttl-signs-differ", _with_ttl(5, -1), "messages[0].content[0].cache_control.ttl"),
]


@pytest.mark.parametrize(
    ("method", "req", "field"),
    [
        pytest.param(method, req, field, id=f"{method}-{name}")
        for method in ("Generate", "StreamGenerate", "CountTokens")
        for name, req, field in ODD_VALUES
        # CountTokensRequest has no provider_options.
        if method != "CountTokens" or not field.startswith("provider_options")
    ],
)
async def test_odd_struct_and_duration_values_are_invalid_argument(
    stub: pb_grpc.GenerationServiceStub, method: str, req: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "Generate":
            await stub.Generate(req)
        elif method == "StreamGenerate":
            [_ async for _ in stub.StreamGenerate(req)]
        else:
            await stub.CountTokens(
                pb.CountTokensRequest(
                    model=req.model, system=req.system, messages=req.messages, tools=req.tools
                )
            )
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in field_violations(error), field_violations(error)
