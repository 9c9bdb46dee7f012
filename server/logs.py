"""Process-wide logging: text or JSON lines, a redaction filter, and one line per call.

`configure_logging` writes to stderr, JSON when stderr is not a terminal
(format `auto`), with `RedactionFilter` on the writing handler: whatever a
library logs (a header dump, an exception carrying a request), API keys,
bearer tokens and `authorization` values are replaced before any formatter
sees the record. The root logger's handler only queues a record; a thread
redacts, formats and writes it, so the event loop never waits on a full
pipe or a slow log shipper and never formats a line (bounded: past
QUEUE_RECORDS waiting, records are dropped and counted). The thread wakes
once per BATCH_S with what gathered, not once per record.
`log_call` is the CallRecord observer that writes the per-call line (logger
`llmgw.calls`): ids, model, status, tokens, cost, latency; never the key,
never prompt or completion text.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
from datetime import UTC, datetime

from opentelemetry import trace

from server.calls import CallRecord
from server.config import LoggingConfig

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
CALLS_LOGGER = "llmgw.calls"
REDACTED = "[REDACTED]"
# The provider SDKs' loggers and their HTTP stacks'. At DEBUG they write each
# request's options, body included (prompts, metadata.user_id), so they log at
# INFO at most unless `logging.loggers` names them.
SDK_LOGGERS = ("anthropic", "openai", "httpx", "httpx2", "httpcore", "httpcore2")
# Of those, the HTTP stacks write an INFO line for every upstream request,
# which the per-call line already says: WARNING at least unless named.
HTTP_STACK_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2")
# Records waiting for the writing thread; past this they are dropped (counted).
QUEUE_RECORDS = 10_000

# A value already replaced (a key keeps its id), up to where a value ends: a
# second pass, or a pattern after another, leaves it as it is.
_DONE = r"(?:llmgw_[0-9a-f]{12}_)?\[REDACTED\](?=[\s'\",;)\]}]|$)"
# A credential value: up to a quote, separator or closing bracket; a bracketed
# part ([...]) is taken whole, so no stray "]" is left after the replacement.
_VALUE = r"(?:\[[^\s\]]*\]|[^\s'\",;)\]}\[])+"
_SCHEME = r"(?:(?:bearer|basic)\s+)"

# Applied in order. A key keeps its public id (llmgw_<id>_...), which is no secret
# and says which key it was; everything secret-shaped is replaced whole.
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Gateway API keys, and anything else with their prefix.
    (re.compile(r"(llmgw_[0-9a-f]{12}_)[0-9A-Za-z]+"), r"\1" + REDACTED),
    (re.compile(r"llmgw_[0-9A-Za-z_-]{16,}"), REDACTED),
    # Provider keys: sk-..., sk-ant-..., sk-proj-...
    (re.compile(r"(?<![0-9A-Za-z])sk-[0-9A-Za-z_-]{8,}"), REDACTED),
    # JWTs (ours and any other): base64url JSON header, payload, optional signature.
    (re.compile(r"eyJ[0-9A-Za-z_-]{4,}\.[0-9A-Za-z_-]{4,}(?:\.[0-9A-Za-z_-]*)?"), REDACTED),
    # Whatever follows "Bearer" or "Basic".
    (re.compile(rf"(?i)\b(bearer|basic)(\s+)(?!{_DONE}){_VALUE}"), r"\1\2" + REDACTED),
    # The value of an authorization, x-api-key or api_key header, field or argument:
    # `authorization: x`, `"x-api-key": "x"`, `('authorization', 'x')`, `api_key=x`.
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization|x-api-key|api[_-]?key)(['\"]?\s*[:=,]\s*['\"]?)"
            rf"(?!{_SCHEME}?{_DONE}){_SCHEME}?{_VALUE}"
        ),
        r"\1\2" + REDACTED,
    ),
)
# Field names whose value is a credential whatever it looks like.
_CREDENTIAL_FIELD = re.compile(r"(?i)(?:proxy-)?authorization|x-api-key|api[_-]?key")


# What every pattern above needs somewhere in the text, lower-cased: a few
# substring searches rule most text out, far faster than any pattern would.
_SUSPECT_WORDS = ("llmgw_", "sk-", "eyj", "bearer", "basic", "authorization", "api")


def _suspect(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _SUSPECT_WORDS)


def redact(text: str) -> str:
    """`text` with API keys, tokens and authorization values replaced."""
    if not _suspect(text):
        return text
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


# Containers deeper than this are written as their redacted text.
_MAX_DEPTH = 6
_CONTAINERS = (dict, list, tuple)


def redact_value(value: object, depth: int = 0) -> object:
    """`value` with credentials replaced in its strings, at any depth of dicts, lists and tuples.

    The value of a field named like a credential (`authorization`,
    `x-api-key`, `api_key`), as a dict key or the first of a pair as in gRPC
    metadata, is replaced whatever it looks like. Containers are copied,
    never changed in place: they may still be the caller's.
    """
    if isinstance(value, str):
        return redact(value)
    if not isinstance(value, _CONTAINERS):
        return value
    if depth >= _MAX_DEPTH:
        return redact(repr(value))
    if isinstance(value, dict):
        return {
            redact_value(key, depth + 1): _credential(value[key])
            if isinstance(key, str) and _CREDENTIAL_FIELD.fullmatch(key)
            else redact_value(value[key], depth + 1)
            for key in value
        }
    items = [redact_value(item, depth + 1) for item in value]
    if len(value) == 2 and isinstance(value[0], str) and _CREDENTIAL_FIELD.fullmatch(value[0]):
        items[1] = _credential(value[1])  # ("authorization", "...") as in gRPC metadata
    return items if isinstance(value, list) else tuple(items)


def _credential(value: object) -> object:
    """The value of a credential field: a key's public id and the scheme are kept."""
    if not isinstance(value, str | bytes):
        return redact_value(value)
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    redacted = redact(text)
    scheme, _, rest = redacted.partition(" ")
    if rest and scheme.lower() in ("bearer", "basic"):
        return f"{scheme} {rest if re.fullmatch(_DONE, rest) else REDACTED}"
    return redacted if re.fullmatch(_DONE, redacted) else REDACTED


