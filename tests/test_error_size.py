"""Errors always fit on the wire (issue 17, item 2).

An error lists the caller's bad fields and echoes their values; unbounded,
its trailers passed gRPC's metadata limit and the client saw
RESOURCE_EXHAUSTED "received metadata size exceeds..." instead of the real
error. The calls here go through a channel that refuses any trailers past
8 KiB (gRPC's soft limit, made hard so that the check is not left to chance),
and through the tests' ordinary channel.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.errors import (
    MAX_ECHO_BYTES,
    MAX_LISTED_VIOLATIONS,
    MAX_VIOLATION_BYTES,
    OMITTED_FIELD,
    FieldViolation,
    GatewayError,
    InvalidArgumentError,
    UpstreamInvalidRequestError,
)
from server.http_edge.errors import message_of
from tests.conftest import RunningGateway, detail, field_violations, rich_status, user

SOFT_LIMIT = 8 * 1024
REQUEST_COUNT_METHODS = ["Generate", "StreamGenerate", "CountTokens"]


@pytest.fixture(scope="module")
async def strict(running: RunningGateway) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    """A stub whose channel refuses any metadata past the soft limit, every time."""
    channel = grpc.aio.insecure_channel(
        running.address,
        options=[
            ("grpc.max_metadata_size", SOFT_LIMIT),
            ("grpc.absolute_max_metadata_size", SOFT_LIMIT),
        ],
    )
    yield pb_grpc.GenerationServiceStub(channel)
    await channel.close()


def unspecified_roles(count: int) -> list[pb.Message]:
    return [pb.Message(content=[pb.ContentBlock(text="hi")]) for _ in range(count)]


async def call(
    stub: pb_grpc.GenerationServiceStub, method: str, **fields: object
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "CountTokens":
            await stub.CountTokens(pb.CountTokensRequest(**fields))  # type: ignore[arg-type]
        elif method == "Generate":
            await stub.Generate(pb.GenerateRequest(**fields))  # type: ignore[arg-type]
        else:
            [_ async for _ in stub.StreamGenerate(pb.GenerateRequest(**fields))]  # type: ignore[arg-type]
    return caught.value


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """What the error's trailers took on the wire: binary ones in base64,
    the message percent-encoded as grpc-message carries it."""
    size = 0
    for key, value in error.trailing_metadata() or ():
        text = base64.b64encode(value) if isinstance(value, bytes) else value.encode()
        size += len(key) + len(text)
    message = (error.details() or "").encode()
    return size + sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message)


def omitted_count(violations: dict[str, str]) -> int:
    """How many violations the last one says were left out."""
    return int(violations[OMITTED_FIELD].split()[0])


@pytest.mark.parametrize("channel", ["strict", "default"])
@pytest.mark.parametrize("method", REQUEST_COUNT_METHODS)
async def test_300_bad_roles_are_invalid_argument_listing_the_first(
    running: RunningGateway, strict: pb_grpc.GenerationServiceStub, channel: str, method: str
) -> None:
    stub = strict if channel == "strict" else running.stub
    error = await call(stub, method, model="echo", messages=unspecified_roles(300))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert trailer_bytes(error) < SOFT_LIMIT
    violations = field_violations(error)
    listed = len(violations) - 1
    assert 20 <= listed <= MAX_LISTED_VIOLATIONS
    assert [f"messages[{i}].role" for i in range(listed)] == list(violations)[:listed]
    assert omitted_count(violations) == 300 - listed
    assert violations[OMITTED_FIELD] == (
        f"{300 - listed} more field violations left out (only the first {listed} listed)"
    )
    assert f"and 299 more field violations, {300 - listed} of them not listed" in error.details()


@pytest.mark.parametrize("channel", ["strict", "default"])
@pytest.mark.parametrize("method", REQUEST_COUNT_METHODS)
async def test_5000_character_model_name_is_not_found_with_the_name_clipped(
    running: RunningGateway, strict: pb_grpc.GenerationServiceStub, channel: str, method: str
) -> None:
    stub = strict if channel == "strict" else running.stub
    model = "m" * 5000
    error = await call(stub, method, model=model, messages=[user("hi")])
    # The real error: no model has that name.
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert trailer_bytes(error) < SOFT_LIMIT
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND"
    echoed = info.metadata["model"]
    assert len(echoed.encode()) <= MAX_ECHO_BYTES
    assert echoed.startswith("mmmm")
    assert echoed.endswith("…")
    assert "m" * 100 in (error.details() or "")
    assert len(error.details() or "") < 500


async def test_echoed_values_in_many_violations_fit(strict: pb_grpc.GenerationServiceStub) -> None:
    """Descriptions that echo long values (here unknown tool_use ids, in a
    character UTF-8 takes 4 bytes for), by the hundred, still fit."""
    results = [
        pb.ContentBlock(tool_result=pb.ToolResultBlock(tool_use_id=f"{i}" + "😀" * 2000))
        for i in range(300)
    ]
    error = await call(
        strict,
        "Generate",
        model="echo" + "😀" * 3000,
        messages=[pb.Message(role=pb.ROLE_USER, content=results)],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert trailer_bytes(error) < SOFT_LIMIT
    violations = field_violations(error)
    assert 1 < len(violations) <= MAX_LISTED_VIOLATIONS + 1
    assert all(len(field.encode()) <= MAX_ECHO_BYTES for field in violations)
    assert all(len(text.encode()) <= MAX_ECHO_BYTES for text in violations.values())
    assert "left out" in violations[OMITTED_FIELD]


def wire_bytes(error: GatewayError) -> int:
    status = error.to_status("r" * 64)
    size = sum(
        len(key) + len(base64.b64encode(value) if isinstance(value, bytes) else value)
        for key, value in status.trailing_metadata
    )
    message = status.details.encode()
    return size + sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message)


def test_every_cap_reached_at_once_still_fits() -> None:
    """The worst a gateway error can hold: an upstream's refusal with a long
    non-ASCII message, violations, metadata and attempts, all past their caps."""
    wide = "😀" * 2000
    error = UpstreamInvalidRequestError(
        [FieldViolation(wide, wide)] * 500,
        wide,
        metadata={f"key{i}": wide for i in range(6)},
    )
    error.attempts = [wide] * 50
    error.retry_after = 2.5
    assert wire_bytes(error) < SOFT_LIMIT - 1024  # room for the edge's own trailers


def test_the_http_edge_lists_the_same_capped_violations() -> None:
    error = InvalidArgumentError(
        [FieldViolation(f"messages[{i}].role", "must be user or assistant") for i in range(300)]
    )
    message = message_of(error)
    assert message.count("must be user or assistant") == MAX_LISTED_VIOLATIONS
    left_out = 300 - MAX_LISTED_VIOLATIONS
    assert message.endswith(
        f"…: {left_out} more field violations left out"
        f" (only the first {MAX_LISTED_VIOLATIONS} listed)"
    )
    assert len(message) < 4_000


def test_violations_are_listed_within_a_byte_budget() -> None:
    long = "x" * 1000
    error = InvalidArgumentError([FieldViolation(f"tools[{i}].name", long) for i in range(40)])
    listed = error.violations[:-1]
    assert all(len(v.description.encode()) <= MAX_ECHO_BYTES for v in listed)
    assert all(v.description.endswith("…") for v in listed)
    assert sum(len((v.field + v.description).encode()) for v in listed) <= MAX_VIOLATION_BYTES
    assert error.omitted == 40 - len(listed)
    assert error.violations[-1].field == OMITTED_FIELD


def test_one_violation_is_listed_whole() -> None:
    error = InvalidArgumentError([FieldViolation("model", "must name a model")])
    assert error.violations == [FieldViolation("model", "must name a model")]
    assert error.message == "invalid request: model: must name a model"
