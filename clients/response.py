"""What Generate returns to Python callers: the GenerateResponse, read as the SDKs read.

The official SDKs set the expectations a Python caller brings: a stop reason
is a name (`"end_turn"`, `"tool_use"`), a tool call's input is a plain dict
with its integers intact. The contract says them as an enum number and a
`google.protobuf.Struct`, whose numbers are doubles. `Response` wraps the
protobuf message and answers those two in the SDKs' form; everything else
(`usage`, `cost`, `request_id`, `HasField`, ...) is the message's own, and
`.proto` is the message itself, for code that wants the contract's types.

Tool input: a stream carries each call's input as JSON (`tool_input_json`),
read with its integers as they were sent; Generate carries only the Struct,
whose integral numbers are turned back into ints (up to 2**53, the doubles
that hold an integer exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from google.protobuf import json_format, struct_pb2

from llmgateway.v1 import generation_pb2 as pb

__all__ = ["Response", "ResponseBlock", "stop_reason_name", "struct_to_dict"]

_EXACT_INTEGERS = 2**53
_STOP_PREFIX = "STOP_REASON_"


def stop_reason_name(value: pb.StopReason.ValueType) -> str | None:
    """`STOP_REASON_END_TURN` as `"end_turn"`; None while unknown (UNSPECIFIED)."""
    if value == pb.STOP_REASON_UNSPECIFIED:
        return None
    return pb.StopReason.Name(value).removeprefix(_STOP_PREFIX).lower()


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INTEGERS:
        return int(value)
    if isinstance(value, dict):
        return {key: _ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_ints(item) for item in value]
    return value


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, its integral numbers as ints."""
    result: dict[str, Any] = _ints(json_format.MessageToDict(struct))
    return result


_M = TypeVar("_M", pb.ContentBlock, pb.GenerateResponse)


class _ProtoView(Generic[_M]):
    """A view of a protobuf message (`proto`): its fields read through, equal
    to the message (or another view of it), printed as it."""

    __slots__ = ("proto",)
    proto: _M

    def __getattr__(self, name: str) -> Any:
        # Not set yet (copy, pickle): no recursion.
        if name == "proto" or name in type(self).__slots__:
            raise AttributeError(name)
        return getattr(self.proto, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ProtoView):
            return bool(self.proto == other.proto)
        return bool(self.proto == other)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the message is

    def __str__(self) -> str:
        return str(self.proto)


class ResponseBlock(_ProtoView[pb.ContentBlock]):
    """One content block: `type` names it (`"text"`, `"tool_use"`, `"thinking"`, ...).

    A tool call also has `id`, `name` and `input` (a plain dict), as in the
    SDKs. Any other attribute is the protobuf ContentBlock's (`text`,
    `tool_use`, `WhichOneof`, ...); `.proto` is the block itself.
    """

    __slots__ = ("_input",)

    def __init__(self, proto: pb.ContentBlock, tool_input: dict[str, Any] | None = None) -> None:
        self.proto = proto
        self._input = tool_input

    @property
    def type(self) -> str:
        """The block's kind: the name of the field that is set."""
        return self.proto.WhichOneof("block") or ""

    @property
    def id(self) -> str:
        """A tool call's id (the ToolResultBlock answering it names it)."""
        return self.proto.tool_use.id

    @property
    def name(self) -> str:
        """The name of the tool the model calls."""
        return self.proto.tool_use.name

    @property
    def input(self) -> dict[str, Any]:
        """A tool call's input, a plain dict with its integers intact."""
        if self._input is None:
            self._input = struct_to_dict(self.proto.tool_use.input)
        return self._input

    def __repr__(self) -> str:
        return f"ResponseBlock({self.type}: {self.proto!r})"


class Response(_ProtoView[pb.GenerateResponse]):
    """A GenerateResponse with `stop_reason` as a name and `content` as ResponseBlocks.

    `stop_reason` is `"end_turn"`, `"max_tokens"`, `"stop_sequence"`,
    `"tool_use"`, `"refusal"`, `"content_filter"`, `"pause_turn"`,
    `"context_window_exceeded"`, or None before a stream said it; the enum
    number is `.proto.stop_reason`. Every other attribute is the message's.
    """

    __slots__ = ("_inputs",)

    def __init__(
        self, proto: pb.GenerateResponse, tool_inputs: Mapping[int, dict[str, Any]] | None = None
    ) -> None:
        self.proto = proto
        # Tool inputs read from a stream's JSON, by position in `content`.
        self._inputs = dict(tool_inputs or {})

    @property
    def stop_reason(self) -> str | None:
        """Why the model stopped, by name (the anthropic SDK's names)."""
        return stop_reason_name(self.proto.stop_reason)

    @property
    def content(self) -> list[ResponseBlock]:
        """The content blocks, in order."""
        return [
            ResponseBlock(block, self._inputs.get(position))
            for position, block in enumerate(self.proto.content)
        ]

    @property
    def usage(self) -> pb.Usage:
        return self.proto.usage

    @property
    def cost(self) -> pb.Cost:
        return self.proto.cost

    @property
    def request_id(self) -> str:
        return self.proto.request_id

    @property
    def model(self) -> str:
        return self.proto.model

    @property
    def provider(self) -> str:
        return self.proto.provider

    def __repr__(self) -> str:
        return f"Response({self.proto!r})"
