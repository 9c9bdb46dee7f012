"""Short-lived access tokens: Ed25519-signed JWTs, their signing keys and their checks.

Tokens follow the JWT access-token profile (RFC 9068): header `typ: at+jwt`,
`alg: EdDSA` and the `kid` of the signing key; claims `iss`, `aud`, `sub`
(the API key's id), `iat`, `nbf`, `exp`, `jti`, `scope` (space-separated)
and `models` (shell-style patterns, `*` for all).

Verification follows RFC 8725: one algorithm is allowed and the header's
`alg` is checked against it before anything else, `typ` must be `at+jwt`
(so no other kind of JWT signed by the same key passes), every registered
claim above is required and checked, with at most a minute of leeway, and
a `kid` this gateway does not hold is rejected: keys are never fetched.

Signing keys are PEM files named `<kid>.pem` in one directory. Every key
there verifies; the newest private key signs (kids start with their UTC
creation time) unless `auth.signing_key_id` pins one. The directory is
re-read every few seconds, so a rotation needs no restart: see README.md,
"Rotating the signing key".
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.identity import Identity
from server.telemetry.audit import SIGNING_KEY_CREATED, SIGNING_KEYS_CHANGED, audit_event

log = logging.getLogger(__name__)

TOKEN_TYPE = "at+jwt"
ALGORITHM = "EdDSA"
# The allow-list: the one algorithm we sign with. Never taken from the token.
ALLOWED_ALGORITHMS = (ALGORITHM,)
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti")
_KID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TokenRejectedError(Exception):
    """A token failed a check. `reason` is a fixed label, safe to log; callers see none of it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoSigningKeyError(Exception):
    """No private signing key is available, so no token can be issued."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    public_key: Ed25519PublicKey
    private_key: Ed25519PrivateKey | None = None


def new_kid(now: float | None = None) -> str:
    """A key id that sorts by creation time, to the microsecond: 20250601T120000123456Z-a1b2c3."""
    now = time.time() if now is None else now
    micros = int(now * 1_000_000) % 1_000_000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{micros:06d}Z-{secrets.token_hex(3)}"


def create_signing_key(directory: Path, kid: str | None = None) -> str:
    """Writes a new Ed25519 private key as <kid>.pem (mode 0600); returns its kid."""
    kid = kid or new_kid()
    if not _KID.match(kid):
        raise ValueError(f"invalid signing key id {kid!r}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(directory / f"{kid}.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    audit_event(SIGNING_KEY_CREATED, kid=kid)
    return kid


def _load_key(path: Path) -> SigningKey | None:
    kid = path.stem
    if not _KID.match(kid):
        log.warning("ignoring signing key file %s: the name is not a valid key id", path.name)
        return None
    try:
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return SigningKey(kid, private.public_key(), private)
        else:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return SigningKey(kid, public)
    except (OSError, ValueError, TypeError) as err:
        log.warning("ignoring signing key file %s: %s", path.name, type(err).__name__)
        return None
    log.warning("ignoring signing key file %s: not an Ed25519 key", path.name)
    return None


def load_signing_keys(directory: Path) -> dict[str, SigningKey]:
    """Every usable key in the directory, by kid (empty when it does not exist)."""
    if not directory.is_dir():
        return {}
    keys = (_load_key(path) for path in sorted(directory.glob("*.pem")))
    return {key.kid: key for key in keys if key is not None}


class SigningKeyRing:
    """The signing keys in a directory, re-read at most every `reload_interval` seconds."""

    def __init__(
        self,
        directory: Path,
        *,
        pinned_kid: str | None = None,
        reload_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._pinned = pinned_kid
        self._interval = reload_interval
        self._clock = clock
        self._keys: dict[str, SigningKey] = {}
        self._loaded_at = -math.inf
        self._reloading: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Reads the directory now (blocking; at start-up and from a worker thread)."""
        self._set(load_signing_keys(self.directory))

    def _set(self, keys: dict[str, SigningKey]) -> None:
        added = keys.keys() - self._keys.keys()
        removed = self._keys.keys() - keys.keys()
        self._keys = keys
        self._loaded_at = self._clock()
        if added or removed:
            signer = self.signer
            audit_event(
                SIGNING_KEYS_CHANGED,
                added=sorted(added),
                removed=sorted(removed),
                signer=signer.kid if signer else None,
            )
            log.info(
                "signing keys: %d loaded (added %s, removed %s); signing with %s",
                len(keys),
                sorted(added) or "none",
                sorted(removed) or "none",
                signer.kid if signer else "none",
            )

    def refresh_if_due(self) -> None:
        """Starts a background re-read when the last one is older than the interval.

        Never awaited on the serving path: a call sees the keys as they are,
        and a key added on disk is used within `reload_interval` seconds.
        """
        if self._reloading is not None or self._clock() - self._loaded_at < self._interval:
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            self._set(await asyncio.to_thread(load_signing_keys, self.directory))
        except Exception:
            log.exception("re-reading the signing keys failed; keeping the ones loaded")
            self._loaded_at = self._clock()
        finally:
            self._reloading = None

    async def reload(self) -> None:
        """Re-reads the directory now (used when no key can sign)."""
        self._set(await asyncio.to_thread(load_signing_keys, self.directory))

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    @property
    def signer(self) -> SigningKey | None:
        """The key new tokens are signed with: the pinned one, else the newest private key."""
        if self._pinned is not None:
            pinned = self._keys.get(self._pinned)
            return pinned if pinned is not None and pinned.private_key is not None else None
        private = [key for key in self._keys.values() if key.private_key is not None]
        return max(private, key=lambda key: key.kid) if private else None

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        key = self._keys.get(kid)
        return key.public_key if key is not None else None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    issued_at: float  # seconds since the epoch, the gateway's clock
    expires_at: float


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token says about its bearer."""

    key_id: str
    scopes: frozenset[str]
    models: tuple[str, ...]
    expires_at: float
    token_id: str
    issued_at: float
    # The secret it was issued for (Identity.secret); "" for a token from before.
    secret: str = ""


class TokenIssuer:
    """Signs tokens for authenticated API keys.

    `key_valid_until(key_id, now)` (the key store's) bounds each token: none
    outlives its key's expiry, nor a rotation's grace it was issued in.
    """

    def __init__(
        self,
        ring: SigningKeyRing,
        *,
        issuer: str,
        audience: str,
        ttl: float,
        clock: Callable[[], float] = time.time,
        key_valid_until: Callable[[str, float], Awaitable[float]] | None = None,
    ) -> None:
        self._ring = ring
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._clock = clock
        self._key_valid_until = key_valid_until

    async def issue(self, identity: Identity, lifetime: float | None = None) -> IssuedToken:
        """A token for `identity`, living `lifetime` seconds (the default TTL at most)."""
        signer = self._ring.signer
        if signer is None:
            await self._ring.reload()  # the first key may have been created since start-up
            signer = self._ring.signer
        if signer is None or signer.private_key is None:
            raise NoSigningKeyError(f"no private signing key in {self._ring.directory}")
        ttl = min(lifetime, self._ttl) if lifetime and lifetime > 0 else self._ttl
        now = self._clock()
        issued_at = math.floor(now)  # JWT times are whole seconds, and iat may not be ahead
        # Rounded up, so a token never lives shorter than asked...
        expires_at = math.ceil(now + ttl)
        if self._key_valid_until is not None:
            # ...but down to its key's end: never a second past it.
            key_end = await self._key_valid_until(identity.key_id, now)
            if key_end < expires_at:
                expires_at = max(issued_at + 1, math.floor(key_end))
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": identity.key_id,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_at,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(sorted(identity.scopes)),
            "models": list(identity.models),
        }
        if identity.secret:
            claims["sec"] = identity.secret
        token = jwt.encode(
            claims,
            signer.private_key,
            algorithm=ALGORITHM,
            headers={"kid": signer.kid, "typ": TOKEN_TYPE},
        )
        return IssuedToken(token, now, float(expires_at))


class TokenVerifier:
    """Checks tokens against the key ring; raises TokenRejectedError with a loggable reason."""

    def __init__(self, ring: SigningKeyRing, *, issuer: str, audience: str, leeway: float) -> None:
        if not 0 <= leeway <= 60:
            raise ValueError("leeway must be between 0 and 60 seconds")
        self._ring = ring
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway

    def verify(self, token: str) -> TokenClaims:
        self._ring.refresh_if_due()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenRejectedError("malformed") from None
        # Explicit typing (RFC 8725 3.11): only our access tokens, not any JWT.
        if header.get("typ") != TOKEN_TYPE:
            raise TokenRejectedError("wrong_type")
        # Checked here as well as by PyJWT so that `none` and HMAC tokens never
        # reach a key lookup or a signature routine.
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise TokenRejectedError("algorithm_not_allowed")
        kid = header.get("kid")
        key = self._ring.public_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenRejectedError("unknown_kid")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(ALLOWED_ALGORITHMS),
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                    "strict_aud": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejectedError("expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejectedError("not_yet_valid") from None
        except jwt.InvalidSignatureError:
            raise TokenRejectedError("bad_signature") from None
        except jwt.InvalidAudienceError:
            raise TokenRejectedError("wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejectedError("wrong_issuer") from None
        except jwt.InvalidTokenError as err:
            raise TokenRejectedError(f"invalid:{type(err).__name__}") from None
        return _claims(claims)


def _claims(claims: dict[str, Any]) -> TokenClaims:
    scope, models, sub = claims.get("scope"), claims.get("models"), claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise TokenRejectedError("bad_claims")
    if not isinstance(scope, str):
        raise TokenRejectedError("bad_claims")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise TokenRejectedError("bad_claims")
    secret = claims.get("sec", "")
    if not isinstance(secret, str):
        raise TokenRejectedError("bad_claims")
    return TokenClaims(
        key_id=sub,
        scopes=frozenset(scope.split()),
        models=tuple(models),
        expires_at=float(claims["exp"]),
        token_id=str(claims["jti"]),
        issued_at=float(claims["iat"]),
        secret=secret,
    )
