"""Claude Code itself through the HTTP front door, offline.

The real `claude` CLI (run by tests/claude_code.py; `make claude-code`
installs the pinned version in tests/node/claude-code) answers a prompt with
ANTHROPIC_BASE_URL at a gateway with auth on, holding a gateway key:

- pass-through to the fake upstream's Anthropic deployment: the answer is the
  upstream's, and the upstream receives the very bytes and `anthropic-*`
  headers Claude Code sends when it talks to that upstream directly, under the
  gateway's credential instead of the caller's key;
- translation to the offline `echo` model: the answer echoes the prompt;
- a bad key: a clean 401 at once;
- each call's ledger row: edge `http`, end user = Claude Code's session id.

Without the CLI the tests skip, except under CI (the `CI` variable set),
where `make pytest` installs it first and a missing CLI is a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server.auth.cli import create_key
from server.config import load_config
from tests.claude_code import CLAUDE_CODE_VERSION, ClaudeResult, claude_code_path, run_claude
from tests.conftest import RunningGateway
from tests.fake_upstream import FakeUpstream, Reply, Text
from tests.fake_upstream.server import RecordedRequest
from tests.http_fixtures import base_url, start_front_door
from tests.test_ledger import ledger_rows
from tests.upstream_fixtures import ANTHROPIC_KEY

# A model of the fake Anthropic upstream whose upstream id is its own name, so
# the body goes upstream unchanged.
PASS_THROUGH_MODEL = "claude-sonnet-5-5"
CLAUDE_CODE_BETA = "claude-code-20250219"
# Claude Code retries a 401, 429 or 5xx for over a minute unless this is 0.
NO_RETRIES = {"CLAUDE_CODE_MAX_RETRIES": "0"}
RUN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def claude() -> str:
    """The installed CLI; without it, a skip (a failure under CI)."""
    path = claude_code_path()
    if path is None:
        reason = (
            "Claude Code is not installed in tests/node/claude-code: "
            "`make claude-code` installs it (needs npm and the npm registry)"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI is set, so this test must run")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module", autouse=True)
def _no_sdk_body_dumps() -> Iterator[None]:
    # The anthropic SDK logs every request body at DEBUG. Claude Code's body
    # holds a device id of 64 hex digits (metadata.user_id), which the suite's
    # credential-in-log check (tests/conftest.py) takes for a key hash. The
    # gateway's own records stay checked.
    sdk_log = logging.getLogger("anthropic._base_client")
    level = sdk_log.level
    sdk_log.setLevel(logging.INFO)
    yield
    sdk_log.setLevel(level)


@dataclass
class AuthedFrontDoor:
    running: RunningGateway
    url: str
    key_id: str
    key: str
    ledger: Path


@pytest.fixture(scope="module")
async def door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AuthedFrontDoor]:
    """A front door with auth on, and a gateway key for every model."""
    tmp = tmp_path_factory.mktemp("claude-code")
    auth = {
        "auth.enabled": True,
        "auth.key_store": str(tmp / "keys.sqlite3"),
        "auth.secret_file": str(tmp / "key-secret"),
        "auth.signing_keys_dir": str(tmp / "signing-keys"),
    }
    # The first key also makes the hashing secret and signing key the gateway loads.
    record, key = create_key(load_config(environ={}, overrides=auth).auth, name="claude-code")
    ledger = tmp / "usage.sqlite3"
    running = await start_front_door(fake_upstream, tmp, **auth, **{"ledger.path": str(ledger)})
    yield AuthedFrontDoor(running, base_url(running), record.id, key, ledger)
    await running.aclose()


def describe(result: ClaudeResult) -> str:
    """A failed run in a few lines: its error status and message, else its output."""
    head = f"rc={result.returncode} timed_out={result.timed_out} in {result.duration_s:.1f}s"
    if isinstance(result.json, dict):
        status = result.json.get("api_error_status")
        return f"{head}, api_error_status={status}: {result.json.get('result')}"
    return f"{head}\nstdout: {result.stdout[:3000]}\nstderr: {result.stderr[:2000]}"


def answered(result: ClaudeResult) -> dict[str, Any]:
    """The run's json result, asserting it succeeded."""
    assert not result.is_error, describe(result)
    assert isinstance(result.json, dict), describe(result)
    return result.json


async def session_rows(ledger: Path, session_id: str) -> list[dict[str, Any]]:
    """The ledger rows of a Claude Code session in call order, once its last call succeeded."""
    for _ in range(100):
        rows = [r for r in ledger_rows(ledger).values() if r["end_user"] == session_id]
        rows.sort(key=lambda r: r["time"])
        if rows and rows[-1]["status"] == "OK":
            return rows
        await asyncio.sleep(0.05)  # the ledger flushes every 0.05 s
    raise AssertionError(f"no successful call in the ledger for session {session_id}: {rows}")


