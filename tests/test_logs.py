"""Structured logs: the per-call JSON line, the redaction filter, and no secret anywhere.

The last test sends an API key and a token through every path (success,
token issue, auth failure, permission denial, upstream error, a library
logging headers and an exception) and checks that neither, nor the
upstream keys, appears in the logs, the spans or the audit trail.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

import server.logs as logs
from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import token_pb2, token_pb2_grpc
from server.auth.cli import create_key
from server.config import LoggingConfig
from server.logs import (
    CALLS_LOGGER,
    HTTP_STACK_LOGGERS,
    QUEUE_RECORDS,
    REDACTED,
    SDK_LOGGERS,
    JsonFormatter,
    RedactionFilter,
    configure_logging,
    flush_logs,
    install_redaction,
    output_handler,
    redact,
    stop_log_writer,
)
from tests.conftest import RunningGateway, request
from tests.fake_upstream import FakeUpstream, Reply
from tests.test_auth import bearer
from tests.test_tracing import (
    all_span_text,
    in_memory_provider,
    start_traced_gateway,
    upstream_overrides,
)
from tests.upstream_fixtures import ANTHROPIC_KEY, OPENAI_KEY, ask, generate, stream_all

API_KEY = "llmgw_0123456789ab_" + "5f" * 24
KEY_ID_KEPT = f"llmgw_0123456789ab_{REDACTED}"
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIwMTIzNDU2Nzg5YWIifQ.c2lnbmF0dXJlLWJ5dGVz"
CALL_FIELDS = {
    "request_id",
    "trace_id",
    "key_id",
    "model",
    "provider",
    "status",
    "input_tokens",
    "output_tokens",
    "cost_nanos",
    "latency_ms",
    "ttft_ms",
}


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the JSON handler configure_logging installs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    # A library that logs what it should not. Not propagated to the root: the
    # suite's own leak detector (tests/conftest.py) would rightly flag it.
    chatty = logging.getLogger("chatty.library")
    chatty.propagate = False
    chatty.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    chatty.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


@pytest.mark.parametrize(
    "text",
    [
        f"key {API_KEY} in a sentence",
        "openai key sk-proj-AbCdEf0123456789xyz leaked",
        f"token {JWT}",
        f"headers {{'authorization': 'Bearer {JWT}'}}",
        "metadata (('authorization', 'Bearer opaque-token-value'),)",
        'curl -H "Authorization: Basic dXNlcjpwYXNzd29yZA=="',
        "x-api-key: plain-secret-value",
        "api_key=plain-secret-value other=1",
        # Upper case: the quick check that rules text out must not rule these out.
        "X-API-KEY: plain-secret-value",
        "PROXY-AUTHORIZATION: BEARER opaque-token-value",
    ],
)
def test_redaction_removes_every_credential_shape(text: str) -> None:
    redacted = redact(text)
    assert REDACTED in redacted
    for secret in (API_KEY, "sk-proj-AbCdEf0123456789xyz", JWT, "opaque-token-value"):
        assert secret not in redacted
    assert "dXNlcjpwYXNzd29yZA" not in redacted and "plain-secret-value" not in redacted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Bearer {API_KEY}", f"Bearer {KEY_ID_KEPT}"),
        (
            f"authorization: Bearer {API_KEY}",
            f"authorization: Bearer llmgw_0123456789ab_{REDACTED}",
        ),
        (f"api_key={API_KEY}", f"api_key={KEY_ID_KEPT}"),
        ("Bearer [opaque-token]", f"Bearer {REDACTED}"),
        ("authorization=Bearer [opaque]", f"authorization=Bearer {REDACTED}"),
        ("[Bearer opaque-token]", f"[Bearer {REDACTED}]"),
        (f"Authorization: Bearer {JWT}", f"Authorization: Bearer {REDACTED}"),
    ],
)
def test_redaction_leaves_no_stray_bracket_and_is_stable(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # a second filter changes nothing


def test_the_filter_redacts_inside_dict_and_list_extras(json_lines: io.StringIO) -> None:
    headers = {"authorization": f"Bearer {JWT}", "x-api-key": "plain-secret-value", "n": 1}
    metadata = [("authorization", "opaque-token-value"), ("x-request-id", "r-1")]
    nested = {"request": {"headers": headers, "metadata": metadata, "keys": (API_KEY, 2)}}
    logging.getLogger("chatty.library").warning(
        "call", extra={"headers": headers, "metadata": metadata, "nested": nested}
    )
    text = json_lines.getvalue()
    for secret in (JWT, "plain-secret-value", "opaque-token-value", API_KEY):
        assert secret not in text
    (line,) = parsed(json_lines)
    assert line["headers"] == {"authorization": f"Bearer {REDACTED}", "x-api-key": REDACTED, "n": 1}
    assert line["metadata"] == [["authorization", REDACTED], ["x-request-id", "r-1"]]
    request = line["nested"]["request"]  # type: ignore[index]
    assert request["keys"] == [f"llmgw_0123456789ab_{REDACTED}", 2]
    assert request["headers"]["x-api-key"] == REDACTED
    # The caller's own objects are left as they were.
    assert headers["x-api-key"] == "plain-secret-value" and metadata[0][1] == "opaque-token-value"


def test_the_filter_redacts_inside_dict_and_list_arguments(json_lines: io.StringIO) -> None:
    library = logging.getLogger("chatty.library")
    library.warning("headers %s", [("x-api-key", "plain-secret-value")])
    library.warning("%(headers)s", {"headers": {"nested": {"authorization": "Basic dXNlcg=="}}})
    text = json_lines.getvalue()
    assert "plain-secret-value" not in text and "dXNlcg" not in text
    assert REDACTED in text and "]]" not in text


def test_json_time_is_utc_iso_8601_with_milliseconds() -> None:
    formatter = JsonFormatter()
    for created in (1_790_000_000.0, 1_790_000_000.999, 1_790_000_001.5, 1_790_000_000.25):
        record = logging.makeLogRecord({"msg": "m", "created": created})
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(record))["time"] == expected


def test_redaction_keeps_the_key_id_and_ordinary_text() -> None:
    assert redact(f"revoked {API_KEY}") == f"revoked llmgw_0123456789ab_{REDACTED}"
    ordinary = "task-1 ran on model claude-sonnet with 12 tokens; see llmgw.calls"
    assert redact(ordinary) == ordinary


def test_the_filter_redacts_arguments_exceptions_and_extras(json_lines: io.StringIO) -> None:
    library = logging.getLogger("chatty.library")
    library.warning("sending %s", {"authorization": f"Bearer {JWT}", "x-api-key": API_KEY})
    try:
        raise ValueError(f"bad credential {API_KEY}")
    except ValueError:
        library.exception("request failed")
    library.warning("with extra", extra={"header": f"Bearer {JWT}"})
    text = json_lines.getvalue()
    assert API_KEY not in text and JWT not in text
    lines = parsed(json_lines)
    assert "ValueError" in str(lines[1]["exception"])
    assert lines[2]["header"] == f"Bearer {REDACTED}"


def test_configure_logging_formats_and_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in SDK_LOGGERS}
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: auto is JSON
        configure_logging(LoggingConfig(level="WARNING", loggers={"httpx": "ERROR"}))
        (queued,) = root.handlers
        assert isinstance(queued, logging.handlers.QueueHandler)
        handler = output_handler()
        assert handler is not None and isinstance(handler.formatter, JsonFormatter)
        assert any(isinstance(f, RedactionFilter) for f in handler.filters)
        assert root.level == logging.WARNING
        assert logging.getLogger("httpx").level == logging.ERROR
        logging.getLogger("x").warning("key %s", API_KEY)
        flush_logs()
        line = json.loads(sys.stderr.getvalue())
        assert line["level"] == "WARNING" and API_KEY not in line["message"]
        configure_logging(LoggingConfig(format="text"))
        text_handler = output_handler()
        assert text_handler is not None and not isinstance(text_handler.formatter, JsonFormatter)
    finally:
        stop_log_writer()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in levels.items():  # as the suite had them (tests/conftest.py)
            logging.getLogger(name).setLevel(level)
    install_redaction()  # idempotent on the restored handlers
    for handler in root.handlers:
        assert sum(isinstance(f, RedactionFilter) for f in handler.filters) <= 1
        handler.filters = [f for f in handler.filters if not isinstance(f, RedactionFilter)]


async def test_one_json_line_per_call_with_the_fields(
    running: RunningGateway, json_lines: io.StringIO
) -> None:
    response = await running.stub.Generate(request("count my tokens please"))
    lines = [line for line in parsed(json_lines) if line["logger"] == CALLS_LOGGER]
    (line,) = [line for line in lines if line["request_id"] == response.request_id]
    assert line.keys() >= CALL_FIELDS
    assert line["status"] == "OK" and line["provider"] == "offline" and line["model"] == "echo"
    assert line["input_tokens"] == response.usage.input_tokens
    assert line["output_tokens"] == response.usage.output_tokens
    assert isinstance(line["latency_ms"], float) and isinstance(line["ttft_ms"], float)
    assert line["trace_id"] == ""  # the session's gateway is not traced
    assert "count my tokens" not in json_lines.getvalue()  # no prompt text


@pytest.mark.usefixtures("_openai_key_in_environment")
async def test_no_key_or_token_anywhere_on_any_path(
    tmp_path: Path, fake: FakeUpstream, json_lines: io.StringIO
) -> None:
    provider, exporter = in_memory_provider()
    audit_path = tmp_path / "audit.jsonl"
    overrides = upstream_overrides(
        fake,
        **{
            "auth.enabled": True,
            "auth.key_store": str(tmp_path / "keys.sqlite3"),
            "auth.secret_file": str(tmp_path / "key-secret"),
            "auth.signing_keys_dir": str(tmp_path / "signing-keys"),
            "audit.path": str(audit_path),
        },
    )
    gw = await start_traced_gateway(overrides, provider)
    config = gw.gateway.config
    try:
        _, key = create_key(config.auth, name="svc")
        _, gpt_only = create_key(config.auth, name="gpt-only", models=("gpt-*",))
        tokens = token_pb2_grpc.TokenServiceStub(gw.channel)
        # Success with the key, then with a token traded for it.
        await gw.stub.Generate(ask("claude-test", "Hi"), metadata=bearer(key))
        issued = await tokens.IssueToken(token_pb2.IssueTokenRequest(), metadata=bearer(key))
        token = issued.token
        stream = gw.stub.StreamGenerate(ask("gpt-test", "Hi"), metadata=bearer(token))
        assert [event async for event in stream]
        # Auth failures: a wrong key, a damaged token, the key in the wrong header.
        refused = [
            bearer(key[:-6] + "000000"),
            bearer(token[:-6] + "AAAAAA"),
            (("authorization", key),),
        ]
        for metadata in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Generate(ask("claude-test", "Hi"), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A permission denial, and a token trying to renew itself.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Generate(ask("claude-test", "Hi"), metadata=bearer(gpt_only))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError):
            await tokens.IssueToken(token_pb2.IssueTokenRequest(), metadata=bearer(token))
        # Upstream errors, with the key and with the token.
        for credential in (key, token):
            fake.enqueue(Reply(status=503), Reply(status=503), Reply(status=401))
            with pytest.raises(grpc.aio.AioRpcError):
                await gw.stub.Generate(ask("claude-test", "Hi"), metadata=bearer(credential))
        chatty = logging.getLogger("chatty.library")
        chatty.warning("outgoing headers: %s", [("authorization", f"Bearer {token}")])
        try:
            raise RuntimeError(f"could not use {key}")
        except RuntimeError:
            chatty.exception("failed")
    finally:
        await gw.aclose()

    logs = json_lines.getvalue()
    spans = all_span_text(exporter.get_finished_spans())
    audit = audit_path.read_text()
    secrets = {"key": key, "gpt-only key": gpt_only, "token": token}
    secrets |= {"anthropic key": ANTHROPIC_KEY, "openai key": OPENAI_KEY}
    for where, text in (("logs", logs), ("spans", spans), ("audit", audit)):
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {where}"
            # Not even the secret half of a key, or a token's signature.
            assert secret[-24:] not in text, f"part of {what} in {where}"
    # The paths really ran: call lines, spans and audit events are there.
    calls = [line for line in parsed(json_lines) if line["logger"] == CALLS_LOGGER]
    assert {line["status"] for line in calls} >= {"OK", "PERMISSION_DENIED"}
    assert any(str(line["error_reason"]).startswith("UPSTREAM_") for line in calls)
    assert all(line["trace_id"] for line in calls)
    assert "gen_ai.usage.output_tokens" in spans
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert events.count("auth.failed") == 3 and "token.issued" in events


@pytest.fixture
def configured() -> Iterator[Callable[[LoggingConfig], io.StringIO]]:
    """configure_logging with its handler writing to a buffer; the suite's logging restored."""
    root = logging.getLogger()
    names = (*SDK_LOGGERS, "grpc")
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in names}

    def configure(config: LoggingConfig) -> io.StringIO:
        configure_logging(config)
        stream = io.StringIO()
        handler = output_handler()
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        return stream

    yield configure
    stop_log_writer()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("model", ["claude-test", "gpt-test"])
