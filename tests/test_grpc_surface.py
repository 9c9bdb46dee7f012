"""The gRPC surface tools expect: reflection v1, Health List, ListModels in pages (AIP-158)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as alpha

from clients import GatewayClient, GatewayClientSync
from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from server.grpc_edge.pages import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from server.health import NOT_SERVING, SERVING, HealthService
from tests.conftest import TEST_CONFIG, RunningGateway, field_violations, started
from tests.test_auth import AuthedGateway, start_authed_gateway
from tests.test_grpcurl import grpcurl

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICES = {
    "grpc.health.v1.Health",
    V1,
    V1ALPHA,
    "llmgateway.v1.GenerationService",
    "llmgateway.v1.KeyService",
    "llmgateway.v1.TokenService",
    "llmgateway.v1.UsageService",
}


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("grpc-surface"))
    yield gateway
    await gateway.close()


# Two providers, and more models than the largest page holds.
MANY = {"a": [f"a-{i:04}" for i in range(5)], "b": [f"b-{i:04}" for i in range(MAX_PAGE_SIZE + 5)]}


@pytest.fixture(scope="module")
async def many_models() -> AsyncIterator[RunningGateway]:
    providers = {
        name: {"type": "offline", "models": [{"id": model} for model in models]}
        for name, models in MANY.items()
    }
    config = load_config(environ={}, overrides={**TEST_CONFIG, "providers": providers})
    gateway = await started(Gateway(config))
    yield gateway
    await gateway.aclose()


@pytest.fixture
def many(many_models: RunningGateway) -> pb_grpc.GenerationServiceStub:
    return many_models.stub


async def test_the_clients_list_every_page(many_models: RunningGateway) -> None:
    every = [m for models in MANY.values() for m in models]
    async with GatewayClient(many_models.address) as client:
        assert sorted(m.id for m in await client.list_models()) == sorted(every)
        assert [m.id for m in await client.list_models("a")] == MANY["a"]

    def blocking() -> list[str]:
        with GatewayClientSync(many_models.address) as client:
            return [m.id for m in client.list_models()]

    assert sorted(await asyncio.to_thread(blocking)) == sorted(every)


# -- reflection v1 (grpcurl asks for it first) -------------------------------


async def test_grpcurl_lists_reflection_v1(running: RunningGateway) -> None:
    services = set((await grpcurl("-plaintext", running.address, "list")).split())
    assert services >= SERVICES


async def test_grpcurl_calls_reflection_v1(running: RunningGateway) -> None:
    # grpcurl reads v1's own schema by reflection, then calls it.
    output = await grpcurl(
        "-plaintext",
        "-d",
        '{"file_containing_symbol": "llmgateway.v1.GenerationService"}',
        running.address,
        f"{V1}/ServerReflectionInfo",
    )
    files = json.loads(output)["file_descriptor_response"]["file_descriptor_proto"]
    assert files, output
    described = await grpcurl("-plaintext", running.address, "describe", V1)
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in (
        described
    )


async def reflect(channel: grpc.aio.Channel, service: str) -> alpha.ServerReflectionResponse:
    """One list_services request on `service` (v1's messages are v1alpha's, byte for byte)."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=alpha.ServerReflectionRequest.SerializeToString,
        response_deserializer=alpha.ServerReflectionResponse.FromString,
    )(iter([alpha.ServerReflectionRequest(list_services="")]))
    responses = [response async for response in call]
    assert len(responses) == 1
    response: alpha.ServerReflectionResponse = responses[0]
    return response


async def test_reflection_v1_and_v1alpha_answer_alike(running: RunningGateway) -> None:
    v1, v1alpha = await reflect(running.channel, V1), await reflect(running.channel, V1ALPHA)
    assert v1 == v1alpha
    assert {s.name for s in v1.list_services_response.service} == SERVICES


async def test_reflection_v1_needs_no_credentials(authed: AuthedGateway) -> None:
    response = await reflect(authed.channel, V1)
    assert {s.name for s in response.list_services_response.service} == SERVICES
    described = await grpcurl(
        "-plaintext", authed.address, "describe", "llmgateway.v1.GenerationService"
    )
    assert "rpc ListModels" in described


# -- Health List --------------------------------------------------------------


async def test_health_list_gives_every_service(running: RunningGateway) -> None:
    listed = await health_pb2_grpc.HealthStub(running.channel).List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": SERVING,
        "llmgateway.v1.GenerationService": SERVING,
        "llmgateway.v1.TokenService": SERVING,
        "llmgateway.v1.UsageService": SERVING,
        "llmgateway.v1.KeyService": SERVING,
    }


