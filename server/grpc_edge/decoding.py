"""From protobuf requests to validated internal requests, in one pass.

Validation happens here, before any provider is called. Every problem is
collected as a field violation with its path in the request
(`messages[1].content[0].tool_result.tool_use_id`), and all of them are
reported together as INVALID_ARGUMENT. A model nobody serves is NOT_FOUND;
limits that depend on the model (max_tokens) are checked once it is known.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from llmgateway.v1 import generation_pb2 as pb
from server.errors import FieldViolation, InvalidArgumentError, ModelNotFoundError
from server.routing import Route, Router
from server.schema import (
    CacheControl,
    CallerMetadata,
    ContentBlock,
    GenerationRequest,
    ImageBlock,
    Message,
    Role,
    TextBlock,
    ThinkingBlock,
    TokenCountRequest,
    Tool,
    ToolChoice,
    ToolChoiceMode,
    ToolResultBlock,
    ToolUseBlock,
)

IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TEMPERATURE = 2.0

_ROLES = {pb.ROLE_USER: Role.USER, pb.ROLE_ASSISTANT: Role.ASSISTANT}
_TOOL_CHOICE_MODES = {
    pb.ToolChoice.MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    pb.ToolChoice.MODE_AUTO: ToolChoiceMode.AUTO,
    pb.ToolChoice.MODE_ANY: ToolChoiceMode.ANY,
    pb.ToolChoice.MODE_NONE: ToolChoiceMode.NONE,
    pb.ToolChoice.MODE_TOOL: ToolChoiceMode.TOOL,
}


# Where a decoder reports a bad field: (field path, description).
Violations = Callable[[str, str], None]
# A Struct key that reads well after a dot in a field path; others are quoted.
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# google.protobuf.Duration's range (duration.proto): about 10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000


def struct_to_dict(value: struct_pb2.Struct, path: str, bad: Violations) -> dict[str, Any]:
    """A Struct as the JSON object it stands for, every number a float.

    A Struct carries any double, but JSON has no NaN or Infinity: each one
    is reported under its own path (`tools[0].input_schema.properties.x`)
    and decoded as null, so that the caller learns every bad value at once.
    Depth needs no guard here: the protobuf parser refuses a message nested
    more than 100 deep.
    """
    return {
        key: _value_to_python(item, _key_path(path, key), bad) for key, item in value.fields.items()
    }


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{json.dumps(key)}]"


def _value_to_python(value: struct_pb2.Value, path: str, bad: Violations) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            bad(path, f"must be a finite number, not {number} (JSON has no NaN or Infinity)")
            return None
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value, path, bad)
    if kind == "list_value":
        return [
            _value_to_python(item, f"{path}[{i}]", bad)
            for i, item in enumerate(value.list_value.values)
        ]
    return None  # null_value, or no kind set


def _valid_duration(value: duration_pb2.Duration) -> bool:
    """Whether a Duration is within the range duration.proto allows (the wire
    carries any int64, and a timedelta cannot hold the far end of it)."""
    seconds, nanos = value.seconds, value.nanos
    return (
        abs(seconds) <= MAX_DURATION_SECONDS
        and abs(nanos) < 1_000_000_000
        and not (seconds > 0 > nanos or seconds < 0 < nanos)
    )


class _Decoder:
    """Builds internal values while collecting every violation it meets."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def bad(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def raise_if_invalid(self) -> None:
        if self.violations:
            raise InvalidArgumentError(self.violations)

    # -- content -----------------------------------------------------------

    def block(self, block: pb.ContentBlock, path: str) -> ContentBlock | None:
        kind = block.WhichOneof("block")
        cache = self.cache_control(block, path)
        if kind == "text":
            return TextBlock(block.text, cache)
        if kind == "image":
            return self.image(block.image, f"{path}.image", cache)
        if kind == "tool_use":
            use = block.tool_use
            if not use.id:
                self.bad(f"{path}.tool_use.id", "must not be empty")
            if not use.name:
                self.bad(f"{path}.tool_use.name", "must not be empty")
            return ToolUseBlock(
                use.id,
                use.name,
                struct_to_dict(use.input, f"{path}.tool_use.input", self.bad),
                cache,
            )
        if kind == "tool_result":
            result = block.tool_result
            if not result.tool_use_id:
                self.bad(f"{path}.tool_result.tool_use_id", "must not be empty")
            content: list[TextBlock | ImageBlock] = []
            for j, inner in enumerate(result.content):
                inner_path = f"{path}.tool_result.content[{j}]"
                decoded = self.block(inner, inner_path)
                if isinstance(decoded, TextBlock | ImageBlock):
                    content.append(decoded)
                elif decoded is not None:
                    self.bad(inner_path, "a tool result holds only text and image blocks")
            return ToolResultBlock(result.tool_use_id, content, result.is_error, cache)
        if kind == "thinking":
            t = block.thinking
            return ThinkingBlock(t.text, t.signature, t.redacted_data, cache)
        self.bad(path, "set one of text, image, tool_use, tool_result, thinking")
        return None

    def image(self, image: pb.ImageBlock, path: str, cache: CacheControl | None) -> ImageBlock:
        source = image.WhichOneof("source")
        if source == "data":
            if not image.data:
                self.bad(f"{path}.data", "must not be empty")
            if image.media_type not in IMAGE_MEDIA_TYPES:
                self.bad(
                    f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"
                )
            return ImageBlock(data=image.data, media_type=image.media_type, cache_control=cache)
        if source == "url":
            if not image.url.startswith(("https://", "http://")):
                self.bad(f"{path}.url", "must be an http or https URL")
            if image.media_type and image.media_type not in IMAGE_MEDIA_TYPES:
                self.bad(
                    f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"
                )
            return ImageBlock(url=image.url, media_type=image.media_type, cache_control=cache)
        self.bad(path, "set data or url")
        return ImageBlock(cache_control=cache)

    def cache_control(self, block: pb.ContentBlock, path: str) -> CacheControl | None:
        if not block.HasField("cache_control"):
            return None
        if not block.cache_control.HasField("ttl"):
            return CacheControl()
        ttl = block.cache_control.ttl
        if not _valid_duration(ttl):
            self.bad(
                f"{path}.cache_control.ttl",
                f"must be a valid Duration (seconds at most {MAX_DURATION_SECONDS:,},"
                " nanos at most 999,999,999, both of one sign)",
            )
            return CacheControl()
        seconds = ttl.seconds + ttl.nanos / 1e9
        if seconds <= 0:
            self.bad(f"{path}.cache_control.ttl", "must be positive")
        return CacheControl(seconds)

    def system(self, blocks: Any) -> list[TextBlock]:
        system: list[TextBlock] = []
        for i, block in enumerate(blocks):
            decoded = self.block(block, f"system[{i}]")
            if isinstance(decoded, TextBlock):
                system.append(decoded)
            elif decoded is not None:
                self.bad(f"system[{i}]", "system instructions hold only text blocks")
        return system

    def messages(self, messages: Any) -> list[Message]:
        if not messages:
            self.bad("messages", "must hold at least one message")
            return []
        decoded: list[Message] = []
        tool_uses: set[str] = set()
        for i, message in enumerate(messages):
            path = f"messages[{i}]"
            role = _ROLES.get(message.role)
            if role is None:
                self.bad(f"{path}.role", "must be ROLE_USER or ROLE_ASSISTANT")
            if i == 0 and role is Role.ASSISTANT:
                self.bad(f"{path}.role", "the first message must be from the user")
            if not message.content:
                self.bad(f"{path}.content", "must hold at least one content block")
            blocks: list[ContentBlock] = []
            for j, block in enumerate(message.content):
                block_path = f"{path}.content[{j}]"
                item = self.block(block, block_path)
                if item is None:
                    continue
                if isinstance(item, ToolUseBlock | ThinkingBlock) and role is Role.USER:
                    kind = "tool_use" if isinstance(item, ToolUseBlock) else "thinking"
                    self.bad(block_path, f"{kind} blocks belong in assistant messages")
                if isinstance(item, ToolResultBlock) and role is Role.ASSISTANT:
                    self.bad(block_path, "tool_result blocks belong in user messages")
                if isinstance(item, ToolUseBlock) and item.id:
                    if item.id in tool_uses:
                        self.bad(f"{block_path}.tool_use.id", f"duplicate tool use id {item.id!r}")
                    tool_uses.add(item.id)
                if (
                    isinstance(item, ToolResultBlock)
                    and item.tool_use_id
                    and item.tool_use_id not in tool_uses
                ):
                    self.bad(
                        f"{block_path}.tool_result.tool_use_id",
                        f"no earlier assistant tool_use has id {item.tool_use_id!r}",
                    )
                blocks.append(item)
            decoded.append(Message(role or Role.USER, blocks))
        return decoded

    def tools(self, tools: Any) -> list[Tool]:
        decoded: list[Tool] = []
        names: set[str] = set()
        for i, tool in enumerate(tools):
            if not TOOL_NAME.match(tool.name):
                self.bad(f"tools[{i}].name", "must be 1-64 letters, digits, '_' or '-'")
            elif tool.name in names:
                self.bad(f"tools[{i}].name", f"duplicate tool name {tool.name!r}")
            names.add(tool.name)
            schema = struct_to_dict(tool.input_schema, f"tools[{i}].input_schema", self.bad)
            if schema and schema.get("type", "object") != "object":
                self.bad(f"tools[{i}].input_schema.type", 'must be "object"')
            decoded.append(Tool(tool.name, tool.description, schema))
        return decoded

    def tool_choice(self, request: pb.GenerateRequest, tools: list[Tool]) -> ToolChoice | None:
        if not request.HasField("tool_choice"):
            return None
        choice = request.tool_choice
        mode = _TOOL_CHOICE_MODES.get(choice.mode)
        if mode is None:
            self.bad("tool_choice.mode", "unknown mode")
            return None
        if mode is ToolChoiceMode.TOOL:
            if not choice.tool_name:
                self.bad("tool_choice.tool_name", "required with MODE_TOOL")
            elif choice.tool_name not in {t.name for t in tools}:
                self.bad("tool_choice.tool_name", f"no tool named {choice.tool_name!r} in tools")
        elif choice.tool_name:
            self.bad("tool_choice.tool_name", "only allowed with MODE_TOOL")
        if mode in (ToolChoiceMode.ANY, ToolChoiceMode.TOOL) and not tools:
            self.bad("tool_choice.mode", "requires at least one tool in tools")
        return ToolChoice(mode, choice.tool_name, choice.disable_parallel_tool_use)

    def sampling(self, request: pb.GenerateRequest) -> None:
        if request.HasField("temperature"):
            t = request.temperature
            if not (math.isfinite(t) and 0.0 <= t <= MAX_TEMPERATURE):
                self.bad("temperature", f"must be between 0 and {MAX_TEMPERATURE:g}")
        if request.HasField("top_p") and not (
            math.isfinite(request.top_p) and 0.0 <= request.top_p <= 1.0
        ):
            self.bad("top_p", "must be between 0 and 1")
        if request.HasField("top_k") and request.top_k < 1:
            self.bad("top_k", "must be at least 1")
        for i, seq in enumerate(request.stop_sequences):
            if not seq:
                self.bad(f"stop_sequences[{i}]", "must not be empty")


