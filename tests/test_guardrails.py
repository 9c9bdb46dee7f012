"""The guardrail stage on its own (server/guardrails/): Presidio's recognizers and
ours, each action, the placeholders, restore, the block cache, the scan budget,
analyzer failures and time-outs under both on_error values, the audit trail,
and no network access. End to end through both edges: test_guardrails_edges.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from server.config import AuditConfig, ConfigError, GuardrailsConfig
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    RawChunk,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
    fold,
)
from server.guardrails import (
    GuardedRouter,
    GuardrailBlockedError,
    GuardrailScanBudgetError,
    GuardrailUnavailableError,
    guarded,
)
from server.guardrails.placeholders import Pseudonyms, Rewriter
from server.guardrails.policy import DEFAULT_ENTITIES, Policies
from server.guardrails.recognizers import presidio_analyzer
from server.guardrails.scanner import Finding, Scanner
from server.identity import IDENTITY, Identity
from server.routing import Route, Router
from server.schema import (
    ANTHROPIC_MESSAGES,
    GenerationRequest,
    Message,
    Passthrough,
    Role,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from server.telemetry.audit import close_audit, configure_audit

# One value of each default entity type, as a user might paste it.
SAMPLES = {
    "CREDIT_CARD": "4111 1111 1111 1111",
    "IBAN_CODE": "DE89 3704 0044 0532 0130 00",
    "US_SSN": "219-09-9999",
    "EMAIL_ADDRESS": "jane.roe@example.com",
    "PHONE_NUMBER": "+1 415 555 0132",
    "IP_ADDRESS": "192.168.10.20",
    "ANTHROPIC_API_KEY": "sk-ant-api03-Qx7Zp2Lm9Vb4Nc8Rt1Yw6Ks3Hd5Fg0Ja",
    "OPENAI_API_KEY": "sk-proj-Tz4Wq8Ep2Rn6Ym1Ku9Xc3Vb7Lj5Hg0",
    "LLMGW_API_KEY": "llmgw_0123456789ab_" + "5e" * 24,
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0",
    "PEM_PRIVATE_KEY": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAq7Bd\n"
    "-----END RSA PRIVATE KEY-----",
    "AWS_ACCESS_KEY": "AKIAIOSFODNN7EXAMPLE",
}
assert set(SAMPLES) == set(DEFAULT_ENTITIES)

CONFIG = GuardrailsConfig.model_validate({"pii": {"action": "mask"}})


@pytest.fixture(scope="module")
def analyze() -> Callable[[str, frozenset[str], float], list[Finding]]:
    return presidio_analyzer(CONFIG, DEFAULT_ENTITIES)


class ScriptedRouter:
    """Stands in for the Router: records the request it was given, answers `events`."""

    def __init__(self, events: list[StreamEvent] | None = None) -> None:
        self.events = events if events is not None else answer("Fine.")
        self.seen: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        self.seen.append(request)
        for event in self.events:
            yield event


ROUTE = cast(Route, type("R", (), {"model": type("M", (), {"id": "m"})()})())


def answer(*pieces: str, tool: list[str] | None = None) -> list[StreamEvent]:
    events: list[StreamEvent] = [
        MessageStart("msg_1", "m", "p"),
        ContentBlockStart(0, ThinkingBlock()),
        ThinkingDelta(0, "the user said 4111 1111 1111 1111"),
        SignatureDelta(0, "sig+/=4111111111111111"),
        ContentBlockStop(0),
        ContentBlockStart(1, TextBlock("")),
        *(TextDelta(1, p) for p in pieces),
        ContentBlockStop(1),
    ]
    if tool is not None:
        events += [
            ContentBlockStart(2, ToolUseBlock("tu_1", "send", {})),
            *(ToolInputDelta(2, p) for p in tool),
            ContentBlockStop(2),
        ]
    return [*events, MessageDelta(StopReason.END_TURN), MessageStop()]


def gate(
    analyze: Callable[[str, frozenset[str], float], list[Finding]],
    events: list[StreamEvent] | None = None,
    **pii: Any,
) -> tuple[GuardedRouter, ScriptedRouter]:
    inner = ScriptedRouter(events)
    config = GuardrailsConfig.model_validate({"pii": {"action": "mask", **pii}})
    router = guarded(cast(Router, inner), config, analyze)
    assert isinstance(router, GuardedRouter)
    return router, inner


def conversation(*texts: str) -> GenerationRequest:
    messages = [
        Message(Role.USER if i % 2 == 0 else Role.ASSISTANT, [TextBlock(t)])
        for i, t in enumerate(texts)
    ]
    return GenerationRequest("m", messages, 100, "req-1")


async def collect(router: Router, request: GenerationRequest) -> list[StreamEvent]:
    return [event async for event in router.stream(request, ROUTE)]


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# -- configuration -------------------------------------------------------------------


def test_off_by_default_the_router_is_not_wrapped() -> None:
    router = cast(Router, ScriptedRouter())
    assert guarded(router, GuardrailsConfig()) is router
    off = GuardrailsConfig.model_validate({"pii": {"action": "off", "entities": ["JWT"]}})
    assert guarded(router, off) is router


def test_an_unknown_entity_type_is_refused_by_its_key() -> None:
    config = GuardrailsConfig.model_validate(
        {"models": {"gpt": {"pii": {"action": "block", "entities": ["EMAIL", "JWT"]}}}}
    )
    with pytest.raises(ConfigError, match=r"guardrails\.models\.gpt\.pii\.entities\[0\]"):
        Policies(config)


def test_model_and_key_overrides() -> None:
    config = GuardrailsConfig.model_validate(
        {
            "pii": {"action": "detect", "score_threshold": 0.7},
            "models": {"claude": {"pii": {"action": "mask", "restore": True}}},
            "keys": {"k1": {"pii": {"action": "block"}}, "k2": {"pii": {"action": "off"}}},
        }
    )
    policies = Policies(config)
    assert policies.resolve("gpt", "gpt", "").action == "detect"  # type: ignore[union-attr]
    claude = policies.resolve("claude", "claude-x", "k9")
    assert claude is not None and (claude.action, claude.restore) == ("mask", True)
    assert claude.score_threshold == 0.7
    blocked = policies.resolve("claude", "claude-x", "k1")
    assert blocked is not None and (blocked.action, blocked.restore) == ("block", True)
    assert policies.resolve("claude", "claude-x", "k2") is None


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)
    with pytest.raises(ConfigError, match=r"pip install llm-gateway\[pii\]"):
        guarded(cast(Router, ScriptedRouter()), CONFIG)


# -- recognizers and coverage -----------------------------------------------------


@pytest.mark.parametrize("entity", sorted(SAMPLES))
def test_each_entity_type_is_found(analyze: Any, entity: str) -> None:
    text = f"Please keep this: {SAMPLES[entity]} thanks"
    found = {f.entity_type for f in analyze(text, frozenset(DEFAULT_ENTITIES), 0.5)}
    assert entity in found


def test_checksums_keep_lookalikes_out(analyze: Any) -> None:
    text = "order 4111 1111 1111 1112, iban DE00 3704 0044 0532 0130 00, ssn 000-12-3456"
    kinds = {f.entity_type for f in analyze(text, frozenset(DEFAULT_ENTITIES), 0.5)}
    assert not kinds & {"CREDIT_CARD", "IBAN_CODE", "US_SSN"}


PLACES = {
    "system[0]": lambda v: GenerationRequest(
        "m", [Message(Role.USER, [TextBlock("hi")])], 100, "r", system=[TextBlock(v)]
    ),
    "messages[0].content[1]": lambda v: GenerationRequest(
        "m", [Message(Role.USER, [TextBlock("hi"), TextBlock(f"mine: {v}")])], 100, "r"
    ),
    "messages[1].content[0]": lambda v: GenerationRequest(
        "m",
        [Message(Role.USER, [TextBlock("hi")]), Message(Role.ASSISTANT, [TextBlock(v)])],
        100,
        "r",
    ),
    "messages[0].content[0].content[0]": lambda v: GenerationRequest(
        "m", [Message(Role.USER, [ToolResultBlock("tu", [TextBlock(f"row: {v}")])])], 100, "r"
    ),
    "messages[0].content[0].input.to[1]": lambda v: GenerationRequest(
        "m",
        [Message(Role.ASSISTANT, [ToolUseBlock("tu", "send", {"to": ["x", v], "n": 3})])],
        100,
        "r",
    ),
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("entity", sorted(SAMPLES))
async def test_block_names_the_place_and_type_of_every_entity(
    analyze: Any, place: str, entity: str
) -> None:
    router, inner = gate(analyze, action="block")
    with pytest.raises(GuardrailBlockedError) as caught:
        await collect(router, PLACES[place](SAMPLES[entity]))
    fields = {v.field: v.description for v in caught.value.violations}
    assert place in fields and entity in fields[place]
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert SAMPLES[entity] not in str(caught.value) + repr(caught.value.violations)
    assert not inner.seen


@pytest.mark.parametrize("entity", sorted(SAMPLES))
async def test_mask_replaces_in_every_place(analyze: Any, entity: str) -> None:
    for place, make in PLACES.items():
        router, inner = gate(analyze)
        await collect(router, make(SAMPLES[entity]))
        sent = inner.seen[0]
        dumped = repr((sent.system, sent.messages))
        assert SAMPLES[entity] not in dumped.replace("\\n", "\n"), place
        assert f"<{entity}_1>" in dumped, place


# -- actions ---------------------------------------------------------------------------


async def test_detect_counts_without_changing_anything(analyze: Any) -> None:
    router, inner = gate(analyze, action="detect")
    reports: list[tuple[str, str, dict[str, int]]] = []
    router.reporters.append(
        lambda stage, action, counts, s, f: reports.append((stage, action, counts))
    )
    request = conversation(f"mail {SAMPLES['EMAIL_ADDRESS']} and {SAMPLES['JWT']}")
    before = repr(request.messages)
    events = await collect(router, request)
    assert repr(inner.seen[0].messages) == before
    assert text_of(events) == "Fine."
    assert ("input", "detect", {"EMAIL_ADDRESS": 1, "JWT": 1}) in reports


async def test_redact_removes_values(analyze: Any) -> None:
    router, inner = gate(analyze, action="redact")
    await collect(router, conversation(f"write to {SAMPLES['EMAIL_ADDRESS']} today"))
    sent = inner.seen[0].messages[0].content[0]
    assert isinstance(sent, TextBlock) and sent.text == "write to  today"


async def test_placeholders_are_stable_across_turns(analyze: Any) -> None:
    a, b, c = "ann@example.com", "bob@example.org", "carl@example.net"
    turn1 = conversation(f"mail {a} and {b}")
    turn2 = conversation(f"mail {a} and {b}", "Noted.", f"also {c}, and {b} again")
    router, inner = gate(analyze)
    await collect(router, turn1)
    await collect(router, turn2)
    first, second = (cast(TextBlock, r.messages[0].content[0]).text for r in inner.seen)
    assert first == second == "mail <EMAIL_ADDRESS_1> and <EMAIL_ADDRESS_2>"
    last = cast(TextBlock, inner.seen[1].messages[2].content[0]).text
    assert last == "also <EMAIL_ADDRESS_3>, and <EMAIL_ADDRESS_2> again"


async def test_restore_puts_values_back_in_text_and_tool_input(analyze: Any) -> None:
    email = SAMPLES["EMAIL_ADDRESS"]
    events = answer(
        "I will write to <EMAIL_",
        "ADDRESS_1> now; <EMAIL_ADDRESS_9> is unknown.",
        tool=['{"to": "<EMAIL_AD', 'DRESS_1>", "cc": "<EMAIL_ADDRESS_2>"}'],
    )
    router, inner = gate(analyze, events, restore=True, scope="input")
    out = await collect(router, conversation(f"my mail is {email}"))
    assert email not in repr(inner.seen[0].messages)
    assert text_of(out) == f"I will write to {email} now; <EMAIL_ADDRESS_9> is unknown."
    response = await fold(_aiter(out))
    tool = response.content[2]
    assert isinstance(tool, ToolUseBlock)
    assert tool.input == {"to": email, "cc": "<EMAIL_ADDRESS_2>"}


async def test_output_mask_holds_back_a_value_split_between_deltas(analyze: Any) -> None:
    card = SAMPLES["CREDIT_CARD"]
    filler = "The answer is long enough to pass the window. " * 6
    events = answer(
        filler, "card 4111 11", "11 1111 1111 ok ", filler, tool=['{"n":"4111 1111', ' 1111 1111"}']
    )
    router, _ = gate(analyze, events, scope="output")
    out = await collect(router, conversation("hello"))
    text = text_of(out)
    assert card not in text and "4111" not in text
    assert text == f"{filler}card <CREDIT_CARD_1> ok {filler}"
    assert len([e for e in out if isinstance(e, TextDelta)]) >= 2  # streamed, not held whole
    inputs = [e.partial_json for e in out if isinstance(e, ToolInputDelta)]
    assert inputs == ['{"n": "<CREDIT_CARD_1>"}']


async def test_output_mask_holds_back_a_jwt_longer_than_the_window(analyze: Any) -> None:
    # Its payload runs past the 128-character window before its signature
    # arrives: the value is held from its second part on, never half sent.
    header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    payload = "eyJ" + "c3ViIjoiMTIzNDU2Nzg5MCIsIm5hbWUiOiJKb2huIERvZSJ9" * 5
    token = f"{header}.{payload}.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0"
    pieces = [token[i : i + 16] for i in range(0, len(token), 16)]
    events = answer("Your token: ", *pieces, " keep it safe.")
    router, _ = gate(analyze, events, scope="output")
    out = await collect(router, conversation("hello"))
    text = text_of(out)
    assert text == "Your token: <JWT_1> keep it safe."
    assert payload[:20] not in text


async def test_output_block_ends_the_stream_before_the_value(analyze: Any) -> None:
    filler = "Nothing to see in this part of the answer at all. " * 6
    events = answer(filler, "key AKIAIOSF", "ODNN7EXAMPLE and more text after it", filler)
    events.insert(1, RawChunk(b"event: message_start\n\n"))
    router, _ = gate(analyze, events, action="block", scope="output")
    out: list[StreamEvent] = []
    with pytest.raises(GuardrailBlockedError) as caught:
        async for event in router.stream(conversation("hello"), ROUTE):
            out.append(event)
    assert "AKIA" not in text_of(out)
    assert caught.value.violations[0].field == "content[1]"
    assert "AWS_ACCESS_KEY" in caught.value.violations[0].description


async def test_thinking_blocks_are_untouched(analyze: Any) -> None:
    card = SAMPLES["CREDIT_CARD"]
    thinking = ThinkingBlock(f"they gave {card}", signature="EqQBCkYIBxgCKkA+4111111111111111=")
    request = GenerationRequest(
        "m", [Message(Role.ASSISTANT, [thinking, TextBlock(f"card {card}")])], 100, "r"
    )
    router, inner = gate(analyze, scope="both")
    out = await collect(router, request)
    assert inner.seen[0].messages[0].content[0] is thinking
    deltas = [e for e in out if isinstance(e, ThinkingDelta | SignatureDelta)]
    assert deltas == [e for e in answer() if isinstance(e, ThinkingDelta | SignatureDelta)]


async def test_passthrough_body_is_rewritten_and_thinking_kept(analyze: Any) -> None:
    email = SAMPLES["EMAIL_ADDRESS"]
    document = {
        "model": "m",
        "system": f"operator {email}",
        "messages": [
            {"role": "user", "content": f"mail {email}"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"so {email}", "signature": "Eq+/=="},
                    {"type": "tool_use", "id": "t", "name": "send", "input": {"to": email}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": email}],
            },
        ],
    }
    body = json.dumps(document).encode()
    request = conversation(f"mail {email}")
    request.passthrough = Passthrough(ANTHROPIC_MESSAGES, body, document)
    router, inner = gate(analyze)
    await collect(router, request)
    sent = inner.seen[0].passthrough
    assert sent is not None and sent.body != body
    assert json.loads(sent.body) == sent.document
    assert email not in sent.body.decode().replace(f"so {email}", "")
    assert sent.document["messages"][1]["content"][0] == document["messages"][1]["content"][0]
    assert sent.document["messages"][1]["content"][1]["input"] == {"to": "<EMAIL_ADDRESS_1>"}
    assert sent.document["messages"][2]["content"][0]["content"] == "<EMAIL_ADDRESS_1>"
    assert document["system"] == f"operator {email}"  # the client's document is not changed


# -- failure, cost -----------------------------------------------------------------------


def failing(_: str, __: frozenset[str], ___: float) -> list[Finding]:
    raise RuntimeError("analyzer broke")


def slow(analyze: Any) -> Callable[[str, frozenset[str], float], list[Finding]]:
    def run(text: str, entities: frozenset[str], threshold: float) -> list[Finding]:
        time.sleep(0.3)
        return list(analyze(text, entities, threshold))

    return run


@pytest.mark.parametrize("kind", ["error", "timeout"])
async def test_analyzer_trouble_blocks_unless_allowed(analyze: Any, kind: str) -> None:
    chosen = failing if kind == "error" else slow(analyze)
    config = {"pii": {"action": "mask"}, "timeout_s": 0.05}
    request = conversation(f"card {SAMPLES['CREDIT_CARD']}")
    inner = ScriptedRouter()
    router = guarded(cast(Router, inner), GuardrailsConfig.model_validate(config), chosen)
    with pytest.raises(GuardrailUnavailableError) as caught:
        await collect(router, request)
    assert caught.value.code.name == "UNAVAILABLE" and kind in str(caught.value)
    assert not inner.seen
    config["pii"]["on_error"] = "allow"  # type: ignore[index]
    router = guarded(cast(Router, inner), GuardrailsConfig.model_validate(config), chosen)
    assert text_of(await collect(router, request)) == "Fine."
    assert len(inner.seen) == 1


async def test_scan_budget_blocks_unless_allowed(analyze: Any) -> None:
    request = conversation("x" * 50, "y" * 60)
    for on_error in ("block", "allow"):
        config = {"pii": {"action": "block", "on_error": on_error}, "max_scan_chars": 100}
        router = guarded(
            cast(Router, ScriptedRouter()), GuardrailsConfig.model_validate(config), analyze
        )
        if on_error == "block":
            with pytest.raises(GuardrailScanBudgetError) as caught:
                await collect(router, request)
            assert [v.field for v in caught.value.violations] == ["messages[1].content[0]"]
        else:
            assert text_of(await collect(router, request)) == "Fine."


async def test_a_resent_transcript_is_analysed_only_for_its_new_block(analyze: Any) -> None:
    calls: list[str] = []

    def counting(text: str, entities: frozenset[str], threshold: float) -> list[Finding]:
        calls.append(text)
        return list(analyze(text, entities, threshold))

    turns = [f"turn {i}: ping me at user{i}@example.com" for i in range(40)]
    router, inner = gate(counting, scope="input")
    await collect(router, conversation(*turns[:39]))
    assert len(calls) == 39
    calls.clear()
    await collect(router, conversation(*turns))
    assert calls == [turns[39]]
    sent = [cast(TextBlock, m.content[0]).text for m in inner.seen[1].messages]
    assert sent[39] == "turn 39: ping me at <EMAIL_ADDRESS_40>"


async def test_scanner_caches_by_hash_not_content(analyze: Any) -> None:
    scanner = Scanner(analyze)
    first = await scanner.scan(["a@b.com x", "plain"], frozenset({"EMAIL_ADDRESS"}), 0.5)
    again = await scanner.scan(["a@b.com x", "plain", "new"], frozenset({"EMAIL_ADDRESS"}), 0.5)
    assert (first.analysed, again.analysed, again.cached) == (2, 1, 2)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in scanner._cache)
    scanner.shutdown()


def test_rewriter_resolves_overlaps_in_text_order() -> None:
    pseudonyms = Pseudonyms()
    text = "a 1111 b 2222"
    findings = [Finding("X", 9, 13, 0.9), Finding("X", 2, 6, 0.9), Finding("Y", 2, 4, 1.0)]
    assert Rewriter("mask", pseudonyms).rewrite(text, findings) == "a <X_1> b <X_2>"
    assert pseudonyms.restore("<X_2> <X_1> <X_3>") == "2222 1111 <X_3>"


# -- audit, network -------------------------------------------------------------------


async def test_audit_events_hold_no_values(analyze: Any, tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = configure_audit(AuditConfig(path=path))
    token = IDENTITY.set(Identity("key123", frozenset({"generate"})))
    try:
        router, _ = gate(analyze)
        await collect(router, conversation(f"card {SAMPLES['CREDIT_CARD']}, {SAMPLES['JWT']}"))
        blocker, _ = gate(analyze, action="block")
        with pytest.raises(GuardrailBlockedError):
            await collect(blocker, conversation(f"mail {SAMPLES['EMAIL_ADDRESS']}"))
    finally:
        IDENTITY.reset(token)
        close_audit(sink)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    masked, blocked = lines
    assert masked["event"] == "guardrail.masked" and blocked["event"] == "guardrail.blocked"
    assert masked["entities"] == ["CREDIT_CARD=1", "JWT=1"] and masked["key_id"] == "key123"
    assert masked["request_id"] == "req-1" and masked["fields"] == ["messages[0].content[0]"]
    assert blocked["entities"] == ["EMAIL_ADDRESS=1"]
    raw = path.read_text()
    for value in (SAMPLES["CREDIT_CARD"], "4111", SAMPLES["JWT"][:20], "jane.roe"):
        assert value not in raw


NO_NETWORK = """
import asyncio, socket

