"""Codex CLI itself through the HTTP front door, offline.

The real `codex` CLI (run by tests/codex_cli.py; `make codex` installs the
pinned version in tests/node/codex) answers a prompt with `codex exec`, its
model provider at the gateway's /v1 with `wire_api = "responses"`, auth on,
holding a gateway key:

- pass-through to the fake upstream's OpenAI deployment (its settings say
  the upstream serves the Responses API): the answer is the upstream's, and
  the upstream receives the very request Codex sends when it talks to that
  upstream directly, the model renamed, under the gateway's credential;
- translation to the offline `echo` model and to the fake's Anthropic
  deployment: Codex's request as it comes (developer messages, its function
  tools, hosted and namespaced tools, reasoning settings) is answered, and
  a shell tool call Claude asks for goes round: Codex runs it and its
  output reaches Claude as the tool's result;
- a bad key: a clean 401 at once;
- each call's ledger row: edge `http`, method `openai.responses`.

Without the CLI the tests skip, except under CI (the `CI` variable set),
where `make pytest` installs it first and a missing CLI is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.auth.cli import create_key
from server.config import load_config
from tests.codex_cli import CODEX_VERSION, PROVIDER, CodexResult, codex_path, run_codex
from tests.conftest import RunningGateway
from tests.fake_upstream import FakeUpstream, Reply, Text, ToolCall
from tests.fake_upstream.server import RecordedRequest
from tests.http_fixtures import base_url, front_door_providers, start_front_door
from tests.test_ledger import ledger_rows
from tests.upstream_fixtures import ANTHROPIC_KEY, OPENAI_KEY

# The fake's OpenAI model, and the id its upstream knows it by.
PASS_THROUGH_MODEL = "gpt-test"
UPSTREAM_MODEL = "gpt-upstream-1"
# Codex reconnects 5 times (and retries a 5xx 4 more times each) unless these are 0.
NO_RETRIES = {
    f"model_providers.{PROVIDER}.request_max_retries": 0,
    f"model_providers.{PROVIDER}.stream_max_retries": 0,
}
RUN_TIMEOUT_S = 60
# Codex's ids (UUIDv7: session, thread, turn, window, message ids; installation id).
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CLOCK = re.compile(rb'(turn_started_at_unix_ms\\":)\d+')


@pytest.fixture(scope="module")
def codex() -> str:
    """The installed CLI; without it, a skip (a failure under CI)."""
    path = codex_path()
    if path is None:
        reason = (
            "Codex CLI is not installed in tests/node/codex: "
            "`make codex` installs it (needs npm and the npm registry)"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI is set, so this test must run")
        pytest.skip(reason)
    return path


@dataclass
class AuthedFrontDoor:
    running: RunningGateway
    url: str  # Codex's base_url: the front door's /v1
    key_id: str
    key: str
    ledger: Path


@pytest.fixture(scope="module")
async def door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AuthedFrontDoor]:
    """A front door with auth on, a gateway key for every model, and an OpenAI
    deployment that relays Responses requests."""
    tmp = tmp_path_factory.mktemp("codex")
    auth = {
        "auth.enabled": True,
        "auth.key_store": str(tmp / "keys.sqlite3"),
        "auth.secret_file": str(tmp / "key-secret"),
        "auth.signing_keys_dir": str(tmp / "signing-keys"),
    }
    # The first key also makes the hashing secret and signing key the gateway loads.
    record, key = create_key(load_config(environ={}, overrides=auth).auth, name="codex")
    providers = front_door_providers(fake_upstream)
    providers["openai"] = {**providers["openai"], "responses_api": True}
    ledger = tmp / "usage.sqlite3"
    running = await start_front_door(
        fake_upstream, tmp, providers=providers, **auth, **{"ledger.path": str(ledger)}
    )
    yield AuthedFrontDoor(running, base_url(running) + "/v1", record.id, key, ledger)
    await running.aclose()


def describe(result: CodexResult) -> str:
    """A failed run in a few lines: Codex's error, else its output."""
    head = f"rc={result.returncode} timed_out={result.timed_out} in {result.duration_s:.1f}s"
    if result.error:
        return f"{head}: {result.error}"
    return f"{head}\nstdout: {result.stdout[:3000]}\nstderr: {result.stderr[-2000:]}"


