"""The KeyService servicer: API keys managed over gRPC, for callers with the `admin` scope.

The auth interceptor has checked the credentials and the scope before any
method runs (KeyService is not in its scope map, so it needs `admin`: no key
is UNAUTHENTICATED, a key without the scope PERMISSION_DENIED). Each method
decodes its request, hands the work to key_admin.py, the code the command
line runs too (the same defaults, checks and audit events), and encodes the
record: never a hash, and a secret only from CreateKey and RotateKey. The
store is SQLite or PostgreSQL, blocking, so it is called in a thread.

An admin may create keys with the `admin` scope, and widen a key to it: it
holds that power already. Every change is audited with `actor_key_id`, the
admin key that asked, and the caller's `peer`. Revocations, rotations and
updates drop the key from this process's cache at once and are published
to the other gateways (revocation.py) when they share a Redis.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from llmgateway.v1 import keys_pb2 as pb
from llmgateway.v1 import keys_pb2_grpc as pb_grpc
from server.auth import GatewayAuth
from server.auth.key_admin import (
    DEFAULT_GRACE_S,
    KeyFieldError,
    checked_lifetime,
    create_key,
    rotate_key,
    update_key,
)
from server.auth.key_store_backend import KeyStoreError, KeyStoreUnavailableError
from server.auth.keys import DEFAULT_TTL, DefaultTtl, KeyRecord
from server.auth.revocation import KeyChange, KeyChangeFeed
from server.config import AuthConfig
from server.errors import (
    AuthDisabledError,
    FieldViolation,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
)
from server.grpc_edge.pages import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from server.grpc_edge.servicer import error_boundary
from server.identity import ALL_MODELS, SCOPE_GENERATE, KeyLimits, current_identity
from server.telemetry.audit import audit_fields, peer_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
LimitField = Literal["requests_per_minute", "tokens_per_minute", "budget_nanos"]
_LIMIT_FIELDS: tuple[LimitField, ...] = ("requests_per_minute", "tokens_per_minute", "budget_nanos")
_LIMIT_PATHS: dict[str, LimitField] = {f"limits.{name}": name for name in _LIMIT_FIELDS}
_TOKEN_VERSION = "k1"


class KeyNotFoundError(GatewayError):
    """No key has this id."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "KEY_NOT_FOUND"

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with id {key_id!r}", metadata={"key_id": key_id})


class KeyRevokedError(GatewayError):
    """The key is revoked: it can be read, not changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "KEY_REVOKED"

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"key {key_id!r} is revoked; create a new key instead", metadata={"key_id": key_id}
        )


# -- encoding ----------------------------------------------------------------------


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def encode_key(record: KeyRecord, now: float) -> pb.ApiKey:
    """The record as the API shows it: everything but the secret's hashes."""
    if record.revoked:
        state = pb.API_KEY_STATE_REVOKED
    elif record.expired(now):
        state = pb.API_KEY_STATE_EXPIRED
    else:
        state = pb.API_KEY_STATE_ACTIVE
    limits = record.limits
    key = pb.ApiKey(
        id=record.id,
        name=record.name,
        scopes=sorted(record.scopes),
        models=list(record.models),
        limits=pb.ApiKeyLimits(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            budget_nanos=limits.budget_nanos,
        ),
        state=state,
        create_time=_timestamp(record.created_at),
    )
    if record.expires_at is not None:
        key.expire_time.CopyFrom(_timestamp(record.expires_at))
    if record.revoked_at is not None:
        key.revoke_time.CopyFrom(_timestamp(record.revoked_at))
    if record.rotated_at is not None:
        key.rotate_time.CopyFrom(_timestamp(record.rotated_at))
    if record.previous_valid_until is not None and record.in_grace(now):
        key.previous_secret_expire_time.CopyFrom(_timestamp(record.previous_valid_until))
    return key


# -- decoding ----------------------------------------------------------------------


def _key_id(value: str, field: str = "key_id") -> str:
    if not value:
        raise InvalidArgumentError([FieldViolation(field, "required: the key's id")])
    if not _KEY_ID.match(value):
        raise InvalidArgumentError(
            [FieldViolation(field, "not a key id (12 hex digits, as ListKeys shows)")]
        )
    return value


def _seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.ToNanoseconds()) / 1e9


def _lifetime(
    config: AuthConfig, has_lifetime: bool, lifetime: duration_pb2.Duration, never: bool
) -> float | DefaultTtl | None:
    if never and has_lifetime:
        raise InvalidArgumentError(
            [FieldViolation("never_expires", "give lifetime or never_expires, not both")]
        )
    if never:
        try:
            return checked_lifetime(config, None, field="never_expires")
        except KeyFieldError as err:
            raise InvalidArgumentError([FieldViolation(err.field, err.message)]) from None
    return _seconds(lifetime) if has_lifetime else DEFAULT_TTL


def _limits(message: pb.ApiKeyLimits) -> KeyLimits:
    values = {
        name: getattr(message, name) if message.HasField(name) else None for name in _LIMIT_FIELDS
    }
    return KeyLimits(**values)