def decode_generate(
    request: pb.GenerateRequest, router: Router, request_id: str, deadline: float | None = None
) -> tuple[GenerationRequest, Route]:
    """Validates a GenerateRequest and returns it as an internal request with its route.

    `deadline` is when the caller's deadline runs out, on the loop's clock.
    """
    d = _Decoder()
    if not request.model:
        d.bad("model", "must name a model (see ListModels)")
    system = d.system(request.system)
    messages = d.messages(request.messages)
    tools = d.tools(request.tools)
    tool_choice = d.tool_choice(request, tools)
    d.sampling(request)
    if request.HasField("max_tokens") and request.max_tokens <= 0:
        d.bad("max_tokens", "must be positive")
    thinking_budget = None
    if request.HasField("thinking"):
        thinking_budget = request.thinking.budget_tokens
        if thinking_budget <= 0:
            d.bad("thinking.budget_tokens", "must be positive")
    provider_options = struct_to_dict(request.provider_options, "provider_options", d.bad)
    d.raise_if_invalid()

    route = router.resolve(request.model)
    if route is None:
        raise ModelNotFoundError(request.model)
    model = route.model
    max_tokens = request.max_tokens if request.HasField("max_tokens") else model.default_max_tokens
    if max_tokens > model.max_output_tokens:
        d.bad("max_tokens", f"must be at most {model.max_output_tokens} for model {model.id!r}")
    if thinking_budget is not None:
        if not model.capabilities.thinking:
            d.bad("thinking", f"model {model.id!r} does not support extended thinking")
        elif thinking_budget >= max_tokens:
            d.bad("thinking.budget_tokens", "must be less than max_tokens")
    d.raise_if_invalid()

    metadata = request.metadata
    return (
        GenerationRequest(
            model=request.model,
            messages=messages,
            max_tokens=max_tokens,
            request_id=request_id,
            system=system,
            tools=tools,
            tool_choice=tool_choice,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            top_k=request.top_k if request.HasField("top_k") else None,
            stop_sequences=list(request.stop_sequences),
            thinking_budget_tokens=thinking_budget,
            metadata=CallerMetadata(metadata.end_user_id, dict(metadata.tags)),
            provider_options=provider_options,
            deadline=deadline,
        ),
        route,
    )


def decode_count_tokens(
    request: pb.CountTokensRequest, router: Router, deadline: float | None = None
) -> tuple[TokenCountRequest, Route]:
    """Validates a CountTokensRequest."""
    d = _Decoder()
    if not request.model:
        d.bad("model", "must name a model (see ListModels)")
    system = d.system(request.system)
    messages = d.messages(request.messages)
    tools = d.tools(request.tools)
    d.raise_if_invalid()
    route = router.resolve(request.model)
    if route is None:
        raise ModelNotFoundError(request.model)
    return TokenCountRequest(request.model, messages, system, tools, deadline), route
