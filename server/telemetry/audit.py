"""The audit trail: security-relevant events, appended as JSON lines to their own file.

Who did what to credentials and who was refused: keys created and revoked,
tokens issued, authentication failures (with the peer address), permission
denials, signing keys appearing or going, and budget alerts. Never a
credential, never prompt or completion content: fields are ids, names,
scopes, methods and addresses, and string fields pass through the log
redaction anyway.

The sink is process-wide, like logging: `python -m server` and `python -m
server keys ...` both open it from `audit.path` (server/__main__.py), so
keys made on the command line are audited next to the server's events.
Each event is one `write()` on a file opened with O_APPEND, so several
processes may append to one file without interleaving lines. With no path
configured, `audit_event` does nothing.

Events (the `event` field): key.created, key.revoked, key.rotated,
key.updated (the names of the fields changed, never their secrets),
key.expiring (a key within 14 days of its expiry, at most once a day per
process), token.issued, auth.failed, permission.denied, provider_key.set,
provider_keys.reencrypted (`keys provider rotate-kek`),
signing_key.created, signing_keys.changed
(keys appearing or going in the signing-keys folder, read at start-up and
every 10 s: the one configuration the gateway re-reads), budget.alert (for the
budgets code: call `audit_event("budget.alert", key_id=..., ...)`).
guardrail.blocked and guardrail.masked (server/guardrails/: a request or an
answer refused, or masked or redacted, by the PII guardrail: stage, action,
entity types with counts, field paths, key id and request id; never values).
Config reloads: the gateway has none yet (configuration is read once at
start-up); when one exists it should emit `config.reloaded`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

import grpc

from server.calls import CallRecord
from server.config import AuditConfig
from server.logs import redact

log = logging.getLogger(__name__)

AuditValue = str | int | float | bool | None | list[str]

KEY_CREATED = "key.created"
KEY_REVOKED = "key.revoked"
KEY_ROTATED = "key.rotated"
KEY_UPDATED = "key.updated"
KEY_EXPIRING = "key.expiring"
PROVIDER_KEY_SET = "provider_key.set"
PROVIDER_KEYS_REENCRYPTED = "provider_keys.reencrypted"
KEY_STORE_COPIED = "key_store.copied"
TOKEN_ISSUED = "token.issued"
AUTH_FAILED = "auth.failed"
PERMISSION_DENIED = "permission.denied"
SIGNING_KEY_CREATED = "signing_key.created"
SIGNING_KEYS_CHANGED = "signing_keys.changed"
BUDGET_ALERT = "budget.alert"
CONFIG_RELOADED = "config.reloaded"
GUARDRAIL_BLOCKED = "guardrail.blocked"
GUARDRAIL_MASKED = "guardrail.masked"


class AuditSink:
    """An append-only JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def write(self, event: str, fields: dict[str, AuditValue]) -> None:
        entry: dict[str, AuditValue] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        for key, value in fields.items():
            if isinstance(value, str):
                value = redact(value)
            elif isinstance(value, list):
                value = [redact(v) for v in value]
            entry[key] = value
        line = (json.dumps(entry, sort_keys=False) + "\n").encode()
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


_sink: AuditSink | None = None


def configure_audit(config: AuditConfig) -> AuditSink | None:
    """Opens the process's audit sink (closing a previous one); None when audit is off."""
    global _sink
    if _sink is not None:
        _sink.close()
    _sink = AuditSink(config.path) if config.path is not None else None
    return _sink


def ensure_audit(config: AuditConfig) -> AuditSink | None:
    """Opens the sink unless the configured one is open already; returns it if it opened it.

    For gateways made without server/__main__.py (worker processes, tests).
    """
    if config.path is None or (_sink is not None and _sink.path == config.path):
        return None
    return configure_audit(config)


def close_audit(sink: AuditSink | None = None) -> None:
    """Closes the process's sink (only if it is `sink`, when given)."""
    global _sink
    if _sink is not None and (sink is None or sink is _sink):
        _sink.close()
        _sink = None


def audit_enabled() -> bool:
    return _sink is not None


# Fields added to every event written while they are bound (audit_fields).
_BOUND: ContextVar[dict[str, AuditValue] | None] = ContextVar(
    "llmgateway_audit_fields", default=None
)


@contextmanager
def audit_fields(**fields: AuditValue) -> Iterator[None]:
    """Adds `fields` to every event written in this context (threads started with
    asyncio.to_thread included): who asked for a change the code below records,
    e.g. the admin key behind a KeyService call. An event's own fields win."""
    token = _BOUND.set({**(_BOUND.get() or {}), **fields})
    try:
        yield
    finally:
        _BOUND.reset(token)


def audit_event(event: str, **fields: AuditValue) -> None:
    """Appends one event; never raises (a failed write is logged, the caller goes on)."""
    sink = _sink
    if sink is None:
        return
    bound = _BOUND.get()
    try:
        sink.write(event, {**bound, **fields} if bound else fields)
    except Exception as err:
        log.error("cannot write audit event %s to %s: %s", event, sink.path, err)


def peer_of(context: grpc.aio.ServicerContext[object, object]) -> str:
    """The caller's address as grpc names it (ipv4:1.2.3.4:5678), or ""."""
    try:
        return str(context.peer() or "")
    except Exception:
        return ""


def audit_call(record: CallRecord) -> None:
    """CallRecord observer: a generation refused for the model its key may not use."""
    if record.status is grpc.StatusCode.PERMISSION_DENIED and _sink is not None:
        audit_event(
            PERMISSION_DENIED,
            key_id=record.key_id,
            method=record.method,
            model=record.model_requested,
            reason=record.error_reason,
            request_id=record.request_id,
        )