class NoNetwork(socket.socket):
    def __init__(self, family=-1, *args, **kwargs):
        if family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network access during a guardrail test")
        super().__init__(family, *args, **kwargs)

socket.socket = NoNetwork
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(OSError("no network"))
socket.getaddrinfo = lambda *a, **k: (_ for _ in ()).throw(OSError("no network"))

from server.config import GuardrailsConfig
from server.guardrails import guarded
from server.guardrails.policy import DEFAULT_ENTITIES
from server.guardrails.recognizers import presidio_analyzer

config = GuardrailsConfig.model_validate({"pii": {"action": "mask"}})
analyze = presidio_analyzer(config, DEFAULT_ENTITIES)
found = analyze("write to jane.roe@example.co.uk or call +44 20 7946 0958, card 4111111111111111",
                frozenset(DEFAULT_ENTITIES), 0.5)
print(sorted({f.entity_type for f in found}))
"""


def test_no_network_at_start_up_or_during_analysis() -> None:
    """A fresh process whose sockets fail builds the analyzer and finds e-mail
    (the public-suffix check), phone and card: nothing is fetched."""
    done = subprocess.run(
        [sys.executable, "-c", NO_NETWORK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['CREDIT_CARD', 'EMAIL_ADDRESS', 'PHONE_NUMBER']"
    assert "network" not in done.stderr.lower() and "download" not in done.stderr.lower()


async def _aiter(events: list[StreamEvent]) -> AsyncIterator[StreamEvent]:
    for event in events:
        yield event


def test_the_public_surface() -> None:
    import server.guardrails as package

    assert sorted(package.__all__) == [
        "Analyze",
        "Finding",
        "GuardedRouter",
        "GuardrailBlockedError",
        "GuardrailScanBudgetError",
        "GuardrailUnavailableError",
        "guarded",
    ]
    assert asyncio.iscoroutinefunction(GuardedRouter.count_tokens)


WITHOUT_EXTRA = """
import sys
sys.modules["presidio_analyzer"] = None  # as if the pii extra were not installed
sys.modules["spacy"] = None
from server.app import Gateway
from server.config import ConfigError, load_config
from server.routing import Router

