"""A Messages API body (`POST /v1/messages`) as the gateway's internal request.

The HTTP front door's protocol adapter for Anthropic's JSON, in one pass over
the parsed body. Every hard problem (no model, a block of the wrong shape, a
sampling value out of range) becomes a field violation named by its path
(`messages[2].content[0].source.data`), and all of them are raised together
as InvalidArgumentError, as server/grpc_edge/decoding.py does for the gRPC edge.

Anthropic's API is wider than the internal request. What is valid there but
has no internal equivalent (server tools, `document` or `search_result`
blocks, `container`, `mcp_servers`, an output `format`, any field this
module does not know) does not fail decoding: it is listed in
`untranslatable`. A route to an Anthropic deployment forwards the body
verbatim and needs only the model, max_tokens, the stream flag and a token
estimate; a translated route (OpenAI, the offline models) refuses the call
with those violations. Hints that only tune how Anthropic serves a call
(`context_management`, `output_config.effort`, `service_tier`, a tool's
`defer_loading` or `strict`, `thinking.display`, citations in the history,
metadata beyond `user_id`) are listed in `dropped` instead: a translation
leaves them out, as it leaves out their beta headers, so Claude Code, which
sends them all, can be served by any model. A `system` message in the
middle of the conversation joins the system instructions. So that the
estimate still counts what the internal request cannot carry, an
untranslatable block stands in the request as a TextBlock holding its
compact JSON (a base64 payload, a PDF's, is left out of it and counted as
one image), and an image whose source is a file id as an ImageBlock with
neither data nor url.

Cache hints with no place in the internal request (a tool's `cache_control`,
the top-level one) are checked and dropped: they change no answer. The
strings of translatable blocks are referenced, never copied; only base64
images are decoded to bytes.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from server.errors import FieldViolation, InvalidArgumentError
from server.http_edge.body_fields import FieldCollector, compact, is_int, is_number
from server.http_edge.json_decoding import refuse_lone_surrogates
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
# Anthropic's rule; OpenAI allows 64 characters, which its provider checks.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
MAX_MESSAGES = 100_000
MAX_TEMPERATURE = 1.0  # Anthropic's range (the gRPC contract allows up to 2)
MIN_THINKING_BUDGET = 1024
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}
UNTRANSLATABLE = "cannot be translated for a model served outside Anthropic's API"

_ROLES = {"user": Role.USER, "assistant": Role.ASSISTANT}
_TOOL_CHOICES = {mode.value: mode for mode in ToolChoiceMode}  # auto, any, none, tool
_REQUEST_KEYS = frozenset(
    [
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "cache_control",
        "output_config",  # see _BodyDecoder.output_config
    ]
)
# The keys each known block may carry; any other key with a value is untranslatable.
_BLOCK_KEYS = {
    "text": frozenset({"type", "text", "cache_control"}),
    "image": frozenset({"type", "source", "cache_control"}),
    "tool_use": frozenset({"type", "id", "name", "input", "cache_control", "caller"}),
    "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    "thinking": frozenset({"type", "thinking", "signature", "cache_control"}),
    "redacted_thinking": frozenset({"type", "data", "cache_control"}),
}
_TOOL_KEYS = frozenset({"type", "name", "description", "input_schema", "cache_control"})
# Hints a translation drops: they tune how Anthropic serves a call (its
# context editing, effort, tier, tool loading) or annotate history, and no
# other API has them. Their betas are never sent to another API either, so
# a field is never dropped while its beta header goes on, or the reverse.
_DROPPABLE_REQUEST_KEYS = frozenset({"context_management", "service_tier", "speed"})
_DROPPABLE_TOOL_KEYS = frozenset({"defer_loading", "strict", "eager_input_streaming"})
_DROPPABLE_BLOCK_KEYS = frozenset({"citations"})
_TOOL_CHOICE_KEYS = frozenset({"type", "name", "disable_parallel_tool_use"})
_MESSAGE_KEYS = frozenset({"role", "content"})
_METADATA_KEYS = frozenset({"user_id"})
# Blocks that only an assistant writes (tool_result is the user's alone).
_ASSISTANT_ONLY = frozenset({"tool_use", "thinking", "redacted_thinking"})
_DIRECT_CALLER = {"type": "direct"}


@dataclass(slots=True)
class DecodedMessages:
    """A valid Messages request: the internal request, and what it cannot carry.

    `untranslatable` is empty when a non-Anthropic deployment may serve
    `request` faithfully; otherwise it names every field or block that would
    be lost (see the module docstring). `dropped` names the hints a
    translation leaves out (context management, effort, citations...).
    """

    request: GenerationRequest
    stream: bool
    untranslatable: list[FieldViolation]
    dropped: list[str] = field(default_factory=list)


def decode_messages(
    body: object, *, request_id: str, deadline: float | None, text_checked: bool = False
) -> DecodedMessages:
    """Validates a Messages request body (parsed JSON); raises InvalidArgumentError.

    `text_checked`: the body's bytes hold no lone surrogate (json_decoding.py).
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    if not text_checked:
        refuse_lone_surrogates(body)
    d = _BodyDecoder()
    model = d.model(body)
    max_tokens = d.max_tokens(body.get("max_tokens"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        d.bad("stream", "must be a boolean")
    system, messages, tools, tool_choice = d.conversation(body)
    temperature = d.unit_interval(body, "temperature", MAX_TEMPERATURE)
    top_p = d.unit_interval(body, "top_p", 1.0)
    top_k = body.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        d.bad("top_k", "must be an integer of at least 1")
        top_k = None
    stop_sequences = d.stop_sequences(body.get("stop_sequences"))
    budget = d.thinking(body.get("thinking"), max_tokens)
    end_user_id = d.metadata(body.get("metadata"))
    d.raise_if_invalid()
    return DecodedMessages(
        GenerationRequest(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            request_id=request_id,
            system=system,
            tools=tools,
            tool_choice=tool_choice,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_sequences=stop_sequences,
            thinking_budget_tokens=budget,
            metadata=CallerMetadata(end_user_id=end_user_id),
            incremental=bool(stream),
            deadline=deadline,
        ),
        bool(stream),
        d.untranslatable,
        d.dropped,
    )


def decode_count_tokens(
    body: object, *, deadline: float | None, text_checked: bool = False
) -> TokenCountRequest:
    """Validates a `POST /v1/messages/count_tokens` body, by the rules of decode_messages.

    max_tokens is not needed; what the internal request cannot carry is
    still counted (as its JSON text), and not reported.
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    if not text_checked:
        refuse_lone_surrogates(body)
    d = _BodyDecoder()
    model = d.model(body)
    system, messages, tools, _ = d.conversation(body)
    d.thinking(body.get("thinking"), 0)
    d.raise_if_invalid()
    return TokenCountRequest(model, messages, system, tools, deadline)


class _BodyDecoder(FieldCollector):
    """Builds internal values while collecting every violation it meets."""

    __slots__ = ("moved_system", "tool_use_ids")

    UNTRANSLATABLE = UNTRANSLATABLE

    def __init__(self) -> None:
        super().__init__()
        # System messages met among the messages, for the system instructions.
        self.moved_system: list[TextBlock] = []
        self.tool_use_ids: set[str] = set()

    # -- the request ---------------------------------------------------------

    def model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self.bad("model", "must be a non-empty string naming a model")
            return ""
        return model

    def conversation(
        self, body: dict[str, Any]
    ) -> tuple[list[TextBlock], list[Message], list[Tool], ToolChoice | None]:
        """The parts a token count needs too: system, messages, tools and tool choice."""
        self.extras(body, _REQUEST_KEYS, "", _DROPPABLE_REQUEST_KEYS)
        self.output_config(body.get("output_config"))
        system = body.get("system")
        system_blocks = [] if system is None else self.text_blocks(system, "system")
        messages = self.messages(body.get("messages"))
        system_blocks += self.moved_system
        tools, names = self.tools(body.get("tools"))
        tool_choice = self.tool_choice(body.get("tool_choice"), names)
        # Cache hints cannot be placed on the internal request; they change no answer.
        self.cache_control(body, "")
        return system_blocks, messages, tools, tool_choice

    def output_config(self, value: Any) -> None:
        """`effort` is a hint a translation may drop; any other setting (a `format`
        the answer must follow) it cannot carry."""
        if value is None:
            return
        if not isinstance(value, dict):
            self.bad("output_config", "must be an object")
            return
        self.extras(value, frozenset(), "output_config", frozenset({"effort"}))

    def max_tokens(self, value: Any) -> int:
        if value is None:
            self.bad("max_tokens", "is required")
        elif not is_int(value) or value < 0:
            self.bad("max_tokens", "must be a non-negative integer")
        elif value == 0:
            # Valid for Anthropic (it warms the prompt cache), meaningless elsewhere.
            self.unsupported("max_tokens", f"0 (a prompt-cache warm-up) {UNTRANSLATABLE}")
            return 0
        else:
            return value
        return 0

    def unit_interval(self, body: dict[str, Any], key: str, top: float) -> float | None:
        value = body.get(key)
        if value is None:
            return None
        if not is_number(value) or not 0 <= value <= top:
            self.bad(key, f"must be a number from 0 to {top:g}")
            return None
        return float(value)

    def stop_sequences(self, value: Any) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad("stop_sequences", "must be an array of strings")
            return []
        for i, sequence in enumerate(value):
            if not isinstance(sequence, str) or not sequence:
                self.bad(f"stop_sequences[{i}]", "must be a non-empty string")
        return value

    def thinking(self, value: Any, max_tokens: int) -> int | None:
        """The thinking budget: `enabled` gives its own; `adaptive` lets max_tokens bound it."""
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            self.bad("thinking", 'must be an object with a "type"')
            return None
        kind = value["type"]
        display = value.get("display")
        if display not in (None, "summarized", "omitted"):
            self.bad("thinking.display", 'must be "summarized" or "omitted"')
        elif display == "omitted":
            self.dropped.append("thinking.display")
        if kind == "disabled":
            return None
        if kind == "enabled":
            budget = value.get("budget_tokens")
            if not is_int(budget) or budget < MIN_THINKING_BUDGET:
                self.bad(
                    "thinking.budget_tokens",
                    f"must be an integer of at least {MIN_THINKING_BUDGET}",
                )
                return None
            return budget
        if kind == "adaptive":
            # The model decides how much to think within max_tokens: the largest
            # budget the internal request allows (one below max_tokens).
            return max_tokens - 1 if max_tokens > 1 else None
        self.unsupported("thinking.type", f"{kind!r} {UNTRANSLATABLE}")
        return None

    def metadata(self, value: Any) -> str:
        if value is None:
            return ""
        if not isinstance(value, dict):
            self.bad("metadata", "must be an object")
            return ""
        # Other metadata is the caller's bookkeeping: no answer depends on it.
        self.extras(value, _METADATA_KEYS, "metadata", frozenset(value))
        user_id = value.get("user_id")
        if user_id is None:
            return ""
        if not isinstance(user_id, str):
            self.bad("metadata.user_id", "must be a string")
            return ""
        return user_id

    # -- messages ------------------------------------------------------------

    def messages(self, value: Any) -> list[Message]:
        if not isinstance(value, list) or not value:
            self.bad("messages", "must be a non-empty array of messages")
            return []
        if len(value) > MAX_MESSAGES:
            self.bad("messages", f"must hold at most {MAX_MESSAGES} messages")
            return []
        decoded: list[Message] = []
        last = len(value) - 1
        for i, message in enumerate(value):
            path = f"messages[{i}]"
            if not isinstance(message, dict):
                self.bad(path, "must be an object with a role and content")
                continue
            self.extras(message, _MESSAGE_KEYS, path)
            role_name = message.get("role")
            content = message.get("content")
            if role_name == "system":
                # Valid mid-conversation in Anthropic's API (Claude Code sends one):
                # a translation joins it to the system instructions.
                self.moved_system.extend(self.text_blocks(content, f"{path}.content"))
                continue
            role = _ROLES.get(role_name) if isinstance(role_name, str) else None
            if role is None:
                self.bad(f"{path}.role", 'must be "user" or "assistant"')
            blocks: list[ContentBlock]
            if isinstance(content, str):
                blocks = [TextBlock(content)] if content else []
            elif isinstance(content, list):
                blocks = self.content(content, f"{path}.content", role)
            else:
                self.bad(f"{path}.content", "must be a string or an array of content blocks")
                continue
            # Only a final assistant message (a prefill) may be empty.
            if not content and not (i == last and role is Role.ASSISTANT):
                self.bad(f"{path}.content", "must not be empty")
            decoded.append(Message(role or Role.USER, blocks))
        return decoded

    def content(self, raw: list[Any], path: str, role: Role | None) -> list[ContentBlock]:
        blocks: list[ContentBlock] = []
        for j, item in enumerate(raw):
            block_path = f"{path}[{j}]"
            kind = item.get("type") if isinstance(item, dict) else None
            if not isinstance(kind, str):
                self.bad(block_path, 'must be a content block: an object with a "type"')
                continue
            if role is Role.USER and kind in _ASSISTANT_ONLY:
                self.bad(block_path, f"{kind} blocks belong in assistant messages")
            elif role is Role.ASSISTANT and kind == "tool_result":
                self.bad(block_path, "tool_result blocks belong in user messages")
            if kind not in _BLOCK_KEYS:
                blocks.extend(self.opaque(item, kind, block_path))
                continue
            block = self.block(item, kind, block_path)
            if block is not None:
                blocks.append(block)
        return blocks

    def opaque(self, raw: dict[str, Any], kind: str, path: str) -> list[TextBlock | ImageBlock]:
        """A block the internal request cannot carry, as the estimate should count it."""
        self.unsupported(path, f"{kind!r} blocks {UNTRANSLATABLE}")
        source = raw.get("source")
        if isinstance(source, dict) and source.get("type") == "base64" and "data" in source:
            # A PDF's base64 would count as a token per four characters: a
            # million for 5 MB, which no context window takes. It counts as an
            # image instead: a floor rather than an estimate (the upstream's
            # usage corrects the accounting).
            return [TextBlock(compact(raw | {"source": source | {"data": ""}})), ImageBlock()]
        return [TextBlock(compact(raw))]

    def block(self, raw: dict[str, Any], kind: str, path: str) -> ContentBlock | None:
        """A block of a kind in _BLOCK_KEYS."""
        self.extras(raw, _BLOCK_KEYS[kind], path, _DROPPABLE_BLOCK_KEYS)
        cache = self.cache_control(raw, path)
        if kind == "text":
            text = raw.get("text")
            if not isinstance(text, str):
                self.bad(f"{path}.text", "must be a string")
                return None
            return TextBlock(text, cache)
        if kind == "image":
            return self.image(raw.get("source"), f"{path}.source", cache)
        if kind == "tool_use":
            return self.tool_use(raw, path, cache)
        if kind == "tool_result":
            return self.tool_result(raw, path, cache)
        if kind == "thinking":
            text, signature = raw.get("thinking"), raw.get("signature")
            if not isinstance(text, str):
                self.bad(f"{path}.thinking", "must be a string")
            if not isinstance(signature, str):
                self.bad(f"{path}.signature", "must be a string")
            if isinstance(text, str) and isinstance(signature, str):
                return ThinkingBlock(text, signature, cache_control=cache)
            return None
        data = raw.get("data")  # redacted_thinking
        if not isinstance(data, str):
            self.bad(f"{path}.data", "must be a string")
            return None
        return ThinkingBlock(redacted_data=data, cache_control=cache)

    def image(self, source: Any, path: str, cache: CacheControl | None) -> ImageBlock:
        kind = source.get("type") if isinstance(source, dict) else None
        if not isinstance(source, dict) or not isinstance(kind, str):
            self.bad(path, 'must be an object with a "type"')
            return ImageBlock(cache_control=cache)
        if kind == "base64":
            media_type, data = source.get("media_type"), source.get("data")
            if media_type not in IMAGE_MEDIA_TYPES:
                self.bad(
                    f"{path}.media_type", f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}"
                )
            if not isinstance(data, str) or not data:
                self.bad(f"{path}.data", "must be a non-empty base64 string")
                return ImageBlock(cache_control=cache)
            try:
                decoded = base64.b64decode(data, validate=True)
            except ValueError:  # binascii.Error, or a character outside ASCII
                self.bad(f"{path}.data", "must be valid base64")
                return ImageBlock(cache_control=cache)
            return ImageBlock(data=decoded, media_type=str(media_type), cache_control=cache)
        if kind == "url":
            url = source.get("url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                self.bad(f"{path}.url", "must be an http or https URL")
                return ImageBlock(cache_control=cache)
            return ImageBlock(url=url, cache_control=cache)
        # A file id (or a source type still to come): counted as an image.
        self.unsupported(f"{path}.type", f"{kind!r} image sources {UNTRANSLATABLE}")
        return ImageBlock(cache_control=cache)

    def tool_use(self, raw: dict[str, Any], path: str, cache: CacheControl | None) -> ToolUseBlock:
        use_id, name, arguments = raw.get("id"), raw.get("name"), raw.get("input")
        caller = raw.get("caller")
        if caller is not None and caller != _DIRECT_CALLER:
            self.unsupported(f"{path}.caller")
        if not isinstance(use_id, str) or not use_id:
            self.bad(f"{path}.id", "must be a non-empty string")
            use_id = ""
        elif use_id in self.tool_use_ids:
            self.bad(f"{path}.id", f"duplicate tool use id {use_id!r}")
        self.tool_use_ids.add(use_id)
        if not isinstance(name, str) or not name:
            self.bad(f"{path}.name", "must be a non-empty string")
            name = ""
        if not isinstance(arguments, dict):
            self.bad(f"{path}.input", "must be an object")
            arguments = {}
        return ToolUseBlock(use_id, name, arguments, cache)

    def tool_result(
        self, raw: dict[str, Any], path: str, cache: CacheControl | None
    ) -> ToolResultBlock:
        use_id, content, is_error = raw.get("tool_use_id"), raw.get("content"), raw.get("is_error")
        if not isinstance(use_id, str) or not use_id:
            self.bad(f"{path}.tool_use_id", "must be a non-empty string")
            use_id = ""
        elif use_id not in self.tool_use_ids:
            self.bad(f"{path}.tool_use_id", f"no earlier tool_use block has id {use_id!r}")
        if is_error is not None and not isinstance(is_error, bool):
            self.bad(f"{path}.is_error", "must be a boolean")
        blocks: list[TextBlock | ImageBlock] = []
        if isinstance(content, str):
            if content:
                blocks.append(TextBlock(content))
        elif isinstance(content, list):
            for k, item in enumerate(content):
                item_path = f"{path}.content[{k}]"
                kind = item.get("type") if isinstance(item, dict) else None
                if not isinstance(kind, str):
                    self.bad(item_path, 'must be a content block: an object with a "type"')
                    continue
                if kind in _ASSISTANT_ONLY or kind == "tool_result":
                    self.bad(item_path, f"a tool result cannot hold {kind} blocks")
                    continue
                if kind not in _BLOCK_KEYS:  # search results, documents
                    blocks.extend(self.opaque(item, kind, item_path))
                    continue
                block = self.block(item, kind, item_path)
                if isinstance(block, TextBlock | ImageBlock):
                    blocks.append(block)
        elif content is not None:
            self.bad(f"{path}.content", "must be a string or an array of content blocks")
        return ToolResultBlock(use_id, blocks, bool(is_error), cache)

    def text_blocks(self, value: Any, path: str) -> list[TextBlock]:
        """System instructions: a string, or an array of text blocks."""
        if isinstance(value, str):
            return [TextBlock(value)] if value else []
        if not isinstance(value, list):
            self.bad(path, "must be a string or an array of text blocks")
            return []
        blocks: list[TextBlock] = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if not isinstance(item, dict) or item.get("type") != "text":
                self.bad(item_path, "must be a text block")
                continue
            block = self.block(item, "text", item_path)
            if isinstance(block, TextBlock):
                blocks.append(block)
        return blocks

    def cache_control(self, raw: dict[str, Any], path: str) -> CacheControl | None:
        value = raw.get("cache_control")
        if value is None:
            return None
        field = f"{path}.cache_control" if path else "cache_control"
        if not isinstance(value, dict) or value.get("type") != "ephemeral":
            self.bad(field, 'must be {"type": "ephemeral"}, with an optional ttl')
            return None
        ttl = value.get("ttl")
        if ttl is None:
            return CacheControl()
        seconds = CACHE_TTLS.get(ttl) if isinstance(ttl, str) else None
        if seconds is None:
            self.bad(f"{field}.ttl", 'must be "5m" or "1h"')
            return None
        return CacheControl(seconds)

    # -- tools ---------------------------------------------------------------

    def tools(self, value: Any) -> tuple[list[Tool], set[str]]:
        """The tools, and the names of every tool declared (server tools included)."""
        names: set[str] = set()
        if value is None:
            return [], names
        if not isinstance(value, list):
            self.bad("tools", "must be an array of tools")
            return [], names
        decoded: list[Tool] = []
        for i, tool in enumerate(value):
            path = f"tools[{i}]"
            if not isinstance(tool, dict):
                self.bad(path, "must be an object")
                continue
            kind, name = tool.get("type"), tool.get("name")
            if kind is not None and kind != "custom":
                if not isinstance(kind, str):
                    self.bad(f"{path}.type", "must be a string")
                    continue
                # A server tool or an Anthropic-defined one (web search, bash...):
                # kept as a tool described by its JSON, for the estimate.
                self.unsupported(path, f"{kind!r} tools {UNTRANSLATABLE}")
                label = name if isinstance(name, str) and name else kind
                names.add(label)
                decoded.append(Tool(label, compact(tool)))
                continue
            self.extras(tool, _TOOL_KEYS, path, _DROPPABLE_TOOL_KEYS)
            self.cache_control(tool, path)
            if not isinstance(name, str) or not TOOL_NAME.match(name):
                self.bad(f"{path}.name", "must be 1-128 letters, digits, '_' or '-'")
                name = ""
            elif name in names:
                self.bad(f"{path}.name", f"duplicate tool name {name!r}")
            names.add(name)
            description = tool.get("description")
            if description is not None and not isinstance(description, str):
                self.bad(f"{path}.description", "must be a string")
                description = None
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                self.bad(f"{path}.input_schema", "must be a JSON schema object")
                schema = {}
            elif schema.get("type", "object") != "object":
                self.bad(f"{path}.input_schema.type", 'must be "object"')
            decoded.append(Tool(name, description or "", schema))
        return decoded, names

    def tool_choice(self, value: Any, names: set[str]) -> ToolChoice | None:
        if value is None:
            return None
        kind = value.get("type") if isinstance(value, dict) else None
        mode = _TOOL_CHOICES.get(kind) if isinstance(kind, str) else None
        if not isinstance(value, dict) or mode is None:
            self.bad("tool_choice.type", 'must be "auto", "any", "none" or "tool"')
            return None
        self.extras(value, _TOOL_CHOICE_KEYS, "tool_choice")
        name = value.get("name")
        if mode is ToolChoiceMode.TOOL:
            if not isinstance(name, str) or not name:
                self.bad("tool_choice.name", 'is required with type "tool"')
                name = ""
            elif name not in names:
                self.bad("tool_choice.name", f"no tool named {name!r} in tools")
        elif name is not None:
            self.bad("tool_choice.name", 'is only allowed with type "tool"')
            name = ""
        if mode in (ToolChoiceMode.ANY, ToolChoiceMode.TOOL) and not names:
            self.bad("tool_choice.type", "requires at least one tool in tools")
        disable_parallel = value.get("disable_parallel_tool_use")
        if disable_parallel is not None and not isinstance(disable_parallel, bool):
            self.bad("tool_choice.disable_parallel_tool_use", "must be a boolean")
        return ToolChoice(mode, name or "", bool(disable_parallel))
