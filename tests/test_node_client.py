"""The Node.js client (clients/node/) against a real gateway with auth on.

clients/node/example.js loads proto/ with @grpc/proto-loader, makes one
Generate and one StreamGenerate call with an API key, and prints a JSON line
for each. Its dependencies come from the committed package-lock.json
(`npm ci`, run here when node_modules is missing or older than the lock).
A machine without node fails this test: it is part of CI, not optional.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_auth import AuthedGateway, start_authed_gateway

NODE_DIR = REPO_ROOT / "clients" / "node"


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def node_client() -> Path:
    """clients/node with its dependencies installed from the lock file."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: the Node client test needs Node.js 18+ and npm")
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        code, out, err = await run(
            "npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=NODE_DIR
        )
        assert code == 0, f"npm ci failed:\n{out}\n{err}"
    return NODE_DIR


@pytest.fixture(scope="module")
async def authed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("node-auth"))
    yield gateway
    await gateway.close()


async def test_node_client_unary_and_stream(node_client: Path, authed: AuthedGateway) -> None:
    key = authed.create_key("node")[1]
    env = {"LLMGW_ADDRESS": authed.address, "LLMGW_API_KEY": key, "LLMGW_MODEL": "echo"}
    code, out, err = await run("node", "example.js", "Hello from Node", cwd=node_client, env=env)
    assert code == 0, err
    unary, streamed = (json.loads(line) for line in out.splitlines())
    assert unary["call"] == "Generate"
    assert unary["text"] == "Hello from Node"
    assert unary["stop_reason"] == "STOP_REASON_END_TURN"
    assert int(unary["usage"]["output_tokens"]) > 0 and unary["request_id"]
    assert streamed["call"] == "StreamGenerate"
    assert streamed["text"] == "Hello from Node"
    events = streamed["events"]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_delta") > 1


async def test_node_client_reports_a_refused_key(node_client: Path, authed: AuthedGateway) -> None:
    env = {"LLMGW_ADDRESS": authed.address, "LLMGW_API_KEY": "llmgw_000000000000_" + "0" * 48}
    code, _, err = await run("node", "example.js", cwd=node_client, env=env)
    assert code == 1
    assert "error: 16" in err  # grpc status 16: UNAUTHENTICATED


async def test_node_client_calls_the_admin_services(
    node_client: Path, authed: AuthedGateway
) -> None:
    """usage.proto and keys.proto load too: KeyService and UsageService from Node."""
    admin_key = authed.create_key("node-admin", scopes=("admin",))[1]
    env = {"LLMGW_ADDRESS": authed.address, "LLMGW_ADMIN_KEY": admin_key, "LLMGW_MODEL": "echo"}
    code, out, err = await run("node", "admin-example.js", cwd=node_client, env=env)
    assert code == 0, err
    created, usage, listed, revoked = (json.loads(line) for line in out.splitlines())
    assert created["call"] == "CreateKey" and created["secret_returned"] is True
    assert created["state"] == "API_KEY_STATE_ACTIVE" and created["models"] == ["echo"]
    assert "llmgw_" not in out  # the secret is used, never printed
    assert usage["call"] == "GetUsage"
    (totals,) = usage["totals"]
    assert totals["group"] == created["id"] and totals["requests"] == "1"  # int64 as a string
    assert created["id"] in listed["ids"]
    assert revoked == {"call": "RevokeKey", "id": created["id"], "state": "API_KEY_STATE_REVOKED"}

    # The same contract file list, with a missing method named.
    script = (
        "const { GatewayClient } = require('./client');"
        "const c = new GatewayClient('127.0.0.1:1');"
        "c.call('KeyService', 'Nope').catch((e) => { console.log(e.message); c.close(); });"
    )
    code, out, err = await run("node", "-e", script, cwd=node_client)
    assert code == 0, err
    assert out.strip() == "no unary method KeyService/Nope in the contract"
