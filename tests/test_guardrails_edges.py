"""The PII guardrail end to end, on both edges of a real in-process gateway in front
of the fake upstream: what the upstream received, and what the caller got.

Policies by model (guardrails.models): claude-test masks both ways and
restores; its alias claude-test-latest blocks; claude-sonnet-5-5 blocks
answers only; gpt-test masks answers only; echo is not guarded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx2
import pytest

from llmgateway.v1 import generation_pb2 as pb
from tests.anthropic_grammar import check_anthropic_stream
from tests.conftest import RunningGateway, field_violations, user
from tests.fake_upstream import FakeUpstream, Reply, Text, Thinking, ToolCall
from tests.http_fixtures import base_url, start_front_door

EMAIL = "jane.roe@example.com"
CARD = "4111 1111 1111 1111"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GUARDRAILS = {
    "models": {
        "claude-test": {"pii": {"action": "mask", "restore": True}},
        "claude-test-latest": {"pii": {"action": "block"}},
        "claude-sonnet-5-5": {"pii": {"action": "block", "scope": "output"}},
        "gpt-test": {"pii": {"action": "mask", "scope": "output"}},
    },
    "stream_window_chars": 32,
}
FILLER = "This sentence only makes the answer longer than the hold-back window. "


@pytest.fixture(scope="module")
async def gateway(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGateway]:
    running = await start_front_door(
        fake_upstream, tmp_path_factory.mktemp("guardrails"), guardrails=GUARDRAILS
    )
    yield running
    await running.aclose()


async def post(gateway: RunningGateway, body: dict[str, Any]) -> httpx2.Response:
    async with httpx2.AsyncClient() as client:
        return await client.post(
            f"{base_url(gateway)}/v1/messages",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
            timeout=30,
        )


def sent_text(fake: FakeUpstream, path: str) -> str:
    return fake.last(path).raw.decode()


# -- gRPC ------------------------------------------------------------------------------


async def test_generate_masks_the_prompt_and_restores_the_answer(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(Reply(blocks=[Text("I will mail <EMAIL_ADDRESS_1> and <CREDIT_CARD_1>.")]))
    response = await gateway.stub.Generate(
        pb.GenerateRequest(
            model="claude-test",
            system=[pb.ContentBlock(text=f"The operator is {EMAIL}.")],
            messages=[user(f"Mail {EMAIL} my card {CARD}.")],
        )
    )
    upstream = fake.last("/v1/messages").body
    assert EMAIL not in json.dumps(upstream) and CARD not in json.dumps(upstream)
    assert upstream["messages"][0]["content"][0]["text"] == (
        "Mail <EMAIL_ADDRESS_1> my card <CREDIT_CARD_1>."
    )
    assert upstream["system"][0]["text"] == "The operator is <EMAIL_ADDRESS_1>."
    assert response.content[0].text == f"I will mail {EMAIL} and {CARD}."


async def test_stream_generate_blocks_a_tool_result_naming_type_and_place(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    messages = [
        user("Look the customer up."),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            content=[pb.ContentBlock(tool_use=pb.ToolUseBlock(id="tu_1", name="lookup"))],
        ),
        pb.Message(
            role=pb.ROLE_USER,
            content=[
                pb.ContentBlock(
                    tool_result=pb.ToolResultBlock(
                        tool_use_id="tu_1",
                        content=[pb.ContentBlock(text=f"row: Jane, card {CARD}")],
                    )
                )
            ],
        ),
    ]
    call = gateway.stub.StreamGenerate(
        pb.GenerateRequest(model="claude-test-latest", messages=messages)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert violations == {"messages[2].content[0].content[0]": "contains CREDIT_CARD"}
    assert CARD not in (caught.value.details() or "")
    assert not fake.requests


async def test_stream_generate_masks_streamed_text_and_tool_arguments(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    fake.enqueue(
        Reply(
            blocks=[
                Text(f"{FILLER}Your card {CARD} is on file. {FILLER}"),
                ToolCall("call_1", "charge", {"card": CARD, "amount": 3}, fragments=4),
            ]
        )
    )
    call = gateway.stub.StreamGenerate(pb.GenerateRequest(model="gpt-test", messages=[user("Hi")]))
    text, tool_json = "", ""
    async for event in call:
        delta = event.content_block_delta
        if event.HasField("content_block_delta"):
            text += delta.text
            tool_json += delta.tool_input_json
    assert CARD not in text and "4111" not in text
    assert text == f"{FILLER}Your card <CREDIT_CARD_1> is on file. {FILLER}"
    assert json.loads(tool_json) == {"card": "<CREDIT_CARD_1>", "amount": 3}


async def test_an_unguarded_model_is_untouched(gateway: RunningGateway) -> None:
    response = await gateway.stub.Generate(
        pb.GenerateRequest(model="echo", messages=[user(f"echo {EMAIL}")])
    )
    assert EMAIL in response.content[0].text


# -- HTTP /v1/messages (pass-through to the Anthropic deployment) ------------------------


async def test_messages_pass_through_body_is_masked_and_thinking_kept(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    thinking = {
        "type": "thinking",
        "thinking": f"The user wrote {EMAIL}; I should answer.",
        "signature": "EqQBCkYIBxgCKkAv+/8=",
    }
    fake.enqueue(Reply(blocks=[Thinking("ok", "sig-1"), Text("Sent to <EMAIL_ADDRESS_1>.")]))
    body = {
        "model": "claude-test",
        "max_tokens": 300,
        "system": f"Support desk of {EMAIL}",
        "messages": [
            {"role": "user", "content": f"Write to {EMAIL}"},
            {"role": "assistant", "content": [thinking, {"type": "text", "text": "Sure."}]},
            {"role": "user", "content": [{"type": "text", "text": f"Again, {EMAIL}."}]},
        ],
    }
    answer = await post(gateway, body)
    assert answer.status_code == 200, answer.text
    raw = sent_text(fake, "/v1/messages")
    upstream = json.loads(raw)
    assert upstream["system"] == "Support desk of <EMAIL_ADDRESS_1>"
    assert upstream["messages"][0]["content"] == "Write to <EMAIL_ADDRESS_1>"
    assert upstream["messages"][2]["content"][0]["text"] == "Again, <EMAIL_ADDRESS_1>."
    # The thinking block (its text and signature) reaches the upstream unchanged.
    assert upstream["messages"][1]["content"][0] == thinking
    assert raw.count(EMAIL) == 1 and thinking["signature"] in raw
    # The answer is encoded from the guarded events: the value restored, thinking kept.
    reply = answer.json()
    assert reply["content"][0] == {"type": "thinking", "thinking": "ok", "signature": "sig-1"}
    assert reply["content"][1]["text"] == f"Sent to {EMAIL}."


async def test_messages_block_is_a_400_naming_types_and_places(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    body = {
        "model": "claude-test-latest",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": f"card {CARD}, mail {EMAIL}"}],
    }
    answer = await post(gateway, body)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "CREDIT_CARD" in message and "EMAIL_ADDRESS" in message
    assert "messages[0].content[0]" in message
    assert CARD not in answer.text and EMAIL not in answer.text
    assert not fake.requests


async def test_relayed_stream_is_held_and_cut_before_a_secret(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    # One upstream read per event, so the relayed bytes come in pieces.
    text = f"{FILLER}{FILLER}The key is {AWS_KEY} as asked. {FILLER}"
    fake.enqueue(Reply(blocks=[Text(text)], event_delay_s=0.005))
    body = {
        "model": "claude-sonnet-5-5",
        "max_tokens": 300,
        "stream": True,
        "messages": [{"role": "user", "content": "Print the key."}],
    }
    async with httpx2.AsyncClient() as client:
        answer = await client.post(
            f"{base_url(gateway)}/v1/messages",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
            timeout=30,
        )
    streamed = answer.text
    assert "AKIA" not in streamed
    # What came before it was relayed (one text_delta per word), the rest held back.
    assert '"text":"sentence "' in streamed.replace(": ", ":")
    assert '"text":"key "' not in streamed.replace(": ", ":")
    assert streamed.rstrip().endswith("}") and "event: error" in streamed
    assert "blocked by the PII guardrail: content[0] contains AWS_ACCESS_KEY" in streamed


async def test_messages_stream_is_masked_and_restored_when_relayed(
    gateway: RunningGateway, fake: FakeUpstream
) -> None:
    """Under mask the relayed bytes are dropped and the guarded events encoded
    as a Messages stream: a well-formed one, with the answer's own card masked
    and the caller's e-mail put back."""
    fake.enqueue(
        Reply(blocks=[Text(f"{FILLER}Mailed <EMAIL_ADDRESS_1>; card {CARD} charged. {FILLER}")])
    )
    body = {
        "model": "claude-test",
        "max_tokens": 300,
        "stream": True,
        "messages": [{"role": "user", "content": f"Mail {EMAIL}"}],
    }
    async with httpx2.AsyncClient() as client:
        answer = await client.post(
            f"{base_url(gateway)}/v1/messages",
            content=json.dumps(body).encode(),
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
            timeout=30,
        )
    assert answer.status_code == 200
    events = check_anthropic_stream(answer.content)
    text = "".join(
        data["delta"].get("text", "") for name, data in events if name == "content_block_delta"
    )
    assert text == f"{FILLER}Mailed {EMAIL}; card <CREDIT_CARD_1> charged. {FILLER}"
    assert "4111" not in answer.text
    assert "<EMAIL_ADDRESS_1>" in sent_text(fake, "/v1/messages")