def answered(result: CodexResult) -> str:
    """The run's final message, asserting it succeeded."""
    assert not result.is_error, describe(result)
    assert result.answer is not None, describe(result)
    return result.answer


async def rows_since(
    ledger: Path, since: float, model: str, count: int = 1
) -> list[dict[str, Any]]:
    """The ledger rows of calls for `model` that started after `since`, in call
    order, once there are `count` of them and the last one succeeded."""
    rows: list[dict[str, Any]] = []
    for _ in range(100):
        rows = [
            r
            for r in ledger_rows(ledger).values()
            if r["time"] >= since and r["model_requested"] == model
        ]
        rows.sort(key=lambda r: r["time"])
        if len(rows) >= count and rows[-1]["status"] == "OK":
            return rows
        await asyncio.sleep(0.05)  # the ledger flushes every 0.05 s
    raise AssertionError(f"no successful call for {model} in the ledger since {since}: {rows}")


def normalized(request: RecordedRequest, run: CodexResult) -> Any:
    """The body with what differs from run to run (ids, clock, the fresh HOME) replaced.

    Parsed, because Codex writes client_metadata (a hash map) in any order.
    """
    raw = request.raw.replace(run.env["HOME"].encode(), b"HOME")
    raw = CLOCK.sub(rb"\g<1>0", UUID.sub(b"ID", raw))
    return json.loads(raw)