def _changes(request: pb.UpdateKeyRequest, current: KeyRecord) -> dict[str, Any]:
    """What the update mask asks to change, as key_admin.update_key takes it."""
    paths = list(request.update_mask.paths)
    if not paths:
        raise InvalidArgumentError(
            [FieldViolation("update_mask", "required: name the fields to change")]
        )
    key = request.key
    changes: dict[str, Any] = {}
    limits = current.limits
    violations = []
    for path in paths:
        if path == "name":
            changes["name"] = key.name
        elif path == "scopes":
            changes["scopes"] = list(key.scopes)
        elif path == "models":
            changes["models"] = list(key.models)
        elif path == "limits":
            limits = _limits(key.limits)
            changes["limits"] = limits
        elif path in _LIMIT_PATHS:
            name = _LIMIT_PATHS[path]
            value = getattr(key.limits, name) if key.limits.HasField(name) else None
            limits = KeyLimits(**{**{n: getattr(limits, n) for n in _LIMIT_FIELDS}, name: value})
            changes["limits"] = limits
        elif path == "expire_time":
            changes["expires_at"] = (
                _seconds_of(key.expire_time) if key.HasField("expire_time") else None
            )
        else:
            violations.append(
                FieldViolation(
                    "update_mask",
                    f"{path!r} cannot be changed; these can: name, scopes, models, limits,"
                    " limits.requests_per_minute, limits.tokens_per_minute,"
                    " limits.budget_nanos, expire_time",
                )
            )
    if violations:
        raise InvalidArgumentError(violations)
    return changes


def _seconds_of(stamp: timestamp_pb2.Timestamp) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


# -- page tokens: they name the last key listed, so keys created between two
# pages neither repeat nor go missing (the list is ordered by creation).


def _page_token(record: KeyRecord, show_revoked: bool) -> str:
    raw = f"{_TOKEN_VERSION}:{record.created_at!r}:{record.id}:{int(show_revoked)}"
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def _after(token: str, show_revoked: bool) -> tuple[float, str]:
    """The (created_at, id) a token names; INVALID_ARGUMENT for anything else."""
    fields: list[str] = []
    if len(token) <= 128:
        try:
            padded = token + "=" * (-len(token) % 4)
            fields = base64.b64decode(padded, altchars=b"-_", validate=True).decode().split(":")
        except (binascii.Error, UnicodeDecodeError):
            fields = []
    try:
        version, created, key_id, revoked = fields
        after = (float(created), _key_id(key_id))
        if version != _TOKEN_VERSION:
            raise ValueError(version)
    except (ValueError, InvalidArgumentError):
        raise InvalidArgumentError(
            [FieldViolation("page_token", "not a page token of this list; pass one as received")]
        ) from None
    if revoked != str(int(show_revoked)):
        raise InvalidArgumentError(
            [
                FieldViolation(
                    "page_token",
                    "was returned for a call with another show_revoked: repeat the first"
                    " call's show_revoked, or start again without a token",
                )
            ]
        )
    return after


# -- the servicer --------------------------------------------------------------------


@asynccontextmanager
async def serving(context: Context) -> AsyncIterator[None]:
    """error_boundary, with the key store's failures as statuses: UNAVAILABLE
    when it cannot be reached (retry), INTERNAL otherwise (logged here; the
    message names the store, never a password)."""
    async with error_boundary(context):
        try:
            yield
        except KeyStoreUnavailableError as err:
            log.warning("KeyService: %s", err)
            raise UnavailableError("the key store cannot be reached now; retry later") from None
        except KeyStoreError as err:
            log.error("KeyService: %s", err)
            raise InternalError("the key store failed; see the gateway's log") from None


