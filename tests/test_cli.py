"""`python -m clients` run as a real process against the in-process gateway."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from tests.conftest import REPO_ROOT, RunningGateway
from tests.test_auth import AuthedGateway, start_authed_gateway


async def cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients",
        *args,
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_chat_streams_the_answer_and_reports_usage(running: RunningGateway) -> None:
    code, out, err = await cli(
        "--address", running.address, "chat", "one two three four", "--model", "echo"
    )
    assert code == 0, err
    assert out == "one two three four\n"
    assert "echo (offline)" in err and "4 out tokens" in err and "$0.000000" in err
    assert "end_turn" in err and "request " in err


async def test_chat_reads_address_and_model_from_the_environment(
    running: RunningGateway,
) -> None:
    env = {"LLMGW_ADDRESS": running.address, "LLMGW_MODEL": "echo"}
    code, out, err = await cli("chat", "from env", "--max-tokens", "1", env=env)
    assert code == 0, err
    assert out == "from\n"
    assert "max_tokens" in err


async def test_chat_json_is_one_response_per_line(running: RunningGateway) -> None:
    code, out, err = await cli(
        "--address", running.address, "chat", "hi json", "-m", "echo", "--json", "-s", "terse"
    )
    assert code == 0, err
    response = json.loads(out)
    assert response["content"] == [{"text": "hi json"}]
    assert response["stop_reason"] == "STOP_REASON_END_TURN"
    assert int(response["usage"]["output_tokens"]) == 2


async def test_interactive_mode_keeps_the_conversation(running: RunningGateway) -> None:
    # Each turn sends the whole conversation so far: the input grows turn by turn.
    code, out, err = await cli(
        "--address",
        running.address,
        "chat",
        "--model",
        "echo",
        "--json",
        stdin="first turn\n\nsecond turn here\n/exit\nnever sent\n",
    )
    assert code == 0, err
    responses = [json.loads(line) for line in out.splitlines()]
    assert [r["content"][0]["text"] for r in responses] == ["first turn", "second turn here"]
    first, second = (int(r["usage"]["input_tokens"]) for r in responses)
    assert second > first + 3


async def test_errors_exit_non_zero_with_the_reason(running: RunningGateway) -> None:
    code, _, err = await cli("--address", running.address, "chat", "hi", "-m", "nope")
    assert code == 1
    assert "NOT_FOUND" in err and "reason=MODEL_NOT_FOUND" in err and "request_id=" in err
    code, _, err = await cli("--address", running.address, "chat", "hi")
    assert code == 2 and "--model" in err


async def test_models_lists_what_the_gateway_serves(running: RunningGateway) -> None:
    code, out, err = await cli("--address", running.address, "models")
    assert code == 0, err
    assert "echo\toffline" in out.splitlines()
    assert "tiny\toffline (aliases: tiny-latest)" in out.splitlines()


async def test_chat_with_an_api_key(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway: AuthedGateway = await start_authed_gateway(tmp_path_factory.mktemp("cli-auth"))
    try:
        key = gateway.create_key("cli")[1]
        code, out, err = await cli(
            "chat", "keyed", "-m", "echo", env={"LLMGW_ADDRESS": gateway.address}
        )
        assert code == 1 and "UNAUTHENTICATED" in err
        env = {"LLMGW_ADDRESS": gateway.address, "LLMGW_API_KEY": key}
        code, out, err = await cli("chat", "keyed", "-m", "echo", env=env)
        assert code == 0, err
        assert out == "keyed\n"
    finally:
        await gateway.close()
