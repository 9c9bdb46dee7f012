"""Turns a call's credentials into an Identity, or refuses them.

Two credentials are accepted, each in one metadata entry: an API key
(`x-api-key: <key>` or `authorization: Bearer <key>`) or a token from
IssueToken (`authorization: Bearer <token>`). The two are told apart by
the key prefix. A token is checked by signature and claims, then against
its key's record for revocation; the record comes from the store's
few-second cache, so a valid token usually costs no database round trip.

A key past its expiry is refused like an unknown one, and so are its
tokens. After a rotation the previous secret is accepted until the grace
ends, and so are the tokens issued for it; tokens issued during the grace
never outlive it (TokenIssuer bounds them). A token names the secret it was
issued for (its `sec` claim, a fingerprint of the secret's stored hash), so
that the old secret's tokens end with the grace however recently they were
issued, even by a process that still held the key's cached record. A token
from before the claim existed is judged by its issue time, in whole seconds.

Every refusal raises UnauthenticatedError, identical whatever the cause; the
cause is logged as a fixed label (`expired`, `unknown_kid`, ...), never with
the credential or anything derived from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from server.auth.keys import (
    KeyRecord,
    KeyStore,
    SecretFile,
    SecretUnavailableError,
    key_id_of,
    looks_like_api_key,
    secret_fingerprint,
)
from server.auth.tokens import TokenRejectedError, TokenVerifier
from server.errors import UnauthenticatedError
from server.identity import Identity

log = logging.getLogger(__name__)

AUTHORIZATION_HEADER = "authorization"
API_KEY_HEADER = "x-api-key"
_BEARER = "bearer "


class _RefusedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def credential_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The one credential in the call's metadata (raises _RefusedError otherwise)."""
    found: list[str | bytes] = []
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            found.append(value)
        elif key == AUTHORIZATION_HEADER:
            if not isinstance(value, str) or not value[: len(_BEARER)].lower() == _BEARER:
                raise _RefusedError("not_bearer")
            found.append(value[len(_BEARER) :].strip())
    if not found:
        raise _RefusedError("no_credentials")
    if len(found) > 1:
        # Two credentials could disagree about who is calling: refuse rather than pick.
        raise _RefusedError("several_credentials")
    credential = found[0]
    if not isinstance(credential, str) or not credential:
        raise _RefusedError("malformed")
    return credential


class Authenticator:
    """Checks API keys and tokens; the result is the caller's Identity."""

    def __init__(
        self,
        store: KeyStore,
        secret: SecretFile,
        verifier: TokenVerifier,
        *,
        clock: Callable[[], float] = time.time,
        on_authenticated: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._secret = secret
        self._verifier = verifier
        # Wall-clock time, for expiries and grace periods (tests move it).
        self.clock = clock
        # Called on every accepted credential: the expiry watch's daily check.
        self._on_authenticated = on_authenticated

    async def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str = ""
    ) -> Identity:
        """The caller's identity; raises UnauthenticatedError for anything else."""
        try:
            credential = credential_of(metadata)
            if looks_like_api_key(credential):
                identity = await self._api_key(credential)
            else:
                identity = await self._token(credential)
            if self._on_authenticated is not None:
                self._on_authenticated()
            return identity
        except _RefusedError as rejected:
            log.info("refused credentials for %s: %s", method or "a call", rejected.reason)
        except TokenRejectedError as rejected:
            log.info("refused a token for %s: %s", method or "a call", rejected.reason)
        raise UnauthenticatedError()

    async def _record(self, key_id: str) -> KeyRecord:
        record = await self._store.get(key_id)
        if record is None:
            raise _RefusedError("unknown_key")
        if record.revoked:
            raise _RefusedError("revoked_key")
        if record.expired(self.clock()):
            raise _RefusedError("expired_key")
        return record

    async def _api_key(self, key: str) -> Identity:
        key_id = key_id_of(key)
        if key_id is None:
            raise _RefusedError("malformed_key")
        record = await self._record(key_id)
        try:
            hasher = await self._secret.hasher()
        except SecretUnavailableError as err:
            log.error("cannot check API keys: %s", err)
            raise _RefusedError("no_secret") from None
        if hasher.matches(key, record.key_hash):
            secret = secret_fingerprint(record.key_hash)
        elif (
            record.previous_key_hash is not None
            and record.in_grace(self.clock())
            and hasher.matches(key, record.previous_key_hash)
        ):
            secret = secret_fingerprint(record.previous_key_hash)
        else:
            raise _RefusedError("wrong_key")
        return Identity(
            key_id=record.id,
            scopes=record.scopes,
            models=record.models,
            credential="api_key",
            name=record.name,
            limits=record.limits,
            secret=secret,
        )

    async def _token(self, token: str) -> Identity:
        claims = self._verifier.verify(token)
        # Revoking a key rejects its tokens too: the record says so within the
        # cache TTL (at once in this process).
        record = await self._record(claims.key_id)
        if claims.secret:
            if claims.secret != secret_fingerprint(record.key_hash) and not (
                record.previous_key_hash is not None
                and claims.secret == secret_fingerprint(record.previous_key_hash)
                and record.in_grace(self.clock())
            ):
                raise _RefusedError("rotated_out_token")
        elif (
            record.rotated_at is not None
            and claims.issued_at < math.floor(record.rotated_at)
            and not record.in_grace(self.clock())
        ):
            raise _RefusedError("rotated_out_token")
        return Identity(
            key_id=claims.key_id,
            scopes=claims.scopes,
            models=claims.models,
            credential="token",
            name=record.name,
            limits=record.limits,
        )
