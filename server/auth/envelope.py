"""Secrets at rest: AES-256-GCM envelopes under a ring of key-encryption keys (KEKs).

A stored secret (a provider's API key in the key store) is kept as

    v1:<kek id>:<base64 of nonce (12 bytes) + ciphertext + GCM tag>

encrypted with a key derived by HKDF-SHA256 (fixed info label, no salt) from
the KEK the envelope names, under a random 96-bit nonce per encryption. The
associated data binds the version, the KEK id and the secret's place (table,
record, field), so a ciphertext copied to another row, or relabelled with
another KEK id, does not decrypt. Every failure raises EnvelopeError with a
reason that never holds the secret.

The KEKs are used for nothing else (not the token-signing keys, not the
key-hashing secret): they come from `secrets.encryption_keys_file` or the
LLMGW_ENCRYPTION_KEYS variable as `id:base64key,id2:base64key2`; the first
encrypts, every one decrypts, so a new KEK goes first and an old one is
removed once `keys provider rotate-kek` has re-encrypted everything.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENCRYPTION_KEYS_ENV = "LLMGW_ENCRYPTION_KEYS"
VERSION = "v1"
KEK_BYTES = 32
NONCE_BYTES = 12
# Derived keys are for this purpose only: another use of a KEK would need its own label.
_HKDF_INFO = b"llm-gateway v1 stored-secret encryption"
_KEK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EnvelopeError(Exception):
    """A secret cannot be sealed or opened; the message says why, never what."""


class KekRingError(Exception):
    """The key-encryption keys are missing or malformed."""


@dataclass(frozen=True, slots=True)
class SecretPlace:
    """Where a secret lives: bound into its envelope as associated data."""

    table: str
    record: str
    field: str

    def associated_data(self, kek_id: str) -> bytes:
        return json.dumps([VERSION, kek_id, self.table, self.record, self.field]).encode()


def _derive(kek: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(kek)
    return AESGCM(key)


class KekRing:
    """Key-encryption keys by id, in order: the first seals, every one opens."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise KekRingError("no key-encryption key is configured")
        for kek_id, kek in keys.items():
            if not _KEK_ID.match(kek_id):
                raise KekRingError(f"invalid key-encryption key id {kek_id!r}")
            if len(kek) < KEK_BYTES:
                raise KekRingError(
                    f"key-encryption key {kek_id!r} is shorter than {KEK_BYTES} bytes"
                )
        self._ids = list(keys)
        self._aead = {kek_id: _derive(kek) for kek_id, kek in keys.items()}

    @property
    def primary(self) -> str:
        """The id of the key new envelopes are sealed with."""
        return self._ids[0]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def seal(self, plaintext: str, place: SecretPlace) -> str:
        """`plaintext` in a new envelope under the primary key, bound to `place`."""
        kek_id = self.primary
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead[kek_id].encrypt(
            nonce, plaintext.encode("utf-8"), place.associated_data(kek_id)
        )
        return f"{VERSION}:{kek_id}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def open(self, envelope: str, place: SecretPlace) -> str:
        """The plaintext of an envelope sealed for `place`; raises EnvelopeError."""
        version, kek_id, body = envelope_parts(envelope)
        if version != VERSION:
            raise EnvelopeError(f"unknown envelope version {version!r}")
        aead = self._aead.get(kek_id)
        if aead is None:
            raise EnvelopeError(
                f"sealed with key-encryption key {kek_id!r}, which is not in the ring"
                f" (it holds {', '.join(self._ids)})"
            )
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise EnvelopeError("the envelope's body is not base64") from None
        if len(raw) < NONCE_BYTES + 16:
            raise EnvelopeError("the envelope is too short")
        try:
            plaintext = aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], place.associated_data(kek_id)
            )
        except InvalidTag:
            raise EnvelopeError(
                f"it does not authenticate under key-encryption key {kek_id!r}:"
                " tampered with, moved from another record, or a different key under that id"
            ) from None
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("the decrypted secret is not UTF-8") from None


def envelope_parts(envelope: str) -> tuple[str, str, str]:
    """(version, KEK id, body) of an envelope; raises EnvelopeError when malformed."""
    parts = envelope.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise EnvelopeError("not an envelope (want v1:<kek id>:<base64>)")
    return parts[0], parts[1], parts[2]


def parse_ring(text: str, *, origin: str) -> dict[str, bytes]:
    """`id:base64key` entries, separated by commas or newlines, in order."""
    keys: dict[str, bytes] = {}
    for entry in re.split(r"[,\n]", text):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        kek_id, sep, encoded = entry.partition(":")
        if not sep:
            raise KekRingError(f"{origin}: an entry is not `id:base64key`")
        kek_id = kek_id.strip()
        try:
            kek = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KekRingError(f"{origin}: the key {kek_id!r} is not base64") from None
        if kek_id in keys:
            raise KekRingError(f"{origin}: the key id {kek_id!r} appears twice")
        keys[kek_id] = kek
    return keys


def load_ring(keys_file: Path | None, environ: Mapping[str, str] | None = None) -> KekRing:
    """The ring from `keys_file` when given, else from $LLMGW_ENCRYPTION_KEYS."""
    if keys_file is not None:
        try:
            text = keys_file.read_text(encoding="utf-8")
        except OSError as err:
            raise KekRingError(
                f"cannot read secrets.encryption_keys_file {keys_file}: {err.strerror}"
            ) from None
        return KekRing(parse_ring(text, origin=str(keys_file)))
    source = os.environ if environ is None else environ
    text = source.get(ENCRYPTION_KEYS_ENV, "")
    if not text.strip():
        raise KekRingError(
            f"no key-encryption key: set secrets.encryption_keys_file or ${ENCRYPTION_KEYS_ENV}"
        )
    return KekRing(parse_ring(text, origin=f"${ENCRYPTION_KEYS_ENV}"))


def new_kek_entry(kek_id: str) -> str:
    """A fresh `id:base64key` entry for the ring."""
    if not _KEK_ID.match(kek_id):
        raise KekRingError(f"invalid key-encryption key id {kek_id!r}")
    return f"{kek_id}:{base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode('ascii')}"
