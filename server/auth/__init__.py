"""Authentication: API keys, the short-lived tokens traded for them, and their checks.

`keys.py` holds the key format, the keyed hash and the store (with expiry
and rotation), in SQLite or PostgreSQL (`key_store_backend.py`,
`key_store_postgres.py`; `key_store_copy.py` copies one store to another);
`expiry.py` reports keys close to their expiry;
`tokens.py` the signing keys and the JWTs; `authenticator.py` turns a call's
metadata into an Identity; `service.py` serves TokenService; `cli.py` is
`python -m server keys ...`, and `admin_service.py` KeyService, the same
operations over gRPC for admin keys, both through `key_admin.py`'s rules;
`revocation.py` tells the other gateway processes of a key's change over
Redis. `envelope.py` and `provider_keys.py` keep
providers' API keys encrypted in the same store. The interceptor that applies all this to every
call is interceptors/auth.py. `GatewayAuth` assembles them from `auth:` config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from server.auth.authenticator import Authenticator
from server.auth.expiry import ExpiryWatch
from server.auth.keys import KeyStore, SecretFile
from server.auth.tokens import SigningKeyRing, TokenIssuer, TokenVerifier
from server.config import AuthConfig

__all__ = ["GatewayAuth"]

log = logging.getLogger(__name__)


@dataclass
class GatewayAuth:
    """Everything the serving side needs to authenticate calls and issue tokens."""

    config: AuthConfig
    store: KeyStore
    ring: SigningKeyRing
    issuer: TokenIssuer
    verifier: TokenVerifier
    authenticator: Authenticator
    expiry: ExpiryWatch

    @classmethod
    def from_config(cls, config: AuthConfig) -> GatewayAuth:
        """Builds it; reads the signing keys now but creates nothing on disk.

        Keys, the secret and the first signing key are made by `python -m
        server keys create`; until then every credential is refused.
        """
        store = KeyStore.from_config(config)
        ring = SigningKeyRing(config.signing_keys_dir, pinned_kid=config.signing_key_id)
        ring.load()
        if not store.exists():
            log.warning(
                "no API key store at %s yet: every call needing credentials is refused"
                " until `python -m server keys create` makes a key",
                store.where,
            )
        elif ring.signer is None:
            log.warning("no signing key in %s: IssueToken will fail", config.signing_keys_dir)
        verifier = TokenVerifier(
            ring, issuer=config.issuer, audience=config.audience, leeway=config.leeway_s
        )
        issuer = TokenIssuer(
            ring,
            issuer=config.issuer,
            audience=config.audience,
            ttl=config.token_ttl_s,
            key_valid_until=store.valid_until,
        )
        expiry = ExpiryWatch(store)
        if store.exists():
            expiry.check()  # then once a day, on an authenticated call
        authenticator = Authenticator(
            store,
            SecretFile(config.secret_file),
            verifier,
            on_authenticated=expiry.check_if_due,
        )
        return cls(config, store, ring, issuer, verifier, authenticator, expiry)