async def test_pass_through_relays_codexs_request_unchanged_but_the_model(
    codex: str, door: AuthedFrontDoor, fake: FakeUpstream, tmp_path: Path
) -> None:
    # What Codex sends when it talks to the upstream directly, from the same
    # working directory (its environment context names it)...
    fake.enqueue(Reply(blocks=[Text("Hi, directly.")]))
    direct_run = await run_codex(
        fake.openai_url,
        "direct-key",
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_config=NO_RETRIES,
        cwd=tmp_path,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert answered(direct_run) == "Hi, directly."
    direct = fake.last("/v1/responses")
    assert direct.headers["user-agent"].startswith(f"codex_exec/{CODEX_VERSION} ")
    assert direct.headers["authorization"] == "Bearer direct-key"

    # ...is what the upstream receives through the gateway, but for the model.
    fake.enqueue(Reply(blocks=[Text("Hi from the fake upstream.")]))
    since = time.time()
    result = await run_codex(
        door.url,
        door.key,
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_config=NO_RETRIES,
        cwd=tmp_path,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert answered(result) == "Hi from the fake upstream."
    forwarded = fake.last("/v1/responses")
    assert forwarded is not direct
    assert forwarded.body["model"] == UPSTREAM_MODEL
    expected = normalized(direct, direct_run)
    expected["model"] = UPSTREAM_MODEL
    assert normalized(forwarded, result) == expected
    assert list(forwarded.body) == list(direct.body)  # the fields' order too
    # The gateway's upstream credential; the caller's key goes no further.
    assert forwarded.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert door.key not in json.dumps(forwarded.headers)

    # What a reshaping proxy breaks, spelled out: tools other than functions
    # (a namespace of sub-agent tools, hosted web search), reasoning carried
    # as encrypted content, no instructions but developer messages, no store.
    body = forwarded.body
    assert body["stream"] is True and body["store"] is False
    assert "instructions" not in body
    assert body["include"] == ["reasoning.encrypted_content"]
    assert {"function", "namespace", "web_search"} <= {t["type"] for t in body["tools"]}
    assert [i["role"] for i in body["input"] if i["type"] == "message"][:2] == [
        "developer",
        "developer",
    ]
    assert body["prompt_cache_key"] == result.thread_id
    assert result.usage is not None and result.usage["output_tokens"] == 7

    [row] = await rows_since(door.ledger, since, PASS_THROUGH_MODEL)
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.responses", "OK")
    assert (row["key_id"], row["model_served"], row["provider"]) == (
        door.key_id,
        PASS_THROUGH_MODEL,
        "openai",
    )
    assert (row["input_tokens"], row["output_tokens"]) == (12, 7)


async def test_translated_to_echo_answers_with_the_prompt(
    codex: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    since = time.time()
    result = await run_codex(
        door.url,
        door.key,
        "Repeat after me: periwinkle",
        model="echo",
        extra_config=NO_RETRIES,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert "periwinkle" in answered(result)
    assert fake.requests == []  # the offline provider answered

    [row] = await rows_since(door.ledger, since, "echo")
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.responses", "OK")
    assert (row["key_id"], row["model_served"], row["provider"]) == (door.key_id, "echo", "offline")


async def test_translated_to_an_anthropic_model(
    codex: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("Hi from Claude, via the fake upstream.")]))
    since = time.time()
    result = await run_codex(
        door.url,
        door.key,
        "say hi",
        model="claude-test",
        extra_config=NO_RETRIES,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert answered(result) == "Hi from Claude, via the fake upstream."
    sent = fake.last("/v1/messages")
    assert sent.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    body = sent.body
    assert body["model"] == "claude-upstream-1" and body["stream"] is True
    # Codex's developer messages are the system prompt; its function tools are tools.
    assert "Codex" in json.dumps(body["system"])
    assert "exec_command" in {t["name"] for t in body["tools"]}
    assert body["messages"][-1]["role"] == "user"
    assert "say hi" in json.dumps(body["messages"][-1]["content"])

    [row] = await rows_since(door.ledger, since, "claude-test")
    assert (row["edge"], row["method"], row["status"]) == ("http", "openai.responses", "OK")
    assert (row["key_id"], row["provider"]) == (door.key_id, "anthropic")


async def test_a_tool_call_round_trip_translated_to_an_anthropic_model(
    codex: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    # Claude asks for Codex's shell tool; Codex runs it and sends the output
    # back in a second request, which reaches Claude as the tool's result.
    fake.enqueue(
        Reply(blocks=[ToolCall("toolu_01", "exec_command", {"cmd": "echo periwinkle"})]),
        Reply(blocks=[Text("It printed periwinkle.")]),
    )
    since = time.time()
    result = await run_codex(
        door.url,
        door.key,
        "run echo periwinkle",
        model="claude-test",
        extra_config=NO_RETRIES,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert answered(result) == "It printed periwinkle."
    commands = [
        e["item"]
        for e in result.events
        if e.get("type") == "item.completed" and e["item"].get("type") == "command_execution"
    ]
    assert len(commands) == 1 and "echo periwinkle" in commands[0]["command"], result.events
    first, second = [r for r in fake.requests if r.path == "/v1/messages"]
    # The first turn's conversation, then Claude's tool use and its result.
    assert second.body["messages"][: len(first.body["messages"])] == first.body["messages"]
    call, output = second.body["messages"][len(first.body["messages"]) :]
    assert call["role"] == "assistant"
    [tool_use] = [b for b in call["content"] if b["type"] == "tool_use"]
    assert (tool_use["id"], tool_use["name"]) == ("toolu_01", "exec_command")
    assert tool_use["input"] == {"cmd": "echo periwinkle"}
    assert output["role"] == "user"
    [tool_result] = [b for b in output["content"] if b["type"] == "tool_result"]
    assert tool_result["tool_use_id"] == "toolu_01"
    # Codex's sandbox may refuse the command on some machines; its output goes back either way.
    if commands[0]["exit_code"] == 0:
        assert "periwinkle" in json.dumps(tool_result["content"])

    rows = await rows_since(door.ledger, since, "claude-test", count=2)
    assert [(r["method"], r["status"]) for r in rows] == [("openai.responses", "OK")] * 2


async def test_a_bad_key_fails_at_once_with_401(
    codex: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    result = await run_codex(
        door.url,
        "llmgw-not-a-real-key",
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_config=NO_RETRIES,
        executable=codex,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode not in (0, None), describe(result)
    assert result.error is not None and "401 Unauthorized" in result.error, describe(result)
    assert result.duration_s < 10, describe(result)
    assert fake.requests == []
