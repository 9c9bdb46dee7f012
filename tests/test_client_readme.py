"""README.md's "Clients" section, run as written against a gateway with auth on.

Every command and program there (grpcurl, buf curl, the Python client, the
CLI, Node.js) is read from the README and run with only the address and
`$KEY` (or `$LLMGW_API_KEY`) filled in, so the copy-paste promise cannot
drift from what works. Python programs that import `llmgateway.client` run
in the client distribution's own virtual environment
(tests/test_client_distribution.py), as an adopter would run them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_auth import AuthedGateway, start_authed_gateway
from tests.test_client_distribution import ClientVenv, client_venv  # noqa: F401 (a fixture)
from tests.test_node_client import node_client  # noqa: F401 (a fixture)

BIN = Path(sys.executable).parent


def section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return text[text.index("\n## Clients\n") : text.index("\n### Contract compatibility\n")]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), flags=re.DOTALL)


def commands(prefix: str) -> list[str]:
    lines = (line.strip() for block in blocks("sh") for line in block.splitlines())
    return [line for line in lines if line.startswith(prefix)]


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AuthedGateway]:
    gateway = await start_authed_gateway(tmp_path_factory.mktemp("readme-clients"))
    yield gateway
    await gateway.close()


@pytest.fixture(scope="module")
def key(gateway: AuthedGateway) -> str:
    return gateway.create_key("readme")[1]


async def run(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> tuple[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, f"{argv}\n{out.decode()}\n{err.decode()}"
    return out.decode(), err.decode()


def filled(command: str, gateway: AuthedGateway, key: str) -> list[str]:
    command = command.replace("localhost:50051", gateway.address)
    return shlex.split(command.replace("$LLMGW_API_KEY", key).replace("$KEY", key))


async def test_grpcurl_commands(gateway: AuthedGateway, key: str) -> None:
    found = commands("grpcurl ")
    assert len(found) >= 4  # and any later ones (Health/List, ListModels pages) must succeed
    outputs = [(await run([str(BIN / "grpcurl"), *filled(c, gateway, key)[1:]]))[0] for c in found]
    assert "model" in outputs[0]
    assert "Hello from grpcurl" in outputs[1]
    assert "message_stop" in outputs[2]
    assert "SERVING" in outputs[3]


async def test_buf_curl_commands(gateway: AuthedGateway, key: str) -> None:
    found = commands("buf curl ")
    assert len(found) == 3
    outputs = [(await run([str(BIN / "buf"), *filled(c, gateway, key)[1:]]))[0] for c in found]
    assert "llmgateway.v1.GenerationService/Generate" in outputs[0]
    assert "messageStop" in outputs[1]
    assert "SERVING" in outputs[2]


async def test_python_examples(
    gateway: AuthedGateway,
    key: str,
    client_venv: ClientVenv,  # noqa: F811 (the fixture imported above)
) -> None:
    programs = blocks("python")
    assert len(programs) == 2
    env = {"LLMGW_ADDRESS": gateway.address, "LLMGW_API_KEY": key}

    async def run_program(program: str) -> str:
        if "llmgateway.client" in program:  # the client distribution, outside the repository
            argv = [str(client_venv.python), "-c", program]
            return (await run(argv, env, cwd=client_venv.workdir))[0]
        return (await run([sys.executable, "-c", program], env))[0]

    out = await run_program(programs[0])
    assert out.splitlines()[:3] == ["Hello from Python 3", "Hello stream", "end_turn"]
    out = await run_program(programs[1])
    assert out.startswith("text ") and "StatusCode.NOT_FOUND MODEL_NOT_FOUND" in out


async def test_cli_commands(gateway: AuthedGateway, key: str) -> None:
    found = commands(".venv/bin/python -m clients ")
    assert len(found) == 3
    env = {"LLMGW_ADDRESS": gateway.address, "LLMGW_API_KEY": key}
    outputs = [await run([sys.executable, *filled(c, gateway, key)[1:]], env) for c in found]
    assert outputs[0][0] == "Hello from the command line\n"
    assert "5 out tokens" in outputs[0][1] and "end_turn" in outputs[0][1]
    assert '"text": "Hello again"' in outputs[1][0]
    assert "echo\toffline" in outputs[2][0]


async def test_node_examples(
    gateway: AuthedGateway,
    key: str,
    node_client: Path,  # noqa: F811 (the fixture imported above)
) -> None:
    (command,) = commands("cd clients/node ")
    env = {"LLMGW_ADDRESS": gateway.address, "LLMGW_API_KEY": key}
    shell = command.replace("$LLMGW_API_KEY", key).replace("$KEY", key)
    out, _ = await run(["bash", "-c", shell], env)
    assert '"text":"Hello from Node"' in out
    (program,) = blocks("js")
    program = program.replace("localhost:50051", gateway.address)
    out, _ = await run(["node", "-e", program], {"LLMGW_API_KEY": key}, cwd=node_client)
    assert out.splitlines() == ["Hello from Node", "Hello stream"]
