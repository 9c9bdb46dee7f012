"""The gateway's own credentials for upstream providers, re-read on a TTL.

A provider backend asks a CredentialSource for its API key on each request
(`await source.get()`) instead of reading it once at start-up, so a rotated
key is picked up without a restart. Four kinds of source:

    env_credential("ANTHROPIC_API_KEY")                 # the environment
    file_credential("/run/secrets/openai", ttl=60)      # a mounted secret
    command_credential(["vault", "read", ...], ttl=300) # any command's stdout
    stored_credential(StoredKeyReference(name="openai-prod"))  # the key store, encrypted

or, from provider settings, `credential_source(env=..., file=..., command=...,
ttl_s=...)` with exactly one of the three. The interface is two methods:

    async def get() -> str       # the current value, re-read once `ttl` has passed
    def invalidate() -> None     # forget it: call after the provider answers 401

A refresh that fails while an earlier value is held keeps serving that value
(and logs why, never the value); with no value at all, `get()` raises
CredentialUnavailableError, which callers see as INTERNAL. Values are never
logged, not even in part.

A stored key (`api_key_stored: NAME`, server/auth/provider_keys.py) is
decrypted once when its provider is built, at start-up: one that cannot be
(no such key, a missing or wrong key-encryption key, a tampered envelope) is
logged as an ERROR naming it and why, and the gateway starts all the same;
that provider's calls then fail with FAILED_PRECONDITION, reason
STORED_PROVIDER_KEY_UNAVAILABLE, naming the stored key (the router falls back
to another deployment where a route has one). It is read again every TTL, so
a fixed or replaced key is taken up without a restart. Besides the log, a
stored key without a usable value is reported by the metric
`llmgw_stored_provider_keys_undecryptable{stored_key}` and in the HTTP readiness
answer (`stored_key_status`, `undecryptable_stored_keys`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.auth.envelope import KekRingError
from server.auth.provider_keys import ProviderKeyStore, StoredKeyError
from server.config import AuthConfig
from server.errors import CredentialUnavailableError

log = logging.getLogger(__name__)


class CredentialSource(Protocol):
    """Where a provider's API key comes from."""

    async def get(self) -> str:
        """The current credential (re-read when older than the source's TTL)."""
        ...

    def invalidate(self) -> None:
        """Drops the held value so the next `get()` re-reads it."""
        ...


class _ReadError(Exception):
    """Reading a credential failed; the message says why and never holds the value."""


class RefreshingCredential:
    """A credential read by `read()`, held for `ttl` seconds (None: until invalidated).

    Concurrent `get()`s share one read.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[str]],
        *,
        ttl: float | None,
        description: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl = math.inf if ttl is None else ttl
        self.description = description
        self._clock = clock
        self._value: str | None = None
        self._read_at = -math.inf
        self._reading: asyncio.Task[str] | None = None

    async def get(self) -> str:
        if self._value is not None and self._clock() - self._read_at < self._ttl:
            return self._value
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self._refresh())
        return await asyncio.shield(self._reading)

    def invalidate(self) -> None:
        self._read_at = -math.inf

    async def _refresh(self) -> str:
        try:
            value = (await self._read()).strip()
            if not value:
                raise _ReadError("it is empty")
        except _ReadError as err:
            if self._value is not None:
                log.warning("keeping the previous %s: re-reading failed: %s", self.description, err)
                self._read_at = self._clock()  # retry after another TTL, not on every call
                return self._value
            log.error("cannot read the %s: %s", self.description, err)
            raise CredentialUnavailableError(
                "the gateway's credential for the provider is unavailable"
            ) from None
        self._value, self._read_at = value, self._clock()
        return value


def env_credential(
    name: str, *, ttl: float | None = 60.0, environ: Mapping[str, str] | None = None
) -> RefreshingCredential:
    """The environment variable `name` (os.environ may be updated in-process)."""
    source = os.environ if environ is None else environ

    async def read() -> str:
        value = source.get(name)
        if value is None:
            raise _ReadError(f"${name} is not set")
        return value

    return RefreshingCredential(read, ttl=ttl, description=f"credential in ${name}")


def file_credential(path: str | Path, *, ttl: float | None = 60.0) -> RefreshingCredential:
    """The contents of a file (surrounding whitespace stripped), e.g. a mounted secret."""
    path = Path(path)

    async def read() -> str:
        try:
            return await asyncio.to_thread(path.read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise _ReadError(f"cannot read {path}: {type(err).__name__}") from None

    return RefreshingCredential(read, ttl=ttl, description=f"credential in {path}")


def command_credential(
    argv: Sequence[str], *, ttl: float | None = 300.0, timeout: float = 10.0
) -> RefreshingCredential:
    """The standard output of a command (run without a shell), e.g. a secrets-manager CLI."""
    if not argv:
        raise ValueError("the credential command is empty")
    command = list(argv)

    async def read() -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,  # may echo secrets; never read
            )
        except OSError as err:
            raise _ReadError(f"cannot run {command[0]}: {type(err).__name__}") from None
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise _ReadError(f"{command[0]} did not finish within {timeout:g} s") from None
        if process.returncode != 0:
            raise _ReadError(f"{command[0]} exited with status {process.returncode}")
        return out.decode("utf-8", errors="replace")

    return RefreshingCredential(read, ttl=ttl, description=f"credential from `{command[0]}`")


def credential_source(
    *,
    env: str | None = None,
    file: str | Path | None = None,
    command: Sequence[str] | None = None,
    ttl_s: float | None = None,
) -> RefreshingCredential:
    """The source a provider's settings name: exactly one of env, file and command.

    `ttl_s` overrides the kind's default (env and file 60 s, command 300 s).
    """
    given = [kind for kind, value in (("env", env), ("file", file), ("command", command)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one of env, file and command (got {given or 'none'})")
    if env:
        return env_credential(env) if ttl_s is None else env_credential(env, ttl=ttl_s)
    if file:
        return file_credential(file) if ttl_s is None else file_credential(file, ttl=ttl_s)
    assert command is not None
    return command_credential(command) if ttl_s is None else command_credential(command, ttl=ttl_s)


# -- Keys stored encrypted in the key store ------------------------------------

STORED_KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class StoredKeyUnavailableError(CredentialUnavailableError):
    """A provider's stored key cannot be decrypted: the operator must fix the key or KEKs."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "STORED_PROVIDER_KEY_UNAVAILABLE"


