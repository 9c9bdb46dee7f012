"""Upstream credential sources: a rotated provider key is picked up without a restart."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from server.credentials import (
    RefreshingCredential,
    command_credential,
    credential_source,
    env_credential,
    file_credential,
)
from server.errors import CredentialUnavailableError


async def test_file_is_re_read_after_the_ttl(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("first\n")
    source = file_credential(secret, ttl=0.2)
    assert await source.get() == "first"
    secret.write_text("second\n")
    assert await source.get() == "first"  # within the TTL
    await asyncio.sleep(0.25)
    assert await source.get() == "second"


async def test_env_and_invalidate() -> None:
    environ = {"PROVIDER_KEY": "one"}
    source = env_credential("PROVIDER_KEY", ttl=None, environ=environ)
    assert await source.get() == "one"
    environ["PROVIDER_KEY"] = "two"
    assert await source.get() == "one"  # no TTL: held until invalidated...
    source.invalidate()  # ...e.g. after the provider answered 401
    assert await source.get() == "two"


async def test_command_output_is_the_credential(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    script = (
        "import pathlib,sys;p=pathlib.Path(sys.argv[1]);n=int(p.read_text())+1;"
        "p.write_text(str(n));print(f'key-{n}')"
    )
    source = command_credential([sys.executable, "-c", script, str(counter)], ttl=0.1)
    # Concurrent first reads share one run of the command.
    assert await asyncio.gather(*(source.get() for _ in range(5))) == ["key-1"] * 5
    await asyncio.sleep(0.15)
    assert await source.get() == "key-2"


async def test_failures_keep_the_last_value_or_raise_without_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-very-secret-value")
    source = file_credential(secret, ttl=0)
    assert await source.get() == "sk-very-secret-value"
    secret.unlink()
    assert await source.get() == "sk-very-secret-value"  # stale beats down
    missing = file_credential(tmp_path / "nothing", ttl=0)
    with pytest.raises(CredentialUnavailableError):
        await missing.get()
    failing = command_credential([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(CredentialUnavailableError):
        await failing.get()
    slow = command_credential([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
    with pytest.raises(CredentialUnavailableError):
        await slow.get()
    assert "sk-very-secret-value" not in caplog.text


async def test_empty_value_is_not_a_credential() -> None:
    source = env_credential("EMPTY", environ={"EMPTY": "  "})
    with pytest.raises(CredentialUnavailableError):
        await source.get()


def test_credential_source_takes_exactly_one_kind(tmp_path: Path) -> None:
    assert isinstance(credential_source(env="X"), RefreshingCredential)
    assert isinstance(credential_source(file=tmp_path / "k", ttl_s=5), RefreshingCredential)
    assert isinstance(credential_source(command=["true"]), RefreshingCredential)
    with pytest.raises(ValueError, match="exactly one"):
        credential_source()
    with pytest.raises(ValueError, match="exactly one"):
        credential_source(env="X", file="y")