async def test_debug_level_logs_no_prompt_or_end_user_id(
    upstream_gateway: RunningGateway,
    configured: Callable[[LoggingConfig], io.StringIO],
    model: str,
) -> None:
    prompt, end_user = "Zanzibar-quokka-prompt-7731", "end-user-Vq93-distinctive"
    logged = configured(LoggingConfig(level="DEBUG", format="json"))
    logging.getLogger("grpc").setLevel(logging.INFO)  # as the suite has it (tests/conftest.py)
    req = ask(model, prompt, metadata=pb.CallerMetadata(end_user_id=end_user))
    response, _ = await generate(upstream_gateway.stub, req)
    events, _ = await stream_all(upstream_gateway.stub, req)
    assert response.content and events[-1].HasField("message_stop")
    logging.getLogger("server.test").debug("debug is on")
    flush_logs()
    text = logged.getvalue()
    # DEBUG lines are written, and the calls were logged...
    assert "debug is on" in text and CALLS_LOGGER in text
    # ...but not what the SDKs dump at DEBUG.
    assert prompt not in text
    assert end_user not in text


def test_sdk_loggers_follow_the_root_above_info_and_obey_explicit_levels(
    configured: Callable[[LoggingConfig], io.StringIO],
) -> None:
    configured(LoggingConfig(level="DEBUG", format="json"))
    for name in SDK_LOGGERS:
        # The HTTP stacks' INFO line per upstream request says what the call line says.
        floor = logging.WARNING if name in HTTP_STACK_LOGGERS else logging.INFO
        assert logging.getLogger(name).getEffectiveLevel() == floor, name
    configured(LoggingConfig(level="WARNING", format="json"))
    for name in SDK_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    # Asked for by name: the operator's choice, request dumps and all.
    configured(LoggingConfig(level="DEBUG", format="json", loggers={"anthropic": "DEBUG"}))
    assert logging.getLogger("anthropic._base_client").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("openai").getEffectiveLevel() == logging.INFO


