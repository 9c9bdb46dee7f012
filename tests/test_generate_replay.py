"""Generate's non-streaming upstream call gives exactly what StreamGenerate's stream folds to.

Generate asks the provider for the whole response at once and replays it as
raw stream events through the same decoder; these tests pin that the two
paths agree on every kind of content, on usage with cache tokens and on
stop reasons.
"""

from __future__ import annotations

import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from tests.fake_upstream import FakeUpstream
from tests.fake_upstream.script import RedactedThinking, Reply, Text, Thinking, ToolCall, Usage
from tests.upstream_fixtures import ask, fold_stream, generate, stream_all

MODELS = {"anthropic": "claude-test", "openai": "gpt-test"}

REPLIES = {
    "text-max-tokens": Reply(blocks=[Text("cut short")], stop_reason="max_tokens"),
    "parallel-tools-cache": Reply(
        blocks=[
            Text("Checking both."),
            ToolCall("call_a", "get_weather", {"city": "Paris"}),
            ToolCall("call_b", "get_weather", {"city": "Oslo", "days": [1, 2]}, fragments=3),
        ],
        usage=Usage(
            input_tokens=30,
            output_tokens=40,
            cache_read_input_tokens=1000,
            cache_creation_input_tokens=200,
        ),
    ),
    "thinking": Reply(
        blocks=[Thinking("Let me think.", signature="sig-1"), Text("Answer.")],
    ),
    "redacted-thinking": Reply(blocks=[RedactedThinking("opaque=="), Text("Answer.")]),
}


# Chat Completions has no thinking blocks to return (OpenAI-compatible servers
# stream reasoning text only: test_openai_provider.py covers that).
CASES = [
    (provider, case)
    for provider in MODELS
    for case in REPLIES
    if not (provider == "openai" and "thinking" in case)
]


@pytest.mark.parametrize(("provider", "case"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
async def test_generate_equals_the_folded_stream(
    upstream_stub: pb_grpc.GenerationServiceStub, fake: FakeUpstream, provider: str, case: str
) -> None:
    req = ask(MODELS[provider], "Hello", request_id=f"replay-{case}")
    fake.enqueue(REPLIES[case])
    events, _ = await stream_all(upstream_stub, req)
    assert fake.last().body.get("stream") is True
    fake.enqueue(REPLIES[case])
    # Another request id: the same one would be a repeat, answered by the first
    # call's answer (server/cache/idempotency.py), not by an upstream call.
    req.request_id = f"replay-{case}-unary"
    unary, _ = await generate(upstream_stub, req)
    assert fake.last().body.get("stream") is not True
    folded = fold_stream(events)
    assert folded.request_id == f"replay-{case}"
    folded.request_id = unary.request_id
    assert folded == unary
    assert unary.content, "the reply has content"