class RedactionFilter(logging.Filter):
    """Redacts a record in place: message, exception text, stack and extras.

    On a handler it sees every record that handler emits, whichever logger
    made it; the record is changed in place, so handlers after it see the
    redacted text too. The arguments are merged into the message first. The
    exception is kept (exc_info) for handlers that need it, but the text
    stdlib formatters print (exc_text) is the redacted one. Extras that are
    dicts, lists or tuples are replaced by redacted copies, at any depth.
    """

    _exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = message = record.getMessage()
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exceptions.formatException(record.exc_info)
        fields = record.__dict__
        extras = []
        for key in fields.keys() - _STANDARD_ATTRS:
            value = fields[key]
            if isinstance(value, str):
                extras.append(key)
            elif isinstance(value, _CONTAINERS):
                fields[key] = redact_value(value)
        texts = [message, record.exc_text or "", record.stack_info or ""]
        # One check over everything; the patterns run only on a record that may need them.
        if not _suspect("\n".join(texts + [fields[k] for k in extras])):
            return True
        record.msg = redact(message)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key in extras:
            fields[key] = redact(fields[key])
        return True


_JSON = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra=` fields become keys."""

    _second: tuple[int, str] = (-1, "")

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds; the text up to the second is made once a second."""
        second = int(created)
        cached, text = self._second
        if second != cached:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)
        return f"{text}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key[0] != "_":
                entry[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _JSON.encode(entry)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Puts a RedactionFilter on every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactionFilter) for f in handler.filters):
            handler.addFilter(RedactionFilter())


class _Enqueue(logging.handlers.QueueHandler):
    """Queues the record as it is: the writing thread is in this process (nothing
    is pickled), so redacting and formatting wait for it, off the event loop."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            note = logging.makeLogRecord(
                {
                    "name": __name__,
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "msg": "%d log records dropped: the log output could not keep up",
                    "args": (dropped,),
                }
            )
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(note)


# How long the writing thread lets records gather once one is queued: one
# wake-up per batch, not per record (a wake-up per record cost a lone call
# about 200 us of CPU on a busy core: bench/results/2026-12-03-vm-log-batches.md).
BATCH_S = 0.02


class _Records:
    """The records waiting for the writing thread (queue.Queue's put_nowait, for
    QueueHandler): appending takes no lock, and the thread is woken only when it is
    not already due to wake."""

    def __init__(self, limit: int) -> None:
        self.items: collections.deque[object] = collections.deque()
        self.limit = limit
        self.wake = threading.Event()

    def put_nowait(self, item: object) -> None:
        if len(self.items) >= self.limit:
            raise queue.Full
        self.items.append(item)
        if not self.wake.is_set():
            self.wake.set()


class _Writer:
    """The thread that writes queued records, and its handler."""

    _STOP = object()

    def __init__(self, handler: logging.Handler) -> None:
        self.records = _Records(QUEUE_RECORDS)
        self.handler = handler
        self.enqueue = _Enqueue(self.records)  # type: ignore[arg-type]
        self._hurry = threading.Event()  # a flush or a stop waits: no batching delay
        self.rounds = 0  # times the thread woke to write (read by tests)
        self._thread = threading.Thread(target=self._run, name="llmgw-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        records, wake = self.records.items, self.records.wake
        while True:
            wake.wait()
            self._hurry.wait(BATCH_S)
            # Cleared before the queue is read: a record queued from here on wakes
            # the next round, one queued before is written in this one.
            wake.clear()
            self._hurry.clear()
            self.rounds += 1
            while records:
                item = records.popleft()
                if isinstance(item, logging.LogRecord):
                    try:
                        self.handler.handle(item)
                    except Exception:
                        self.handler.handleError(item)
                elif isinstance(item, threading.Event):
                    item.set()  # a flush: what was queued before it is written
                elif item is self._STOP:
                    return

    def flush(self) -> None:
        """Returns once every record queued so far is written."""
        written = threading.Event()
        self._mark(written)
        written.wait()

    def stop(self) -> None:
        """Writes what is queued, then ends the thread."""
        self._mark(self._STOP)
        self._thread.join()

    def _mark(self, item: object) -> None:
        """Queues a marker (a flush's event, the stop) and wakes the thread at once."""
        self.records.items.append(item)
        self._hurry.set()
        self.records.wake.set()


_writer: _Writer | None = None


def stop_log_writer() -> None:
    """Writes what is queued and ends the writing thread (at exit, or to reconfigure)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


atexit.register(stop_log_writer)


def output_handler() -> logging.Handler | None:
    """The handler that writes the records configure_logging queues (None before it)."""
    return _writer.handler if _writer is not None else None


def flush_logs() -> None:
    """Returns once every record queued so far is written."""
    if _writer is not None:
        _writer.flush()


def configure_logging(config: LoggingConfig) -> None:
    global _writer
    handler = logging.StreamHandler(sys.stderr)
    json_lines = config.format == "json" or (
        config.format == "auto" and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    )
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactionFilter())
    stop_log_writer()
    _writer = _Writer(handler)
    root = logging.getLogger()
    root.handlers[:] = [_writer.enqueue]
    root.setLevel(config.level)
    for name in SDK_LOGGERS:
        if name not in config.loggers:
            floor = logging.WARNING if name in HTTP_STACK_LOGGERS else logging.INFO
            logging.getLogger(name).setLevel(max(root.level, floor))
    for name, level in config.loggers.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger(CALLS_LOGGER).disabled = not config.calls
    # Neither format prints the caller's file and line, thread or process, which
    # the logging module would otherwise look up for every record (the caller by
    # walking the stack): the settings the Logging HOWTO lists under
    # "Optimization". The per-call line: 39 -> 33 us.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


# -- the per-call line -----------------------------------------------------------

_calls_log = logging.getLogger(CALLS_LOGGER)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def call_fields(record: CallRecord) -> dict[str, object]:
    """The per-call line's fields (the JSON keys), from the call's record."""
    span_context = trace.get_current_span().get_span_context()
    usage = record.usage
    return {
        "request_id": record.request_id,
        # Set when the call is traced (the line is written inside its span).
        "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else "",
        "key_id": record.key_id,
        "method": record.method,
        "edge": record.edge,
        "model": record.model_requested,
        "model_served": record.model_served,
        "provider": record.provider,
        "status": record.status.name,
        "error_reason": record.error_reason,
        "stop_reason": record.stop_reason.value if record.stop_reason is not None else "",
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cost_nanos": record.cost.total_nanos,
        "latency_ms": _ms(record.latency_s),
        "ttft_ms": _ms(record.time_to_first_token_s),
    }


def log_call(record: CallRecord) -> None:
    """CallRecord observer: one INFO line per generation call."""
    if not _calls_log.isEnabledFor(logging.INFO):
        return
    fields = call_fields(record)
    served = f"{record.provider}/{record.model_served}" if record.provider else "-"
    _calls_log.info(
        "%s %s -> %s %s in %s ms (ttft %s ms), %d+%d tokens, %d nano-USD, request_id=%s",
        record.method,
        record.model_requested,
        served,
        record.status.name,
        fields["latency_ms"],
        fields["ttft_ms"],
        record.usage.input_tokens,
        record.usage.output_tokens,
        record.cost.total_nanos,
        record.request_id,
        extra=fields,
    )