class KeyServicer(pb_grpc.KeyServiceServicer):
    """Serves llmgateway.v1.KeyService over the gateway's key store.

    `auth` is None when authentication is off (every method then answers
    FAILED_PRECONDITION); `feed` publishes changes to the other gateways
    (None: no shared Redis, they see changes within auth.cache_ttl_s).
    """

    def __init__(
        self,
        auth: GatewayAuth | None,
        feed: KeyChangeFeed | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._feed = feed
        self._clock = clock

    def _gateway_auth(self) -> GatewayAuth:
        if self._auth is None:
            raise AuthDisabledError(
                "no key is checked (auth.enabled: false), so none is managed here"
            )
        return self._auth

    @contextmanager
    def _acting(self, context: Context, field_prefix: str = "") -> Iterator[None]:
        """Audits what runs inside as done by the calling admin key, and turns
        key_admin's KeyFieldError into INVALID_ARGUMENT naming the field."""
        identity = current_identity()
        try:
            with audit_fields(
                actor_key_id=identity.key_id if identity else "",
                peer=peer_of(context),
                via=SERVICE_NAME,
            ):
                yield
        except KeyFieldError as err:
            raise InvalidArgumentError(
                [FieldViolation(field_prefix + err.field, err.message)]
            ) from None

    async def _record(self, key_id: str) -> KeyRecord:
        """The key's record; NOT_FOUND only when the store says it has no such key
        (one it cannot reach raises KeyStoreUnavailableError: UNAVAILABLE)."""
        record = await asyncio.to_thread(self._gateway_auth().store.lookup, key_id)
        if record is None:
            raise KeyNotFoundError(key_id)
        return record

    async def _announce(self, key_id: str, change: KeyChange) -> None:
        if self._feed is not None:
            await self._feed.publish(key_id, change)

    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: Context
    ) -> pb.CreateKeyResponse:
        async with serving(context):
            auth = self._gateway_auth()
            lifetime = _lifetime(
                auth.config, request.HasField("lifetime"), request.lifetime, request.never_expires
            )
            with self._acting(context):
                record, secret = await asyncio.to_thread(
                    create_key,
                    auth.config,
                    name=request.name,
                    scopes=list(request.scopes) or [SCOPE_GENERATE],
                    models=list(request.models) or ALL_MODELS,
                    limits=_limits(request.limits),
                    expires_in_s=lifetime,
                    store=auth.store,
                )
            return pb.CreateKeyResponse(key=encode_key(record, self._clock()), secret=secret)
        return pb.CreateKeyResponse()  # error_boundary has set the failure's status

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        async with serving(context):
            store = self._gateway_auth().store
            if request.page_size < 0:
                raise InvalidArgumentError(
                    [FieldViolation("page_size", f"must not be negative (got {request.page_size})")]
                )
            size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            records = await asyncio.to_thread(store.list)
            listed = sorted(
                (r for r in records if request.show_revoked or not r.revoked),
                key=lambda r: (r.created_at, r.id),
            )
            if request.page_token:
                after = _after(request.page_token, request.show_revoked)
                listed = [r for r in listed if (r.created_at, r.id) > after]
            page = listed[:size]
            now = self._clock()
            return pb.ListKeysResponse(
                keys=[encode_key(record, now) for record in page],
                next_page_token=(
                    _page_token(page[-1], request.show_revoked) if len(listed) > size else ""
                ),
            )
        return pb.ListKeysResponse()  # error_boundary has set the failure's status

    async def GetKey(self, request: pb.GetKeyRequest, context: Context) -> pb.GetKeyResponse:
        async with serving(context):
            record = await self._record(_key_id(request.key_id))
            return pb.GetKeyResponse(key=encode_key(record, self._clock()))
        return pb.GetKeyResponse()  # error_boundary has set the failure's status

    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: Context
    ) -> pb.RotateKeyResponse:
        async with serving(context):
            auth = self._gateway_auth()
            key_id = _key_id(request.key_id)
            lifetime = _lifetime(
                auth.config, request.HasField("lifetime"), request.lifetime, request.never_expires
            )
            grace = (
                _seconds(request.grace_period)
                if request.HasField("grace_period")
                else DEFAULT_GRACE_S
            )
            if (await self._record(key_id)).revoked:
                raise KeyRevokedError(key_id)
            with self._acting(context):
                rotated = await asyncio.to_thread(
                    rotate_key,
                    auth.config,
                    key_id,
                    grace_s=grace,
                    expires_in_s=lifetime,
                    store=auth.store,
                )
            if rotated is None:  # revoked meanwhile
                raise KeyRevokedError(key_id)
            record, secret = rotated
            await self._announce(key_id, "rotated")
            return pb.RotateKeyResponse(key=encode_key(record, self._clock()), secret=secret)
        return pb.RotateKeyResponse()  # error_boundary has set the failure's status

    async def UpdateKey(
        self, request: pb.UpdateKeyRequest, context: Context
    ) -> pb.UpdateKeyResponse:
        async with serving(context):
            auth = self._gateway_auth()
            key_id = _key_id(request.key.id, "key.id")
            current = await self._record(key_id)
            if current.revoked:
                raise KeyRevokedError(key_id)
            changes = _changes(request, current)
            with self._acting(context, "key."):
                record = await asyncio.to_thread(
                    lambda: update_key(
                        auth.config, key_id, now=self._clock(), store=auth.store, **changes
                    )
                )
            if record is None:  # revoked meanwhile
                raise KeyRevokedError(key_id)
            await self._announce(key_id, "updated")
            return pb.UpdateKeyResponse(key=encode_key(record, self._clock()))
        return pb.UpdateKeyResponse()  # error_boundary has set the failure's status

    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: Context
    ) -> pb.RevokeKeyResponse:
        async with serving(context):
            store = self._gateway_auth().store
            key_id = _key_id(request.key_id)
            record = await self._record(key_id)
            if not record.revoked:
                with self._acting(context):
                    await store.revoke_async(key_id)
                await self._announce(key_id, "revoked")
                record = await self._record(key_id)
            return pb.RevokeKeyResponse(key=encode_key(record, self._clock()))
        return pb.RevokeKeyResponse()  # error_boundary has set the failure's status
