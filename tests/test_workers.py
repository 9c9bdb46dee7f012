"""`--workers N`: workers never multiply a key's limits, and no other gateway shares their port.

Each worker is a process with its own counters under `limits.backend:
local`, so workers with limits or budgets in force are refused at start-up,
whether the limits come from the configuration or from the key store. The
port claim (server/port_claim.py) is checked with real gateway processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from server.auth.keys import KeyHasher, KeyStore, ensure_secret
from server.config import ConfigError, load_config
from server.identity import KeyLimits
from server.workers import refuse_unshared_store_limits
from tests.conftest import REPO_ROOT, free_port, start_server_process


async def run_gateway(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Runs `python -m server ARGS` to its exit; its code and stderr (20 s, then it is stopped)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, "LLMGW_AUTH__ENABLED": "false", **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.send_signal(signal.SIGTERM)  # the parent takes its workers with it
        _, err = await process.communicate()
        raise AssertionError("the gateway served instead of refusing:\n" + err.decode()) from None
    assert process.returncode is not None
    return process.returncode, err.decode()


LIMITS: dict[str, dict[str, Any]] = {
    "limits.default": {"limits": {"default": {"requests_per_minute": 10}}},
    "limits.keys": {"limits": {"keys": {"abcdefabcdef": {"max_concurrent": 1}}}},
    "budgets.default": {"budgets": {"default": {"monthly_usd": 5}}},
    "budgets.keys": {"budgets": {"keys": {"abcdefabcdef": {"daily_usd": 1}}}},
}


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict) and key != "keys":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("section", LIMITS)
def test_workers_with_configured_local_limits_are_refused(section: str) -> None:
    limits = flatten(LIMITS[section])
    with pytest.raises(ConfigError) as refused:
        load_config(environ={}, overrides={"server.workers": 2, **limits})
    message = str(refused.value)
    assert "server.workers: 2 with limits.backend: local" in message
    assert f"({section})" in message
    assert "set limits.backend: redis" in message and "or server.workers: 1" in message
    # Shared limits, or one process counting them, are fine.
    load_config(environ={}, overrides={"server.workers": 2, "limits.backend": "redis", **limits})
    load_config(environ={}, overrides={"server.workers": 1, **limits})


async def test_a_gateway_with_workers_and_local_budgets_exits_with_a_message() -> None:
    code, err = await run_gateway(
        "--port",
        str(free_port()),
        "--workers",
        "2",
        env={"LLMGW_BUDGETS__DEFAULT__MONTHLY_USD": "5"},
    )
    assert code == 2
    assert "server.workers: 2 with limits.backend: local" in err
    assert "Traceback" not in err


def auth_settings(directory: Path) -> dict[str, str]:
    return {
        "auth.enabled": "true",
        "auth.key_store": str(directory / "keys.sqlite3"),
        "auth.secret_file": str(directory / "secret"),
        "auth.signing_keys_dir": str(directory / "signing-keys"),
    }


def as_environment(settings: dict[str, str]) -> dict[str, str]:
    return {"LLMGW_" + key.upper().replace(".", "__"): value for key, value in settings.items()}


async def test_workers_are_refused_when_keys_in_the_store_carry_limits(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite3")
    hasher = KeyHasher(ensure_secret(tmp_path / "secret"))
    store.create(hasher, name="unlimited", scopes=["generate"])
    revoked, _ = store.create(hasher, name="gone", scopes=["generate"], limits=KeyLimits(10))
    store.revoke(revoked.id)
    settings = auth_settings(tmp_path)
    config = load_config(environ={}, overrides={"server.workers": 2, **settings})
    refuse_unshared_store_limits(config)  # no key in force carries limits

    limited, _ = store.create(hasher, name="svc", scopes=["generate"], limits=KeyLimits(10))
    code, err = await run_gateway(
        "--port", str(free_port()), "--workers", "2", env=as_environment(settings)
    )
    assert code == 2
    assert "server.workers: 2 with limits.backend: local" in err
    assert f"key store {tmp_path / 'keys.sqlite3'} carry limits or budgets ({limited.id})" in err
    assert "set limits.backend: redis" in err
    assert "Traceback" not in err
    shared = load_config(environ={}, overrides={"limits.backend": "redis"}).limits
    refuse_unshared_store_limits(config.model_copy(update={"limits": shared}))


async def test_keys_create_gives_no_limits_that_workers_would_multiply(tmp_path: Path) -> None:
    environ = {**as_environment(auth_settings(tmp_path)), "LLMGW_SERVER__WORKERS": "2"}
    code, err = await run_gateway("keys", "create", "--name", "svc", "--rpm", "10", env=environ)
    assert code == 2
    assert "--rpm, --tpm and --budget-usd need limits.backend: redis" in err
    assert "Traceback" not in err
    assert KeyStore(tmp_path / "keys.sqlite3").list() == []
    # A key without limits is fine: nothing to multiply.
    code, err = await run_gateway("keys", "create", "--name", "svc", env=environ)
    assert code == 0, err
    assert [r.name for r in KeyStore(tmp_path / "keys.sqlite3").list()] == ["svc"]


def refused_for_port(port: int, code: int, err: str) -> bool:
    return (
        code == 2
        and f"port {port} is already served by another llm-gateway" in err
        and "Traceback" not in err
    )


async def test_no_gateway_binds_a_port_workers_serve() -> None:
    port = free_port()
    server = await start_server_process("--port", str(port), "--workers", "2")
    assert server.process.stderr is not None
    log = list(server.log)
    async with asyncio.timeout(20):
        while sum(f"serving on 127.0.0.1:{port}" in line for line in log) < 2:
            log.append((await server.process.stderr.readline()).decode())
    workers = [int(pid) for pid in re.findall(r"worker \d \(pid (\d+)\) starting", "".join(log))]
    assert len(workers) == 2
    try:
        # Another --workers gateway (SO_REUSEPORT), a single one on the same
        # host, and one on `localhost`, which grpc would bind on ::1 alone.
        tries = await asyncio.gather(
            run_gateway("--port", str(port), "--workers", "2"),
            run_gateway("--port", str(port)),
            run_gateway("--host", "localhost", "--port", str(port)),
        )
        for code, err in tries:
            assert refused_for_port(port, code, err), err
        assert f"pid {server.process.pid}, 2 worker(s)" in tries[0][1]

        # The workers hold the claim too: with their parent killed, they still serve.
        server.process.kill()
        # Not wait(): it also waits for the stderr pipe, which the workers hold open.
        async with asyncio.timeout(10):
            while server.process.returncode is None:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.05)
        assert refused_for_port(port, *await run_gateway("--port", str(port)))
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # Once they have exited the claim is gone with them: nothing stale is left.
    async with asyncio.timeout(20):
        while True:
            try:
                after = await start_server_process("--port", str(port))
                break
            except AssertionError as refused:
                assert "already served" in str(refused)
                await asyncio.sleep(0.2)
    after.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(after.process.wait(), 15) == 0
