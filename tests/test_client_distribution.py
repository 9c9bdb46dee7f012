"""The Python client as its own distribution (clients/python/), installed alone.

The wheel is built from this checkout with the project's setuptools
(clients/python/pyproject.toml maps `llmgateway.v1` to the generated
package and `llmgateway.client` to clients/), installed into a fresh virtual
environment with only its dependencies from the package index, and used
from a folder outside the repository against a gateway started with
`--no-auth` while `LLMGW_API_KEY` is set. Nothing is skipped: without the
index or a build backend this fails.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, start_server_process

# What the client may bring into an environment, besides pip itself.
ALLOWED_DISTRIBUTIONS = {
    "llmgateway-client",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",  # grpcio's own dependency
}

CHECK = r"""
import asyncio, importlib.util, json, os, sys
from importlib import metadata

assert not any(p and os.path.samefile(p, REPO) for p in sys.path if os.path.isdir(p)), sys.path
TOPS = ("server", "clients", "interceptors")
found = {name: importlib.util.find_spec(name) is not None for name in TOPS}

from llmgateway.client import GatewayClient, GatewayClientSync, response_text

async def main():
    async with GatewayClient(timeout=30) as client:
        response = await client.generate("echo", "Hello from the wheel", max_tokens=50)
        async with client.stream("echo", "Hello stream") as stream:
            deltas = [text async for text in stream.text_stream]
        return response_text(response), deltas, (await stream.final_response()).stop_reason

text, deltas, stop_reason = asyncio.run(main())
with GatewayClientSync(timeout=30) as client:
    sync_text = response_text(client.generate("echo", "Hello sync"))
    with client.stream("echo", "Hello sync stream") as stream:
        sync_deltas = list(stream.text_stream)
print(json.dumps({
    "found": found,
    "leaked": sorted(m for m in sys.modules if m.split(".")[0] in TOPS),
    "client_file": sys.modules["llmgateway.client"].__file__,
    "text": text, "deltas": deltas, "stop_reason": stop_reason,
    "sync_text": sync_text, "sync_deltas": sync_deltas,
    "distributions": sorted(
        d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()
    ),
}))
"""


@dataclass
class ClientVenv:
    python: Path
    wheel: Path
    workdir: Path  # outside the repository


async def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("LLMGW_", "PYTHON", "VIRTUAL_ENV"))
    }
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode == 0, f"{argv}\n{out.decode()}\n{err.decode()}"
    return out.decode()


def source_tree(root: Path) -> Path:
    """The files the distribution is built from, at their places in the repository.

    Built from a copy so that the build's scratch folders (build/, *.egg-info)
    never land in the working tree that other test runs read.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "llmgateway", root / "llmgateway", ignore=ignore)
    (root / "clients" / "python").mkdir(parents=True)
    for path in [*(REPO_ROOT / "clients").glob("*.py"), REPO_ROOT / "clients" / "py.typed"]:
        shutil.copy2(path, root / "clients" / path.name)
    shutil.copy2(REPO_ROOT / "clients/python/pyproject.toml", root / "clients/python")
    return root / "clients" / "python"


async def build_client_venv(tmp: Path) -> ClientVenv:
    project = source_tree(tmp / "src")
    wheels = tmp / "wheels"
    # The venv's setuptools builds it offline; without one, pip fetches it (build isolation).
    isolation = [] if importlib.util.find_spec("setuptools") else ["--use-pep517"]
    no_isolation = [] if isolation else ["--no-build-isolation"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    await run([*pip, "wheel", "--no-deps", *no_isolation, "-w", wheels, project], cwd=tmp)
    (wheel,) = wheels.glob("llmgateway_client-*.whl")
    venv = tmp / "venv"
    await run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    await run([*pip, "--python", python, "install", "--quiet", wheel], cwd=tmp)
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return ClientVenv(python, wheel, workdir)


@pytest.fixture(scope="session")
async def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    return await build_client_venv(tmp_path_factory.mktemp("client-dist"))


@pytest.fixture(scope="module")
async def no_auth_gateway() -> AsyncIterator[str]:
    server = await start_server_process("--no-auth")
    yield f"127.0.0.1:{server.port}"
    server.process.terminate()
    await server.process.wait()


def test_the_wheel_holds_the_generated_contract_and_the_client_only(
    client_venv: ClientVenv,
) -> None:
    import zipfile

    names = zipfile.ZipFile(client_venv.wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("llmgateway_client-")}
    assert tops == {"llmgateway"}
    assert "llmgateway/v1/generation_pb2.py" in names
    assert "llmgateway/client/aio.py" in names
    generated = (REPO_ROOT / "llmgateway/v1/generation_pb2.py").read_bytes()
    assert zipfile.ZipFile(client_venv.wheel).read("llmgateway/v1/generation_pb2.py") == generated
    assert client_venv.wheel.stat().st_size < 200_000


async def test_the_installed_client_calls_a_no_auth_gateway_with_a_key_set(
    client_venv: ClientVenv, no_auth_gateway: str
) -> None:
    env = {"LLMGW_ADDRESS": no_auth_gateway, "LLMGW_API_KEY": "any value does"}
    program = CHECK.replace("REPO", repr(str(REPO_ROOT)))
    out = await run([client_venv.python, "-c", program], client_venv.workdir, env)
    result = json.loads(out.splitlines()[-1])
    assert result["found"] == {"server": False, "clients": False, "interceptors": False}
    assert result["leaked"] == []
    assert Path(result["client_file"]).is_relative_to(client_venv.python.parent.parent)
    assert result["text"] == "Hello from the wheel"
    assert "".join(result["deltas"]) == "Hello stream" and len(result["deltas"]) > 1
    assert result["stop_reason"] == "end_turn"
    assert result["sync_text"] == "Hello sync"
    assert "".join(result["sync_deltas"]) == "Hello sync stream"
    assert set(result["distributions"]) <= ALLOWED_DISTRIBUTIONS, result["distributions"]


async def test_the_installed_command_line_client(
    client_venv: ClientVenv, no_auth_gateway: str
) -> None:
    env = {"LLMGW_ADDRESS": no_auth_gateway, "LLMGW_API_KEY": "any value does"}
    llmgw = client_venv.python.parent / "llmgw"
    argv: list[str | Path] = [llmgw, "chat", "Hello from llmgw", "--model", "echo"]
    out = await run(argv, client_venv.workdir, env)
    assert out == "Hello from llmgw\n"
    out = await run(
        [client_venv.python, "-m", "llmgateway.client", "models"], client_venv.workdir, env
    )
    assert "echo\toffline" in out