def normalized(request: RecordedRequest, run: ClaudeResult) -> bytes:
    """The body's bytes with what differs from run to run (ids, the fresh HOME) replaced."""
    user = json.loads(request.body["metadata"]["user_id"])
    volatile = {user["session_id"]: "SESSION", user["device_id"]: "DEVICE", run.env["HOME"]: "HOME"}
    raw = request.raw
    for value, placeholder in volatile.items():
        raw = raw.replace(value.encode(), placeholder.encode())
    return raw


def anthropic_headers(request: RecordedRequest) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.startswith("anthropic-")}


async def test_pass_through_forwards_claude_codes_request_unchanged(
    claude: str, door: AuthedFrontDoor, fake: FakeUpstream, tmp_path: Path
) -> None:
    # What Claude Code sends when it talks to the upstream directly, from the
    # same working directory (its system prompt names it)...
    fake.enqueue(Reply(blocks=[Text("Hi, directly.")]))
    direct_run = await run_claude(
        fake.anthropic_url,
        "direct-key",
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_env=NO_RETRIES,
        cwd=tmp_path,
        executable=claude,
        timeout=RUN_TIMEOUT_S,
    )
    assert answered(direct_run)["result"] == "Hi, directly."
    direct = fake.last("/v1/messages")
    assert direct.headers["user-agent"].startswith(f"claude-cli/{CLAUDE_CODE_VERSION} ")

    # ...is what the upstream receives through the gateway.
    fake.enqueue(Reply(blocks=[Text("Hi from the fake upstream.")]))
    result = await run_claude(
        door.url,
        door.key,
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_env=NO_RETRIES,
        cwd=tmp_path,
        executable=claude,
        timeout=RUN_TIMEOUT_S,
    )
    output = answered(result)
    assert output["result"] == "Hi from the fake upstream."
    forwarded = fake.last("/v1/messages")
    assert forwarded is not direct
    assert forwarded.query == direct.query == "beta=true"
    assert normalized(forwarded, result) == normalized(direct, direct_run)
    assert anthropic_headers(forwarded) == anthropic_headers(direct)
    # The gateway's upstream credential; the caller's key goes no further.
    assert forwarded.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
    assert door.key not in json.dumps(forwarded.headers)
    assert "x-api-key" not in forwarded.headers

    # What a reshaping proxy breaks, spelled out: Claude Code's betas, `system`
    # as an array, a mid-conversation `role: system` message, context management.
    assert CLAUDE_CODE_BETA in forwarded.headers["anthropic-beta"].split(",")
    body = forwarded.body
    assert body["model"] == PASS_THROUGH_MODEL and body["stream"] is True
    assert isinstance(body["system"], list) and len(body["system"]) > 1
    assert [m["role"] for m in body["messages"]].count("system") == 1
    assert "context_management" in body

    session_id = json.loads(body["metadata"]["user_id"])["session_id"]
    assert output["session_id"] == session_id
    [row] = await session_rows(door.ledger, session_id)
    assert (row["edge"], row["method"], row["status"]) == ("http", "anthropic.messages", "OK")
    assert (row["key_id"], row["model_served"]) == (door.key_id, PASS_THROUGH_MODEL)
    assert row["output_tokens"] > 0


async def test_translated_to_echo_answers_with_the_prompt(
    claude: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    # The key as a bearer token this time (ANTHROPIC_AUTH_TOKEN). For a model it
    # does not know, Claude Code asks for max_tokens 32000, over echo's 8192: it
    # lowers it and sends again when the 400 says so in Anthropic's words.
    result = await run_claude(
        door.url,
        door.key,
        "Repeat after me: periwinkle",
        model="echo",
        use_auth_token=True,
        extra_env=NO_RETRIES,
        executable=claude,
        timeout=RUN_TIMEOUT_S,
    )
    output = answered(result)
    assert "periwinkle" in output["result"]
    assert fake.requests == []  # the offline provider answered

    # Any call before the last was refused (a max_tokens over echo's, see above).
    *refused, row = await session_rows(door.ledger, output["session_id"])
    assert all(r["status"] == "INVALID_ARGUMENT" for r in refused), refused
    assert (row["edge"], row["method"], row["status"]) == ("http", "anthropic.messages", "OK")
    assert (row["key_id"], row["model_served"], row["provider"]) == (door.key_id, "echo", "offline")


async def test_a_bad_key_fails_at_once_with_401(
    claude: str, door: AuthedFrontDoor, fake: FakeUpstream
) -> None:
    result = await run_claude(
        door.url,
        "llmgw-not-a-real-key",
        "say hi",
        model=PASS_THROUGH_MODEL,
        extra_env=NO_RETRIES,
        executable=claude,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode not in (0, None), describe(result)
    assert isinstance(result.json, dict), describe(result)
    assert result.json["is_error"] is True
    assert result.json["api_error_status"] == 401, describe(result)
    assert result.duration_s < 10, describe(result)
    assert fake.requests == []