off = load_config(environ={})
assert not off.guardrails.used
from server.guardrails import guarded
router = Router.from_config(off)
assert guarded(router, off.guardrails) is router
on = load_config(environ={}, overrides={"guardrails": {"pii": {"action": "block"}}})
try:
    Gateway(on)
except ConfigError as err:
    print(err)
"""


def test_without_the_extra_the_gateway_starts_unless_guardrails_are_configured() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert "pip install llm-gateway[pii]" in done.stdout


def test_chat_and_responses_documents_are_covered() -> None:
    from server.guardrails.request_text import document_texts, rewrite_document
    from server.schema import OPENAI_CHAT, OPENAI_RESPONSES

    email = SAMPLES["EMAIL_ADDRESS"]
    chat = {
        "messages": [
            {"role": "system", "content": f"ops {email}"},
            {"role": "user", "content": [{"type": "text", "text": f"to {email}"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c",
                        "function": {"name": "send", "arguments": json.dumps({"to": email})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": f"sent {email}"},
        ]
    }
    responses = {
        "instructions": f"ops {email}",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": f"to {email}"}]},
            {"type": "function_call", "call_id": "c", "name": "send", "arguments": "not json"},
            {"type": "function_call_output", "call_id": "c", "output": f"sent {email}"},
            {"type": "reasoning", "encrypted_content": email},
        ],
    }
    for protocol, document, places in (
        (
            OPENAI_CHAT,
            chat,
            [
                "messages[0].content",
                "messages[1].content[0].text",
                "messages[2].tool_calls[0].function.arguments.to",
                "messages[3].content",
            ],
        ),
        (
            OPENAI_RESPONSES,
            responses,
            [
                "instructions",
                "input[0].content[0].text",
                "input[1].arguments",
                "input[2].output",
            ],
        ),
    ):
        passthrough = Passthrough(protocol, json.dumps(document).encode(), document)
        assert [path for path, _ in document_texts(passthrough)] == places
        masked = rewrite_document(passthrough, lambda _, text: text.replace(email, "<E_1>"))
        assert masked.document is not document and json.loads(masked.body) == masked.document
        assert masked.body.decode().count(email) == (1 if protocol == OPENAI_RESPONSES else 0)
    arguments = json.loads(
        rewrite_document(
            Passthrough(OPENAI_CHAT, b"{}", chat), lambda _, t: t.replace(email, "<E_1>")
        ).document["messages"][2]["tool_calls"][0]["function"]["arguments"]
    )
    assert arguments == {"to": "<E_1>"}
