"""A real `buf curl` (PyPI buf-bin) drives a gateway with auth on, by reflection alone.

buf curl is a second client nobody on this team wrote: it finds the schema
through the reflection service, speaks gRPC over h2c, and sends the key or
token as metadata exactly as a service in another language would.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.test_auth import AuthedGateway, start_authed_gateway
from tests.test_grpcurl import json_objects

BUF = Path(sys.executable).parent / "buf"
GENERATION = "llmgateway.v1.GenerationService"
BODY = json.dumps(
    {"model": "echo", "messages": [{"role": "ROLE_USER", "content": [{"text": "Hello buf"}]}]}
)


async def buf_curl(address: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BUF),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        *args[:-1],
        f"http://{address}{args[-1]}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    if check:
        assert process.returncode == 0, err.decode()
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("buf-curl"))
    yield gateway
    await gateway.close()


async def test_list_services_and_methods(authed: AuthedGateway) -> None:
    _, services, _ = await buf_curl(authed.address, "--list-services", "")
    assert f"{GENERATION}" in services.split()
    assert "grpc.health.v1.Health" in services.split()
    _, methods, _ = await buf_curl(authed.address, "--list-methods", "")
    for rpc in ("Generate", "StreamGenerate", "CountTokens", "ListModels"):
        assert f"{GENERATION}/{rpc}" in methods.split()


async def test_generate_and_stream_with_a_key(authed: AuthedGateway) -> None:
    key = authed.create_key("buf-curl")[1]
    auth = ("-H", f"authorization: Bearer {key}")
    _, out, _ = await buf_curl(authed.address, *auth, "-d", BODY, f"/{GENERATION}/Generate")
    response = json.loads(out)  # buf curl prints the JSON mapping's camelCase names
    assert response["content"] == [{"text": "Hello buf"}]
    assert response["stopReason"] == "STOP_REASON_END_TURN"
    _, out, _ = await buf_curl(authed.address, *auth, "-d", BODY, f"/{GENERATION}/StreamGenerate")
    events = json_objects(out)
    assert next(iter(events[0])) == "messageStart" and next(iter(events[-1])) == "messageStop"
    text = "".join(
        e["contentBlockDelta"].get("text", "") for e in events if "contentBlockDelta" in e
    )  # type: ignore[union-attr]
    assert text == "Hello buf"


async def test_token_from_issue_token_then_stream(authed: AuthedGateway) -> None:
    key = authed.create_key("buf-curl-token")[1]
    _, out, _ = await buf_curl(
        authed.address,
        "-H",
        f"x-api-key: {key}",
        "-d",
        "{}",
        "/llmgateway.v1.TokenService/IssueToken",
    )
    token = json.loads(out)["token"]
    _, out, _ = await buf_curl(
        authed.address,
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        BODY,
        f"/{GENERATION}/StreamGenerate",
    )
    assert "messageStop" in out


async def test_no_credentials_is_unauthenticated(authed: AuthedGateway) -> None:
    code, out, err = await buf_curl(
        authed.address, "-d", BODY, f"/{GENERATION}/Generate", check=False
    )
    assert code != 0
    assert "unauthenticated" in (out + err).lower()


async def test_health_check_needs_no_credentials(authed: AuthedGateway) -> None:
    _, out, _ = await buf_curl(authed.address, "-d", "{}", "/grpc.health.v1.Health/Check")
    assert json.loads(out) == {"status": "SERVING"}
    _, out, _ = await buf_curl(
        authed.address, "-d", json.dumps({"service": GENERATION}), "/grpc.health.v1.Health/Check"
    )
    assert json.loads(out) == {"status": "SERVING"}