class _BlockedStream(io.StringIO):
    """A log output that cannot take a line until `opened` is set (a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()

    def write(self, text: str) -> int:
        self.opened.wait(30)
        return super().write(text)


def test_a_blocked_log_output_never_blocks_the_caller_and_drops_are_counted(
    configured: Callable[[LoggingConfig], io.StringIO],
) -> None:
    configured(LoggingConfig(level="INFO", format="json"))
    handler = output_handler()
    assert isinstance(handler, logging.StreamHandler)
    blocked = _BlockedStream()
    handler.setStream(blocked)
    log = logging.getLogger("server.test")
    extra = 50
    started = time.perf_counter()
    for n in range(QUEUE_RECORDS + extra):
        log.info("line %d", n)
    # Queuing only: the calls did not wait for the output (each write would).
    assert time.perf_counter() - started < 5.0
    blocked.opened.set()
    flush_logs()
    log.warning("after")
    flush_logs()
    lines = [json.loads(line) for line in blocked.getvalue().splitlines()]
    messages = [line["message"] for line in lines]
    assert "after" in messages
    (note,) = [m for m in messages if "log records dropped" in m]
    # The thread took one record before it blocked; the queue held the rest.
    assert int(note.split()[0]) in range(extra - 2, extra + 1), note
    assert len(lines) >= QUEUE_RECORDS


def test_records_queued_one_by_one_are_written_in_batches_not_a_wake_up_each(
    configured: Callable[[LoggingConfig], io.StringIO],
) -> None:
    """Waking the writing thread for every record cost a lone call ~200 µs of CPU
    (bench/results/2026-12-03-vm-log-batches.md): it wakes once per BATCH_S."""
    stream = configured(LoggingConfig(level="INFO", format="json"))
    writer = logs._writer
    assert writer is not None
    log = logging.getLogger("server.test")
    before = writer.rounds
    for n in range(20):  # as calls at concurrency 1 log, a millisecond or so apart
        log.info("line %d", n)
        time.sleep(0.001)
    flush_logs()
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        f"line {n}" for n in range(20)
    ]
    # 20 ms or so of records (60 on a busy machine) in 20 ms batches; a wake-up per
    # record would be 20 rounds.
    assert writer.rounds - before <= 6
