"""Builders for the contract's messages, so a call needs no protobuf boilerplate.

    client.generate("echo", "Hello")                         # a prompt string
    client.generate("claude-sonnet-5-5", [
        user("What is in this picture?", image(png_bytes, "image/png")),
    ], tools=[tool("get_weather", "Weather for a city", {"type": "object"})])

Everything returns the generated protobuf types (llmgateway.v1.generation_pb2),
so anything the contract can say can still be said by building them directly.
The helpers that read a response take the client's Response (clients/response.py)
or the bare GenerateResponse alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, TypedDict, Unpack

from google.protobuf import json_format, struct_pb2

from llmgateway.v1 import generation_pb2 as pb

from .response import Response, ResponseBlock

__all__ = [
    "Prompt",
    "RequestOptions",
    "assistant",
    "build_request",
    "image",
    "image_url",
    "response_message",
    "response_text",
    "to_json",
    "tool",
    "tool_choice",
    "tool_result",
    "user",
]

# A prompt string (one user message) or a whole conversation.
Prompt: TypeAlias = str | Sequence[pb.Message]
Content: TypeAlias = str | pb.ContentBlock | pb.ImageBlock | ResponseBlock
AnyResponse: TypeAlias = Response | pb.GenerateResponse


def _block(part: Content) -> pb.ContentBlock:
    if isinstance(part, str):
        return pb.ContentBlock(text=part)
    if isinstance(part, pb.ImageBlock):
        return pb.ContentBlock(image=part)
    if isinstance(part, ResponseBlock):
        return part.proto
    return part


def _proto(response: AnyResponse) -> pb.GenerateResponse:
    return response.proto if isinstance(response, Response) else response


def user(*content: Content) -> pb.Message:
    """A user message from text, images (see `image`) and content blocks."""
    return pb.Message(role=pb.ROLE_USER, content=[_block(part) for part in content])


def assistant(*content: Content) -> pb.Message:
    """An assistant message, for a conversation's earlier turns."""
    return pb.Message(role=pb.ROLE_ASSISTANT, content=[_block(part) for part in content])


def image(data: bytes, media_type: str) -> pb.ImageBlock:
    """An inline image: PNG, JPEG, GIF or WebP bytes and their MIME type."""
    return pb.ImageBlock(data=data, media_type=media_type)


def image_url(url: str) -> pb.ImageBlock:
    """An image the provider fetches from an http(s) URL."""
    return pb.ImageBlock(url=url)


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def tool(name: str, description: str, input_schema: Mapping[str, Any]) -> pb.Tool:
    """A tool the model may call; `input_schema` is a JSON Schema object."""
    return pb.Tool(name=name, description=description, input_schema=_struct(input_schema))


def tool_choice(mode: str = "auto", name: str = "", *, parallel: bool = True) -> pb.ToolChoice:
    """`auto`, `any`, `none`, or `tool` with the tool's `name`."""
    return pb.ToolChoice(
        mode=pb.ToolChoice.Mode.Value(f"MODE_{mode.upper()}"),
        tool_name=name,
        disable_parallel_tool_use=not parallel,
    )


def tool_result(
    tool_use_id: str, *content: str | pb.ImageBlock, is_error: bool = False
) -> pb.ContentBlock:
    """The result of the model's tool call `tool_use_id`, for the next user message."""
    return pb.ContentBlock(
        tool_result=pb.ToolResultBlock(
            tool_use_id=tool_use_id,
            content=[_block(part) for part in content],
            is_error=is_error,
        )
    )


def response_text(response: AnyResponse) -> str:
    """The text blocks of a response, joined."""
    blocks = _proto(response).content
    return "".join(block.text for block in blocks if block.HasField("text"))


def response_message(response: AnyResponse) -> pb.Message:
    """A response as the assistant turn of the conversation that continues it."""
    return pb.Message(role=pb.ROLE_ASSISTANT, content=_proto(response).content)


class RequestOptions(TypedDict, total=False):
    """Everything a GenerateRequest can carry besides the model and the conversation."""

    # System instructions: a string, or text blocks (with cache markers, say).
    system: str | Sequence[pb.ContentBlock]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_sequences: Sequence[str]
    tools: Sequence[pb.Tool]
    tool_choice: pb.ToolChoice
    # Extended thinking: the most tokens the model may spend reasoning.
    thinking_budget: int
    end_user_id: str
    tags: Mapping[str, str]
    request_id: str
    # Passed to the provider untouched (for example Anthropic beta flags).
    provider_options: Mapping[str, Any]


def build_request(
    model: str, prompt: Prompt, **options: Unpack[RequestOptions]
) -> pb.GenerateRequest:
    """The GenerateRequest for these arguments (options left out stay unset).

    An argument RequestOptions does not name raises TypeError, as a misspelt
    keyword does in the SDKs, instead of being dropped unseen.
    """
    unknown = sorted(options.keys() - RequestOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    messages = [user(prompt)] if isinstance(prompt, str) else list(prompt)
    request = pb.GenerateRequest(
        model=model,
        messages=messages,
        tools=options.get("tools", ()),
        stop_sequences=options.get("stop_sequences", ()),
        request_id=options.get("request_id", ""),
    )
    system = options.get("system")
    if isinstance(system, str):
        request.system.append(pb.ContentBlock(text=system))
    elif system:
        request.system.extend(system)
    if "max_tokens" in options:
        request.max_tokens = options["max_tokens"]
    if "temperature" in options:
        request.temperature = options["temperature"]
    if "top_p" in options:
        request.top_p = options["top_p"]
    if "top_k" in options:
        request.top_k = options["top_k"]
    if "tool_choice" in options:
        request.tool_choice.CopyFrom(options["tool_choice"])
    if "thinking_budget" in options:
        request.thinking.budget_tokens = options["thinking_budget"]
    if options.get("end_user_id") or options.get("tags"):
        request.metadata.end_user_id = options.get("end_user_id", "")
        request.metadata.tags.update(options.get("tags", {}))
    if options.get("provider_options"):
        request.provider_options.CopyFrom(_struct(options["provider_options"]))
    return request


def to_json(message: Any, indent: int | None = 2) -> str:
    """A message as the contract's JSON (proto field names), as grpcurl prints it."""
    if isinstance(message, Response | ResponseBlock):
        message = message.proto
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent)
