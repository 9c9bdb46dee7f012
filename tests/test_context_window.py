"""The context-window check (server/routing/context_window.py): before any upstream call."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import TEST_CONFIG, detail, field_violations, rich_status
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import RoutedGatewayFactory, ask, generate

OFFLINE: dict[str, Any] = TEST_CONFIG["providers"]  # type: ignore[assignment]
LONG = " ".join(f"word{i}" for i in range(1500))  # about 1500 tokens: more than tiny's 1000


def reason(error: grpc.aio.AioRpcError) -> str:
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info.reason


async def test_too_long_for_the_model_is_invalid_argument(
    make_routed_gateway: RoutedGatewayFactory,
) -> None:
    gw = await make_routed_gateway({}, providers=OFFLINE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.Generate(ask("tiny", LONG))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == "CONTEXT_WINDOW_EXCEEDED"
    assert "context window of model 'tiny'" in field_violations(caught.value)["messages"]
    # Input alone fits, but not with max_tokens on top.
    near = " ".join("w" for _ in range(960))  # 960 tokens by either count
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(ask("tiny", near, max_tokens=50))
    response, _ = await generate(gw.stub, ask("tiny", near, max_tokens=10))
    assert response.model == "tiny"


async def test_a_route_goes_on_to_a_larger_window(
    make_routed_gateway: RoutedGatewayFactory,
) -> None:
    routing = {
        "routes": {
            "roomy": [
                {"provider": "offline", "model": "tiny"},
                {"provider": "offline", "model": "echo"},
            ]
        }
    }
    gw = await make_routed_gateway(routing, providers=OFFLINE)
    short, _ = await generate(gw.stub, ask("roomy", "Hello there"))
    assert short.model == "tiny"
    long, _ = await generate(gw.stub, ask("roomy", LONG))
    assert long.model == "echo"


async def test_refused_before_any_upstream_call(
    make_routed_gateway: RoutedGatewayFactory, fake: FakeUpstream
) -> None:
    routing = {
        "routes": {
            "small-claude": [
                {"provider": "anthropic", "model": "claude-test", "context_window": 1200}
            ]
        }
    }
    gw = await make_routed_gateway(routing)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.stub.StreamGenerate(ask("small-claude", LONG, max_tokens=100)).read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.requests == []