async def test_health_list_by_grpcurl_needs_no_credentials(authed: AuthedGateway) -> None:
    output = await grpcurl("-plaintext", authed.address, "grpc.health.v1.Health/List")
    statuses = json.loads(output)["statuses"]
    assert statuses["llmgateway.v1.GenerationService"] == {"status": "SERVING"}


async def test_health_list_while_draining() -> None:
    health = HealthService()
    health.set("", SERVING)
    health.set("llmgateway.v1.GenerationService", SERVING)
    health.enter_graceful_shutdown()
    listed = await health.List(health_pb2.HealthListRequest(), None)  # type: ignore[arg-type]
    assert {s.status for s in listed.statuses.values()} == {NOT_SERVING}  # type: ignore[attr-defined]


# -- ListModels in pages (AIP-158) ---------------------------------------------


async def list_pages(
    stub: pb_grpc.GenerationServiceStub, page_size: int, provider: str, *, limit: int
) -> list[pb.ListModelsResponse]:
    """Up to `limit` pages, following next_page_token."""
    pages, token = [], ""
    while len(pages) < limit:
        page = await stub.ListModels(
            pb.ListModelsRequest(provider=provider, page_size=page_size, page_token=token)
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    return pages


async def test_page_sizes_default_and_maximum(many: pb_grpc.GenerationServiceStub) -> None:
    default = await many.ListModels(pb.ListModelsRequest())
    assert [m.id for m in default.models] == [*MANY["a"], *MANY["b"]][:DEFAULT_PAGE_SIZE]
    assert default.next_page_token
    largest = await many.ListModels(pb.ListModelsRequest(page_size=1_000_000))
    assert len(largest.models) == MAX_PAGE_SIZE
    last = await many.ListModels(pb.ListModelsRequest(page_token=largest.next_page_token))
    assert [m.id for m in last.models] == MANY["b"][-10:]
    assert last.next_page_token == ""


async def test_a_short_list_is_one_page(stub: pb_grpc.GenerationServiceStub) -> None:
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert {"echo", "tiny"} <= {m.id for m in listed.models}
    assert listed.next_page_token == ""


@pytest.mark.parametrize("provider", ["", "a"])
async def test_pages_of_one_give_every_model_once(
    many: pb_grpc.GenerationServiceStub, provider: str
) -> None:
    everything = [*MANY["a"], *MANY["b"]][:30] if not provider else MANY[provider]
    pages = await list_pages(many, 1, provider, limit=len(everything))
    assert [len(p.models) for p in pages] == [1] * len(everything)
    assert [p.models[0].id for p in pages] == everything
    pairs = await list_pages(many, 2, provider, limit=len(everything) // 2)
    assert [m.id for p in pairs for m in p.models] == everything[: len(pairs) * 2]


async def test_negative_page_size_is_invalid(many: pb_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await many.ListModels(pb.ListModelsRequest(page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in field_violations(caught.value)


async def test_a_token_with_another_filter_is_invalid(many: pb_grpc.GenerationServiceStub) -> None:
    first = await many.ListModels(pb.ListModelsRequest(page_size=1))
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await many.ListModels(
            pb.ListModelsRequest(provider="a", page_size=1, page_token=first.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other filters" in field_violations(caught.value)["page_token"]
    # The same token with the filter it was made for still works.
    second = await many.ListModels(
        pb.ListModelsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [first.models[0].id, second.models[0].id] == MANY["a"][:2]


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        base64.urlsafe_b64encode(b"p1:-1:0000").decode(),
        base64.urlsafe_b64encode(b"hello").decode(),
        "A" * 10_000,
    ],
    ids=["not-base64", "negative-offset", "foreign", "huge"],
)
async def test_a_token_the_gateway_did_not_make_is_invalid(
    stub: pb_grpc.GenerationServiceStub, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(pb.ListModelsRequest(page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(caught.value)


async def test_pages_show_only_the_models_a_key_may_use(authed: AuthedGateway) -> None:
    key = authed.create_key("pages", models=("echo", "tiny"))[1]
    metadata = (("authorization", f"Bearer {key}"),)
    first = await authed.stub.ListModels(pb.ListModelsRequest(page_size=1), metadata=metadata)
    second = await authed.stub.ListModels(
        pb.ListModelsRequest(page_size=1, page_token=first.next_page_token), metadata=metadata
    )
    assert second.next_page_token == ""
    assert {first.models[0].id, second.models[0].id} == {"echo", "tiny"}
