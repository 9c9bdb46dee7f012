"""A failed gRPC call lets go of its request when it ends (issue 17, item 3).

Before, the servicer turned a GatewayError into `context.abort`, whose
AbortError ends in a reference cycle with grpc's frames: the cycle kept the
handler's frame, and so the request (its protobuf arena, native memory the
garbage collector does not count) and the decoded texts, until a full
collection happened to run. Five refused 8 MiB requests a round left the
gateway ~100 MiB larger each round (bench/stall_probe.py: 89 MiB idle, 225,
321, 347 after rounds 1 to 3). Now the error status is set on the context
and the handler returns: nothing of the call outlives it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import grpc
import pytest

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import request, user

SERVICER = "server/grpc_edge/servicer.py"


@contextmanager
def cycles_kept() -> Iterator[list[FrameType]]:
    """The servicer's frames that the calls in the block left in reference cycles."""
    gc.collect()
    gc.disable()
    frames: list[FrameType] = []
    try:
        yield frames
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        frames += [
            o
            for o in gc.garbage
            if isinstance(o, FrameType) and o.f_code.co_filename.endswith(SERVICER)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _names(frames: list[FrameType]) -> list[str]:
    return sorted({f.f_code.co_name for f in frames})


@pytest.mark.parametrize(
    "refused",
    [
        pytest.param(request(model="tiny", max_tokens=10), id="Generate-valid"),
        pytest.param(pb.GenerateRequest(model="echo"), id="Generate-no-messages"),
        pytest.param(request("word " * 2_000, model="tiny"), id="Generate-too-long"),
    ],
)
async def test_a_unary_call_leaves_no_cycle_holding_its_request(
    stub: pb_grpc.GenerationServiceStub, refused: pb.GenerateRequest
) -> None:
    with cycles_kept() as frames:
        for _ in range(3):
            try:
                await stub.Generate(refused)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert not frames, _names(frames)


async def test_a_refused_stream_leaves_no_cycle_holding_its_request(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    with cycles_kept() as frames:
        for _ in range(3):
            call = stub.StreamGenerate(request("word " * 2_000, model="tiny"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _event in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not frames, _names(frames)


async def test_a_refused_count_leaves_no_cycle_holding_its_request(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    with cycles_kept() as frames:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CountTokens(pb.CountTokensRequest(model="nope", messages=[user("hi")]))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert not frames, _names(frames)
