"""From internal responses and events to protobuf, for the wire.

The one place that knows both shapes on the way out; it runs once per
streamed event, so it does no more than build the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import struct_pb2

from llmgateway.v1 import generation_pb2 as pb
from server.events import (
    ContentBlockStart,
    ContentBlockStop,
    MessageDelta,
    MessageStart,
    MessageStop,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.schema import (
    ContentBlock,
    Cost,
    GenerationResponse,
    ImageBlock,
    ModelInfo,
    Pricing,
    RoutingDecision,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

STOP_REASONS: dict[StopReason | None, pb.StopReason.ValueType] = {
    None: pb.STOP_REASON_UNSPECIFIED,
    StopReason.END_TURN: pb.STOP_REASON_END_TURN,
    StopReason.MAX_TOKENS: pb.STOP_REASON_MAX_TOKENS,
    StopReason.STOP_SEQUENCE: pb.STOP_REASON_STOP_SEQUENCE,
    StopReason.TOOL_USE: pb.STOP_REASON_TOOL_USE,
    StopReason.REFUSAL: pb.STOP_REASON_REFUSAL,
    StopReason.CONTENT_FILTER: pb.STOP_REASON_CONTENT_FILTER,
    StopReason.PAUSE_TURN: pb.STOP_REASON_PAUSE_TURN,
    StopReason.CONTEXT_WINDOW_EXCEEDED: pb.STOP_REASON_CONTEXT_WINDOW_EXCEEDED,
}


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(value)
    return out


def encode_block(block: ContentBlock) -> pb.ContentBlock:
    if isinstance(block, TextBlock):
        out = pb.ContentBlock(text=block.text)
    elif isinstance(block, ToolUseBlock):
        out = pb.ContentBlock(
            tool_use=pb.ToolUseBlock(id=block.id, name=block.name, input=_struct(block.input))
        )
    elif isinstance(block, ThinkingBlock):
        out = pb.ContentBlock(
            thinking=pb.ThinkingBlock(
                text=block.text, signature=block.signature, redacted_data=block.redacted_data
            )
        )
    elif isinstance(block, ImageBlock):
        image = pb.ImageBlock(media_type=block.media_type)
        if block.url is not None:
            image.url = block.url
        else:
            image.data = block.data or b""
        out = pb.ContentBlock(image=image)
    elif isinstance(block, ToolResultBlock):
        out = pb.ContentBlock(
            tool_result=pb.ToolResultBlock(
                tool_use_id=block.tool_use_id,
                content=[encode_block(b) for b in block.content],
                is_error=block.is_error,
            )
        )
    else:  # pragma: no cover - exhaustive over ContentBlock
        raise TypeError(f"not a content block: {block!r}")
    return out


def encode_usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
    )


def encode_cost(cost: Cost) -> pb.Cost:
    return pb.Cost(
        currency_code=cost.currency_code,
        total_nanos=cost.total_nanos,
        input_nanos=cost.input_nanos,
        output_nanos=cost.output_nanos,
        cache_read_nanos=cost.cache_read_nanos,
        cache_creation_nanos=cost.cache_creation_nanos,
    )


def encode_routing(routing: RoutingDecision) -> pb.RoutingDecision:
    return pb.RoutingDecision(alias=routing.alias, tier=routing.tier, reason=routing.reason)


def encode_response(response: GenerationResponse) -> pb.GenerateResponse:
    encoded = pb.GenerateResponse(
        id=response.id,
        model=response.model,
        provider=response.provider,
        content=[encode_block(b) for b in response.content],
        stop_reason=STOP_REASONS[response.stop_reason],
        stop_sequence=response.stop_sequence,
        usage=encode_usage(response.usage),
        cost=encode_cost(response.cost),
        request_id=response.request_id,
        upstream_request_id=response.upstream_request_id,
    )
    if response.routing is not None:
        encoded.routing.CopyFrom(encode_routing(response.routing))
    return encoded


def encode_event(event: StreamEvent) -> pb.StreamGenerateResponse:
    """One internal event as one StreamGenerateResponse."""
    # Most frequent first: this runs for every chunk.
    if isinstance(event, TextDelta):
        return pb.StreamGenerateResponse(
            content_block_delta=pb.ContentBlockDelta(index=event.index, text=event.text)
        )
    if isinstance(event, ToolInputDelta):
        return pb.StreamGenerateResponse(
            content_block_delta=pb.ContentBlockDelta(
                index=event.index, tool_input_json=event.partial_json
            )
        )
    if isinstance(event, ThinkingDelta):
        return pb.StreamGenerateResponse(
            content_block_delta=pb.ContentBlockDelta(index=event.index, thinking=event.text)
        )
    if isinstance(event, SignatureDelta):
        return pb.StreamGenerateResponse(
            content_block_delta=pb.ContentBlockDelta(
                index=event.index, thinking_signature=event.signature
            )
        )
    if isinstance(event, ContentBlockStart):
        return pb.StreamGenerateResponse(
            content_block_start=pb.ContentBlockStart(
                index=event.index, content_block=encode_block(event.block)
            )
        )
    if isinstance(event, ContentBlockStop):
        return pb.StreamGenerateResponse(content_block_stop=pb.ContentBlockStop(index=event.index))
    if isinstance(event, MessageStart):
        start = pb.MessageStart(
            id=event.id,
            model=event.model,
            provider=event.provider,
            request_id=event.request_id,
            upstream_request_id=event.upstream_request_id,
        )
        if event.usage is not None:
            start.usage.CopyFrom(encode_usage(event.usage))
        if event.routing is not None:
            start.routing.CopyFrom(encode_routing(event.routing))
        return pb.StreamGenerateResponse(message_start=start)
    if isinstance(event, MessageDelta):
        delta = pb.MessageDelta(
            stop_reason=STOP_REASONS[event.stop_reason], stop_sequence=event.stop_sequence
        )
        if event.usage is not None:
            delta.usage.CopyFrom(encode_usage(event.usage))
        if event.cost is not None:
            delta.cost.CopyFrom(encode_cost(event.cost))
        return pb.StreamGenerateResponse(message_delta=delta)
    if isinstance(event, MessageStop):
        return pb.StreamGenerateResponse(message_stop=pb.MessageStop())
    raise TypeError(f"not a stream event: {event!r}")  # pragma: no cover


def _pricing(pricing: Pricing) -> pb.Pricing:
    tier = pricing.long_context
    return pb.Pricing(
        input_per_mtok=pricing.input_per_mtok,
        output_per_mtok=pricing.output_per_mtok,
        cache_read_per_mtok=pricing.cache_read_per_mtok,
        cache_creation_per_mtok=pricing.cache_creation_per_mtok,
        long_context=None
        if tier is None
        else pb.LongContextPricing(
            above_tokens=tier.above_tokens,
            input_per_mtok=tier.input_per_mtok,
            output_per_mtok=tier.output_per_mtok,
            cache_read_per_mtok=tier.cache_read_per_mtok,
            cache_creation_per_mtok=tier.cache_creation_per_mtok,
        ),
    )


def encode_models(models: Iterable[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.Model(
                id=m.id,
                provider=m.provider,
                display_name=m.display_name or m.id,
                aliases=list(m.aliases),
                context_window=m.context_window,
                max_output_tokens=m.max_output_tokens,
                pricing=_pricing(m.pricing),
                capabilities=pb.Capabilities(
                    streaming=m.capabilities.streaming,
                    tools=m.capabilities.tools,
                    images=m.capabilities.images,
                    thinking=m.capabilities.thinking,
                ),
            )
            for m in models
        ]
    )