class StoredKeyReference(BaseModel):
    """`api_key_stored: NAME`, with where the key store and its KEKs are.

    A provider section gives the name; the gateway's configuration fills in
    auth.key_store and secrets.encryption_keys_file (server/config.py).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=STORED_KEY_NAME_PATTERN)
    # A file, or a postgresql:// URL (auth.key_store).
    key_store: Path | str = Field(default_factory=lambda: AuthConfig().key_store)
    encryption_keys_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_a_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


# The StoredCredentials of this process's open providers, for the metric and
# the health detail. Process-wide like the log line they mirror: credentials
# are made deep inside the providers; a provider's aclose retires its own.
_STORED: weakref.WeakSet[StoredCredential] = weakref.WeakSet()


def stored_key_status() -> dict[str, bool]:
    """Each stored provider key a provider of this process uses: True when it has
    no usable value (it could not be read or decrypted, and none is held)."""
    status: dict[str, bool] = {}
    for credential in list(_STORED):
        name = credential.reference.name
        status[name] = status.get(name, False) or not credential.available
    return dict(sorted(status.items()))


def undecryptable_stored_keys() -> list[str]:
    """The names of the stored provider keys whose providers fail closed now."""
    return [name for name, failing in stored_key_status().items() if failing]


class StoredCredential:
    """A provider key from the key store, decrypted now and then every `ttl` seconds."""

    def __init__(
        self,
        reference: StoredKeyReference,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reference = reference
        self.description = f"stored provider key {reference.name!r}"
        self._ttl = ttl
        self._clock = clock
        self._value: str | None = None
        self._problem: str | None = None
        self._read_at = -math.inf
        self._reading: asyncio.Task[str] | None = None
        # The start-up check: once, now, so a key that cannot be read is
        # reported when the gateway starts, not at its first call.
        try:
            self._value = self._decrypt()
        except _ReadError as err:
            self._problem = str(err)
            log.error(
                "cannot use the %s: %s; calls to its provider fail with"
                " FAILED_PRECONDITION until it is fixed",
                self.description,
                err,
            )
        self._read_at = self._clock()
        _STORED.add(self)

    @property
    def available(self) -> bool:
        return self._value is not None

    def retire(self) -> None:
        """Leaves the metric and the health detail: its provider was closed."""
        _STORED.discard(self)

    def _decrypt(self) -> str:
        reference = self.reference
        try:
            store = ProviderKeyStore.at(reference.key_store, reference.encryption_keys_file)
        except KekRingError as err:
            raise _ReadError(str(err)) from None
        try:
            value = store.get(reference.name).strip()
        except StoredKeyError as err:  # its message names the store, never a password
            raise _ReadError(str(err)) from None
        finally:
            store.close()
        if not value:
            raise _ReadError("it is empty")
        return value

    def _unavailable(self) -> StoredKeyUnavailableError:
        name = self.reference.name
        return StoredKeyUnavailableError(
            f"the gateway cannot decrypt its stored provider key {name!r}"
            " (see its log; `python -m server keys provider list`)",
            metadata={"stored_key": name},
        )

    async def get(self) -> str:
        fresh = self._clock() - self._read_at < self._ttl
        if fresh:
            if self._value is None:
                raise self._unavailable()  # failed within the TTL: not retried per call
            return self._value
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self._refresh())
        return await asyncio.shield(self._reading)

    def invalidate(self) -> None:
        self._read_at = -math.inf

    async def _refresh(self) -> str:
        try:
            value = await asyncio.to_thread(self._decrypt)
        except _ReadError as err:
            self._read_at = self._clock()
            if self._value is not None:
                log.warning("keeping the %s: re-reading it failed: %s", self.description, err)
                return self._value
            if str(err) != self._problem:
                log.error("cannot use the %s: %s", self.description, err)
                self._problem = str(err)
            raise self._unavailable() from None
        if self._value is None:
            log.info("the %s can be used now", self.description)
        self._value, self._problem, self._read_at = value, None, self._clock()
        return value


def stored_credential(
    reference: StoredKeyReference, *, ttl: float | None = None
) -> StoredCredential:
    """The provider key `reference` names, from the key store (ttl default 60 s)."""
    return StoredCredential(reference, ttl=60.0 if ttl is None else ttl)
