"""The fold from events to a response, and pricing."""

from __future__ import annotations

import pytest

from server.costs import compute_cost
from server.errors import UpstreamProtocolError
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    ResponseAccumulator,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.schema import (
    Cost,
    Pricing,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)


def folded(events: list[StreamEvent]) -> ResponseAccumulator:
    accumulator = ResponseAccumulator()
    for event in events:
        accumulator.add(event)
    return accumulator


def test_fold_builds_every_block_kind_and_overwrites_usage() -> None:
    start_block = TextBlock("")
    events: list[StreamEvent] = [
        MessageStart("msg_1", "m", "p", usage=Usage(input_tokens=10)),
        ContentBlockStart(0, ThinkingBlock()),
        ThinkingDelta(0, "Let me "),
        ThinkingDelta(0, "think."),
        SignatureDelta(0, "sig"),
        ContentBlockStop(0),
        ContentBlockStart(1, start_block),
        TextDelta(1, "Hello"),
        TextDelta(1, " world"),
        ContentBlockStop(1),
        ContentBlockStart(2, ToolUseBlock(id="t1", name="f")),
        ToolInputDelta(2, '{"a": [1, '),
        ToolInputDelta(2, "2]}"),
        ContentBlockStop(2),
        MessageDelta(usage=Usage(input_tokens=10, output_tokens=3)),
        MessageDelta(StopReason.TOOL_USE, usage=Usage(input_tokens=10, output_tokens=7)),
        MessageStop(),
    ]
    response = folded(events).result()
    assert response.content == [
        ThinkingBlock("Let me think.", "sig"),
        TextBlock("Hello world"),
        ToolUseBlock(id="t1", name="f", input={"a": [1, 2]}),
    ]
    # Cumulative usage: the last MessageDelta wins, nothing is added up.
    assert response.usage == Usage(input_tokens=10, output_tokens=7)
    assert response.stop_reason is StopReason.TOOL_USE
    assert start_block.text == "", "the fold does not change the events it is given"


@pytest.mark.parametrize(
    "events",
    [
        [TextDelta(0, "x")],
        [MessageStart("a", "m", "p"), TextDelta(0, "x")],
        [MessageStart("a", "m", "p"), ContentBlockStart(0, TextBlock("")), ToolInputDelta(0, "{")],
        [
            MessageStart("a", "m", "p"),
            ContentBlockStart(0, ToolUseBlock(id="t", name="f")),
            ToolInputDelta(0, "[1]"),
            ContentBlockStop(0),
        ],
        [
            MessageStart("a", "m", "p"),
            ContentBlockStart(0, ToolUseBlock(id="t", name="f")),
            ToolInputDelta(0, '{"a": '),
            ContentBlockStop(0),
        ],
        [MessageStart("a", "m", "p"), MessageStart("a", "m", "p")],
    ],
    ids=[
        "before-start",
        "unopened-block",
        "wrong-delta-kind",
        "non-object-input",
        "bad-json",
        "two-starts",
    ],
)
def test_impossible_sequences_are_protocol_errors(events: list[StreamEvent]) -> None:
    with pytest.raises(UpstreamProtocolError):
        folded(events)


@pytest.mark.parametrize(
    ("usage", "pricing", "expected"),
    [
        (Usage(1_000_000, 0), Pricing(input_per_mtok=3.0), Cost(input_nanos=3_000_000_000)),
        (Usage(1, 1), Pricing(0.075, 0.3), Cost(input_nanos=75, output_nanos=300)),
        (
            Usage(100, 50, cache_read_input_tokens=1000, cache_creation_input_tokens=200),
            Pricing(3.0, 15.0, cache_read_per_mtok=0.3, cache_creation_per_mtok=3.75),
            Cost(
                input_nanos=300_000,
                output_nanos=750_000,
                cache_read_nanos=300_000,
                cache_creation_nanos=750_000,
            ),
        ),
        (Usage(0, 0), Pricing(3.0, 15.0), Cost()),
    ],
    ids=["per-million", "sub-cent-prices", "cache-buckets-priced-apart", "nothing"],
)
def test_cost(usage: Usage, pricing: Pricing, expected: Cost) -> None:
    cost = compute_cost(usage, pricing)
    assert cost == expected
    assert cost.total_nanos == (
        expected.input_nanos
        + expected.output_nanos
        + expected.cache_read_nanos
        + expected.cache_creation_nanos
    )
