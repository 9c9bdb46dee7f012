"""A Responses API body (`POST /v1/responses`) as the gateway's internal request.

The HTTP front door's protocol adapter for OpenAI's Responses JSON (what
Codex CLI and the SDKs' `responses.create` send), in one pass over the
parsed body, built like messages_decoding.py: every hard problem becomes a
field violation named by its path (`input[3].content[0].image_url`), and
all of them are raised together as InvalidArgumentError. Statefulness the
gateway does not have is a hard problem too: `previous_response_id`,
`conversation`, `item_reference` items, `background: true` and an explicit
`store: true` get a 400 that says to send the whole conversation instead
(an omitted `store` is accepted: nothing is stored either way).

The conversation: `instructions`, then `system` and `developer` messages
wherever they stand, become the system instructions; `input` as a string is
one user message; consecutive items of one side join one message, so an
assistant's text, its reasoning and its `function_call`s make one assistant
message (tool uses with `call_id` as id and the parsed `arguments` as
input) and the `function_call_output`s that answer them one user message of
tool results. A `reasoning` item is kept only when it is faithful: when its
`encrypted_content` is the sealed thinking this gateway wrote
(responses_encoding.seal_thinking), it becomes that ThinkingBlock again,
text and signature exactly; OpenAI's own encrypted reasoning means nothing
to another provider, and a summary is not the reasoning, so either is
dropped. A part's `prompt_cache_breakpoint` becomes a cache breakpoint.

Mapped settings: `max_output_tokens` is max_tokens (0 when absent: the
adapter fills it with fit_max_tokens); `reasoning.effort` is a thinking
budget (EFFORT_BUDGETS: none none, minimal 1024, low 2048, medium 8192,
high 32768, xhigh 65536, max 131072, kept below max_tokens, and no thinking
when less than 1024 would fit); `tool_choice` none/auto/required/function
is none/auto/any/tool; `parallel_tool_calls: false` disables parallel tool
use; `safety_identifier` (or else `user`) is the end-user id.

As in the Messages decoder, what is valid for OpenAI but has no internal
equivalent does not fail decoding; it is listed in `untranslatable` (a
route to OpenAI relays the body verbatim, a translated route refuses it):
tools other than `function` (custom, local_shell, web_search, file_search,
mcp...) and calls or outputs of them in the input, `text.format` other than
plain text, a stored `prompt`, files and audio, logprobs, and any field
this module does not know. Hints whose loss changes no answer's meaning
are listed in `dropped` (`prompt_cache_key`, `metadata`, `text.verbosity`,
`reasoning.summary`, `service_tier`, a tool's `strict`, an item's `phase`,
`include` entries other than "reasoning.encrypted_content", which is always
honoured...). Settings a translation keeps as they are (`store: false`,
`parallel_tool_calls: true`, `truncation: "disabled"`) are in neither list.

`echo` holds the request's settings that a Response object repeats
(instructions, tools, tool_choice, temperature...), for the encoder.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from server.errors import FieldViolation, InvalidArgumentError
from server.http_edge.body_fields import (
    FieldCollector,
    compact,
    is_int,
    is_number,
    refuse_unpriced_tier,
)
from server.http_edge.json_decoding import refuse_lone_surrogates
from server.http_edge.responses_encoding import open_thinking
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
    Tool,
    ToolChoice,
    ToolChoiceMode,
    ToolResultBlock,
    ToolUseBlock,
)

IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
MAX_ITEMS = 100_000
MAX_TEMPERATURE = 2.0  # OpenAI's range; a provider with a narrower one checks its own
MIN_THINKING_BUDGET = 1024
# reasoning.effort -> thinking budget. The OpenAI provider maps a budget back
# to the same effort (server/providers/_openai_codec.py reasoning_effort),
# minimal aside (it has no budget below Anthropic's minimum of 1024).
EFFORT_BUDGETS: dict[str, int | None] = {
    "none": None,
    "minimal": MIN_THINKING_BUDGET,
    "low": 2048,
    "medium": 8192,
    "high": 32768,
    "xhigh": 65536,
    "max": 131072,
}
UNTRANSLATABLE = "cannot be translated for a model served outside OpenAI's API"
STATELESS = "this gateway keeps no conversation state; send the whole conversation in input"
# prompt_cache_breakpoint.ttl -> seconds (the Anthropic codec rounds up to 5m or 1h).
CACHE_TTLS = {"30m": 1800.0, "12h": 43200.0}

_REQUEST_KEYS = frozenset(
    [
        "model",
        "input",
        "instructions",
        "stream",
        "store",
        "previous_response_id",
        "conversation",
        "background",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "reasoning",
        "temperature",
        "top_p",
        "top_logprobs",
        "user",
        "safety_identifier",
        "include",
        "text",
        "truncation",
        "metadata",
    ]
)
# Hints a translation leaves out: caching keys, bookkeeping, serving tiers.
_DROPPABLE_REQUEST_KEYS = frozenset(
    [
        "client_metadata",  # Codex's telemetry ids, sent on every request
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "service_tier",
        "stream_options",
        "context_management",
        "max_tool_calls",
    ]
)
_ROLES = {"user": Role.USER, "assistant": Role.ASSISTANT}
_SYSTEM_ROLES = frozenset({"system", "developer"})
_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status"})
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
_PART_KEYS = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "output_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "refusal": frozenset({"type", "refusal"}),
    "input_image": frozenset({"type", "image_url", "detail", "prompt_cache_breakpoint"}),
}
# Output-only annotations of a text the client passes back: no answer depends on them.
_DROPPABLE_PART_KEYS = frozenset({"annotations", "logprobs"})
_CALL_KEYS = frozenset({"type", "call_id", "name", "arguments", "id", "status", "caller"})
_OUTPUT_KEYS = frozenset({"type", "call_id", "output", "id", "status", "caller", "name"})
_REASONING_KEYS = frozenset({"type", "id", "summary", "content", "encrypted_content", "status"})
_FUNCTION_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_DROPPABLE_TOOL_KEYS = frozenset({"defer_loading", "output_schema", "allowed_callers"})
# Tools a translation leaves out rather than refusing the call (see `tools`).
_DROPPABLE_TOOLS = frozenset({"web_search", "web_search_preview", "namespace"})
_TOOL_CHOICES = {
    "none": ToolChoiceMode.NONE,
    "auto": ToolChoiceMode.AUTO,
    "required": ToolChoiceMode.ANY,
}
_REASONING_SUMMARIES = frozenset({"auto", "concise", "detailed"})
# include entries: what the encoder always gives, and what no translation can.
_ALWAYS_INCLUDED = frozenset({"reasoning.encrypted_content"})
_NEVER_INCLUDED = frozenset({"message.output_text.logprobs"})
# The request settings a Response object repeats, when the request set them.
_ECHOED = [
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
    "store",
    "temperature",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
]
_DIRECT_CALLER = {"type": "direct"}


@dataclass(slots=True)
class DecodedResponses:
    """A valid Responses request: the internal request, and what it cannot carry.

    `untranslatable` is empty when a deployment outside OpenAI's API may serve
    `request` faithfully; otherwise it names every field or item that would
    be lost. `dropped` names the hints a translation leaves out. `echo` holds
    the settings the Response object repeats (ResponsesStreamEncoder's
    `request_echo`).
    """

    request: GenerationRequest
    stream: bool
    untranslatable: list[FieldViolation]
    dropped: list[str] = field(default_factory=list)
    echo: dict[str, Any] = field(default_factory=dict)


def decode_responses(
    body: object, *, request_id: str, deadline: float | None, text_checked: bool = False
) -> DecodedResponses:
    """Validates a Responses request body (parsed JSON); raises InvalidArgumentError.

    `text_checked`: the body's bytes hold no lone surrogate (json_decoding.py).
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    if not text_checked:
        refuse_lone_surrogates(body)
    d = _BodyDecoder()
    d.extras(body, _REQUEST_KEYS, "", _DROPPABLE_REQUEST_KEYS)
    refuse_unpriced_tier(d, body)
    d.stateless(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        d.bad("model", "must be a non-empty string naming a model")
        model = ""
    stream = d.boolean(body, "stream")
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        d.bad("max_output_tokens", "must be a positive integer")
        max_tokens = None
    instructions = body.get("instructions")
    system: list[TextBlock] = []
    if isinstance(instructions, str):
        if instructions:
            system.append(TextBlock(instructions))
    elif instructions is not None:
        d.bad("instructions", "must be a string")
    messages = d.conversation(body.get("input"))
    system += d.system
    tools, names = d.tools(body.get("tools"))
    tool_choice = d.tool_choice(body.get("tool_choice"), names)
    if d.boolean(body, "parallel_tool_calls", default=True) is False:
        tool_choice = tool_choice or ToolChoice()
        tool_choice.disable_parallel_tool_use = True
    temperature = d.number(body, "temperature", MAX_TEMPERATURE)
    top_p = d.number(body, "top_p", 1.0)
    budget = d.reasoning(body.get("reasoning"), max_tokens or 0)
    d.output_options(body)
    end_user = d.end_user(body)
    d.raise_if_invalid()
    request = GenerationRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens or 0,
        request_id=request_id,
        system=system,
        tools=tools,
        tool_choice=tool_choice,
        temperature=temperature,
        top_p=top_p,
        thinking_budget_tokens=budget,
        metadata=CallerMetadata(end_user_id=end_user),
        incremental=stream,
        deadline=deadline,
    )
    return DecodedResponses(request, stream, d.untranslatable, d.dropped, _echo(body))


def fit_max_tokens(request: GenerationRequest, max_tokens: int) -> None:
    """Sets a request's max_tokens, keeping its thinking budget below it.

    For a request that came without `max_output_tokens` (max_tokens 0), once
    the adapter knows the model. OpenAI puts no other limit on an answer
    than the context window, so the model's largest output suits best.
    """
    request.max_tokens = max_tokens
    if request.thinking_budget_tokens is not None:
        request.thinking_budget_tokens = _fit_budget(request.thinking_budget_tokens, max_tokens)


def _fit_budget(budget: int, max_tokens: int) -> int | None:
    """The budget, below max_tokens (0: not known yet); None when thinking cannot fit."""
    if max_tokens and budget >= max_tokens:
        budget = max_tokens - 1
    return budget if budget >= MIN_THINKING_BUDGET else None


def _echo(body: dict[str, Any]) -> dict[str, Any]:
    echo = {key: body[key] for key in _ECHOED if body.get(key) is not None}
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        summary = reasoning.get("summary")
        echo["reasoning"] = {
            "effort": reasoning.get("effort"),
            "summary": summary
            if isinstance(summary, str) and summary in _REASONING_SUMMARIES
            else None,
        }
    text = body.get("text")
    if isinstance(text, dict):
        echo["text"] = text
    return echo


class _BodyDecoder(FieldCollector):
    """Builds internal values while collecting every violation it meets."""

    __slots__ = ("call_ids", "messages", "system")

    UNTRANSLATABLE = UNTRANSLATABLE

    @staticmethod
    def empty(value: Any) -> bool:
        """None, false, [] and {}: a field left out, or a flag left off."""
        return _empty(value)

    def __init__(self) -> None:
        super().__init__()
        self.system: list[TextBlock] = []  # system and developer messages, in order
        self.messages: list[Message] = []
        self.call_ids: set[str] = set()

    # -- the request ---------------------------------------------------------

    def stateless(self, body: dict[str, Any]) -> None:
        """Refuses what needs state the gateway does not keep."""
        if body.get("previous_response_id") is not None:
            self.bad("previous_response_id", f"is not supported: {STATELESS}")
        if body.get("conversation") is not None:
            self.bad("conversation", f"is not supported: {STATELESS}")
        if body.get("store") is True:
            self.bad("store", f"true is not supported: {STATELESS}; send store: false")
        elif body.get("store") is not None and body["store"] is not False:
            self.bad("store", "must be a boolean")
        if body.get("background") is True:
            self.bad("background", "true is not supported: this gateway keeps no responses to poll")
        elif body.get("background") not in (None, False):
            self.bad("background", "must be a boolean")

    def boolean(self, body: dict[str, Any], key: str, *, default: bool = False) -> bool:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(key, "must be a boolean")
            return default
        return value

    def number(self, body: dict[str, Any], key: str, top: float) -> float | None:
        value = body.get(key)
        if value is None:
            return None
        if not is_number(value) or not 0 <= value <= top:
            self.bad(key, f"must be a number from 0 to {top:g}")
            return None
        return float(value)

    def reasoning(self, value: Any, max_tokens: int) -> int | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.bad("reasoning", "must be an object")
            return None
        self.extras(
            value,
            frozenset({"effort", "summary", "generate_summary"}),
            "reasoning",
            frozenset({"context", "mode"}),
        )
        for key in ("summary", "generate_summary"):
            summary = value.get(key)
            if summary is not None:
                if not isinstance(summary, str):
                    self.bad(f"reasoning.{key}", "must be a string")
                elif summary != "none":
                    # The thinking comes back as the reasoning's summary, whatever was asked.
                    self.dropped.append(f"reasoning.{key}")
        effort = value.get("effort")
        if effort is None:
            return None
        if not isinstance(effort, str) or effort not in EFFORT_BUDGETS:
            self.bad("reasoning.effort", f"must be one of {', '.join(EFFORT_BUDGETS)}")
            return None
        budget = EFFORT_BUDGETS[effort]
        if budget is None:
            return None
        fitted = _fit_budget(budget, max_tokens)
        if fitted is None:
            self.dropped.append("reasoning.effort")  # max_output_tokens leaves no room
        return fitted

    def output_options(self, body: dict[str, Any]) -> None:
        """`text`, `include`, `truncation` and `top_logprobs`: what the answer looks like."""
        text = body.get("text")
        if isinstance(text, dict):
            self.extras(text, frozenset({"format"}), "text", frozenset({"verbosity"}))
            output_format = text.get("format")
            if output_format is not None:
                kind = output_format.get("type") if isinstance(output_format, dict) else None
                if not isinstance(kind, str):
                    self.bad("text.format", 'must be an object with a "type"')
                elif kind != "text":
                    self.unsupported("text.format", f"{kind!r} output {UNTRANSLATABLE}")
        elif text is not None:
            self.bad("text", "must be an object")
        include = body.get("include")
        if isinstance(include, list):
            for i, entry in enumerate(include):
                if not isinstance(entry, str):
                    self.bad(f"include[{i}]", "must be a string")
                elif entry in _NEVER_INCLUDED:
                    self.unsupported(f"include[{i}]", f"{entry!r} {UNTRANSLATABLE}")
                elif entry not in _ALWAYS_INCLUDED:
                    self.dropped.append(f"include[{i}]")
        elif include is not None:
            self.bad("include", "must be an array of strings")
        truncation = body.get("truncation")
        if truncation == "auto":
            # OpenAI would cut the conversation's middle to fit; a translation fails instead.
            self.dropped.append("truncation")
        elif truncation not in (None, "disabled"):
            self.bad("truncation", 'must be "auto" or "disabled"')
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None:
            if not is_int(top_logprobs) or top_logprobs < 0:
                self.bad("top_logprobs", "must be a non-negative integer")
            elif top_logprobs:
                self.unsupported("top_logprobs")

    def end_user(self, body: dict[str, Any]) -> str:
        """The end-user id. `metadata` and `prompt_cache_key`, which the Response
        repeats, are checked (and dropped)."""
        metadata = body.get("metadata")
        if isinstance(metadata, dict):
            if any(not isinstance(v, str) for v in metadata.values()):
                self.bad("metadata", "must map keys to strings")
            elif metadata:
                self.dropped.append("metadata")
        elif metadata is not None:
            self.bad("metadata", "must be an object")
        cache_key = body.get("prompt_cache_key")
        if cache_key is not None and not isinstance(cache_key, str):
            self.bad("prompt_cache_key", "must be a string")
        found = ""
        for key in ("user", "safety_identifier"):  # the later one wins
            value = body.get(key)
            if isinstance(value, str):
                found = value or found
            elif value is not None:
                self.bad(key, "must be a string")
        return found

    # -- input ---------------------------------------------------------------

    def conversation(self, value: Any) -> list[Message]:
        if isinstance(value, str):
            if not value:
                self.bad("input", "must not be empty")
            return [Message(Role.USER, [TextBlock(value)])]
        if not isinstance(value, list) or not value:
            self.bad("input", "must be a non-empty string or array of input items")
            return []
        if len(value) > MAX_ITEMS:
            self.bad("input", f"must hold at most {MAX_ITEMS} items")
            return []
        for i, item in enumerate(value):
            self.item(item, f"input[{i}]")
        if not self.messages:
            # OpenAI answers instructions alone; other APIs need a message to answer.
            self.unsupported("input", f"input without user or assistant items {UNTRANSLATABLE}")
        return self.messages

    def add(self, role: Role, blocks: list[ContentBlock]) -> None:
        """Appends blocks to the conversation: to the last message when it is `role`'s."""
        if not blocks:
            return
        if self.messages and self.messages[-1].role is role:
            self.messages[-1].content.extend(blocks)
        else:
            self.messages.append(Message(role, blocks))

    def item(self, item: Any, path: str) -> None:
        if not isinstance(item, dict):
            self.bad(path, "must be an input item object")
            return
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            self.bad(path, 'must be an input item: an object with a "type" or a "role"')
        elif kind == "message":
            self.message(item, path)
        elif kind == "function_call":
            self.function_call(item, path)
        elif kind == "function_call_output":
            self.function_call_output(item, path)
        elif kind == "reasoning":
            self.reasoning_item(item, path)
        elif kind == "item_reference":
            self.bad(path, f"item_reference items are not supported: {STATELESS}")
        else:
            # Calls and outputs of other tools (custom, shell, web search...),
            # compactions: kept as their JSON so that the estimate counts them.
            self.unsupported(path, f"{kind!r} items {UNTRANSLATABLE}")
            role = Role.USER if kind.endswith("_output") else Role.ASSISTANT
            self.add(role, [TextBlock(compact(item))])

    def message(self, item: dict[str, Any], path: str) -> None:
        self.extras(item, _MESSAGE_KEYS, path, frozenset({"phase"}))
        role_name, content = item.get("role"), item.get("content")
        system = isinstance(role_name, str) and role_name in _SYSTEM_ROLES
        role = _ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None and not system:
            self.bad(f"{path}.role", 'must be "user", "assistant", "system" or "developer"')
            return
        blocks: list[TextBlock | ImageBlock]
        if isinstance(content, str):
            blocks = [TextBlock(content)] if content else []
        elif isinstance(content, list):
            blocks = self.parts(content, f"{path}.content", role)
        else:
            self.bad(f"{path}.content", "must be a string or an array of content parts")
            return
        if system or role is None:
            for j, block in enumerate(blocks):
                if isinstance(block, TextBlock):
                    self.system.append(block)
                else:
                    self.unsupported(
                        f"{path}.content[{j}]", f"images in {role_name} messages {UNTRANSLATABLE}"
                    )
            return
        self.add(role, list(blocks))

    def parts(self, raw: list[Any], path: str, role: Role | None) -> list[TextBlock | ImageBlock]:
        blocks: list[TextBlock | ImageBlock] = []
        for j, part in enumerate(raw):
            part_path = f"{path}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                self.bad(part_path, 'must be a content part: an object with a "type"')
                continue
            if kind not in _PART_KEYS:
                # Files and audio: counted as their JSON, a base64 payload left out.
                self.unsupported(part_path, f"{kind!r} parts {UNTRANSLATABLE}")
                blocks.append(TextBlock(compact(_without_payload(part))))
                continue
            self.extras(part, _PART_KEYS[kind], part_path, _DROPPABLE_PART_KEYS)
            cache = self.breakpoint(part, part_path)
            if kind == "input_image":
                if role is Role.ASSISTANT:
                    self.bad(part_path, "input_image parts belong in user messages")
                blocks.append(self.image(part, part_path, cache))
                continue
            key = _TEXT_PARTS[kind]
            text = part.get(key)
            if not isinstance(text, str):
                self.bad(f"{part_path}.{key}", "must be a string")
            elif text:
                blocks.append(TextBlock(text, cache))
        return blocks

    def image(self, part: dict[str, Any], path: str, cache: CacheControl | None) -> ImageBlock:
        detail = part.get("detail")
        if detail not in (None, "auto"):
            if not isinstance(detail, str):
                self.bad(f"{path}.detail", "must be a string")
            else:
                self.dropped.append(f"{path}.detail")
        url = part.get("image_url")
        if url is None:
            if part.get("file_id") is not None:
                self.unsupported(f"{path}.file_id", f"file ids {UNTRANSLATABLE}")
            else:
                self.bad(f"{path}.image_url", "is required (an http(s) or data: URL)")
            return ImageBlock(cache_control=cache)  # counted as an image
        if not isinstance(url, str):
            self.bad(f"{path}.image_url", "must be a string")
        elif url.startswith(("https://", "http://")):
            return ImageBlock(url=url, cache_control=cache)
        elif url.startswith("data:"):
            media_type, data = _data_url(url)
            if media_type not in IMAGE_MEDIA_TYPES:
                self.bad(
                    f"{path}.image_url",
                    f"must be a base64 data URL of {', '.join(sorted(IMAGE_MEDIA_TYPES))}",
                )
            elif data is None:
                self.bad(f"{path}.image_url", "must hold valid base64")
            else:
                return ImageBlock(data=data, media_type=media_type, cache_control=cache)
        else:
            self.bad(f"{path}.image_url", "must be an http(s) or data: URL")
        return ImageBlock(cache_control=cache)

    def breakpoint(self, part: dict[str, Any], path: str) -> CacheControl | None:
        value = part.get("prompt_cache_breakpoint")
        if value is None:
            return None
        name = f"{path}.prompt_cache_breakpoint"
        if not isinstance(value, dict) or value.get("mode") != "explicit":
            self.bad(name, 'must be {"mode": "explicit"}, with an optional ttl')
            return None
        ttl = value.get("ttl")
        if ttl is None:
            return CacheControl()
        seconds = CACHE_TTLS.get(ttl) if isinstance(ttl, str) else None
        if seconds is None:
            self.bad(f"{name}.ttl", 'must be "30m" or "12h"')
            return None
        return CacheControl(seconds)

    def function_call(self, item: dict[str, Any], path: str) -> None:
        self.extras(item, _CALL_KEYS, path, frozenset({"namespace"}))
        self.caller(item, path)
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not isinstance(call_id, str) or not call_id:
            self.bad(f"{path}.call_id", "must be a non-empty string")
            call_id = ""
        elif call_id in self.call_ids:
            self.bad(f"{path}.call_id", f"duplicate call_id {call_id!r}")
        self.call_ids.add(call_id)
        if not isinstance(name, str) or not name:
            self.bad(f"{path}.name", "must be a non-empty string")
            name = ""
        parsed: dict[str, Any] = {}
        if not isinstance(arguments, str):
            self.bad(f"{path}.arguments", "must be a string of JSON")
        elif arguments.strip():
            value = _parse_json(arguments)
            if isinstance(value, dict):
                parsed = value
            else:
                # Valid for OpenAI, which keeps the string; a tool use needs an object.
                self.unsupported(
                    f"{path}.arguments", f"arguments that are not a JSON object {UNTRANSLATABLE}"
                )
        self.add(Role.ASSISTANT, [ToolUseBlock(call_id, name, parsed)])

    def function_call_output(self, item: dict[str, Any], path: str) -> None:
        self.extras(item, _OUTPUT_KEYS, path)
        self.caller(item, path)
        call_id, output = item.get("call_id"), item.get("output")
        if call_id is None:
            self.unsupported(f"{path}.call_id", f"an output without a call_id {UNTRANSLATABLE}")
            call_id = ""
        elif not isinstance(call_id, str) or not call_id:
            self.bad(f"{path}.call_id", "must be a non-empty string")
            call_id = ""
        elif call_id not in self.call_ids:
            self.bad(f"{path}.call_id", f"no earlier function_call has call_id {call_id!r}")
        content: list[TextBlock | ImageBlock] = []
        if isinstance(output, str):
            if output:
                content.append(TextBlock(output))
        elif isinstance(output, list):
            content = self.parts(output, f"{path}.output", Role.USER)
        else:
            self.bad(f"{path}.output", "must be a string or an array of content parts")
        self.add(Role.USER, [ToolResultBlock(call_id, content)])

    def caller(self, item: dict[str, Any], path: str) -> None:
        caller = item.get("caller")
        if caller is not None and caller != _DIRECT_CALLER:
            self.unsupported(f"{path}.caller")

    def reasoning_item(self, item: dict[str, Any], path: str) -> None:
        self.extras(item, _REASONING_KEYS, path)
        summary, sealed = item.get("summary"), item.get("encrypted_content")
        if summary is not None and not isinstance(summary, list):
            self.bad(f"{path}.summary", "must be an array of summary parts")
        if sealed is not None and not isinstance(sealed, str):
            self.bad(f"{path}.encrypted_content", "must be a string")
            return
        block: ThinkingBlock | None = None
        if sealed:
            try:
                block = open_thinking(sealed)
            except ValueError:
                self.bad(f"{path}.encrypted_content", "is not the reasoning this gateway sealed")
                return
        if block is None:
            # OpenAI's encrypted reasoning, or a summary alone: nothing another
            # provider can take as the model's own thinking.
            self.dropped.append(path)
            return
        self.add(Role.ASSISTANT, [block])

    # -- tools ---------------------------------------------------------------

    def tools(self, value: Any) -> tuple[list[Tool], set[str]]:
        """The tools, and the names of the function tools."""
        names: set[str] = set()
        if value is None:
            return [], names
        if not isinstance(value, list):
            self.bad("tools", "must be an array of tools")
            return [], names
        decoded: list[Tool] = []
        for i, tool in enumerate(value):
            path = f"tools[{i}]"
            kind = tool.get("type") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or not isinstance(kind, str):
                self.bad(path, 'must be a tool: an object with a "type"')
                continue
            if kind in _DROPPABLE_TOOLS:
                # Offered by Codex on every request (web search, its sub-agents'
                # namespace): a translated model works without them, as the
                # model it stands for would with the feature off.
                self.dropped.append(path)
                continue
            if kind != "function":
                # A tool only OpenAI runs or grammars (custom, shell, file search...):
                # kept as a tool described by its JSON, for the estimate.
                self.unsupported(path, f"{kind!r} tools {UNTRANSLATABLE}")
                label = tool.get("name")
                decoded.append(
                    Tool(label if isinstance(label, str) and label else kind, compact(tool))
                )
                continue
            self.extras(tool, _FUNCTION_TOOL_KEYS, path, _DROPPABLE_TOOL_KEYS)
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                self.bad(f"{path}.name", "must be a non-empty string")
                name = ""
            elif name in names:
                self.bad(f"{path}.name", f"duplicate tool name {name!r}")
            names.add(name)
            description = tool.get("description")
            if description is not None and not isinstance(description, str):
                self.bad(f"{path}.description", "must be a string")
                description = None
            schema = tool.get("parameters")
            if schema is None:
                schema = {"type": "object", "properties": {}}
            elif not isinstance(schema, dict):
                self.bad(f"{path}.parameters", "must be a JSON schema object")
                schema = {}
            strict = tool.get("strict")
            if strict is True:
                self.dropped.append(f"{path}.strict")
            elif strict is not None and strict is not False:
                self.bad(f"{path}.strict", "must be a boolean")
            decoded.append(Tool(name, description or "", schema))
        return decoded, names

    def tool_choice(self, value: Any, names: set[str]) -> ToolChoice | None:
        if value is None:
            return None
        if isinstance(value, str):
            mode = _TOOL_CHOICES.get(value)
            if mode is None:
                self.bad("tool_choice", 'must be "none", "auto", "required" or an object')
                return None
            if mode is ToolChoiceMode.ANY and not names:
                self.bad("tool_choice", '"required" needs at least one function tool in tools')
            return ToolChoice(mode)
        kind = value.get("type") if isinstance(value, dict) else None
        if not isinstance(value, dict) or not isinstance(kind, str):
            self.bad("tool_choice", 'must be "none", "auto", "required" or an object with a "type"')
            return None
        if kind != "function":
            self.unsupported("tool_choice", f"{kind!r} tool choices {UNTRANSLATABLE}")
            return None
        self.extras(value, frozenset({"type", "name"}), "tool_choice")
        name = value.get("name")
        if not isinstance(name, str) or not name:
            self.bad("tool_choice.name", "must name a function tool")
            return None
        if name not in names:
            self.bad("tool_choice.name", f"no function tool named {name!r} in tools")
        return ToolChoice(ToolChoiceMode.TOOL, name)


def _data_url(url: str) -> tuple[str, bytes | None]:
    """A `data:<media type>;base64,<data>` URL's media type and bytes (None: bad base64)."""
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        return "", None
    media_type = head[len("data:") : -len(";base64")].split(";")[0].strip().lower()
    try:
        return media_type, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):  # a character outside ASCII is a ValueError
        return media_type, None


def _parse_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # digits past the int limit, deep nesting
        return None


def _without_payload(part: dict[str, Any]) -> dict[str, Any]:
    """A file or audio part without its base64, which would count a token per 4 characters."""
    return {k: ("" if k in ("file_data", "data", "input_audio") else v) for k, v in part.items()}


def _empty(value: Any) -> bool:
    """None, false, [] and {}: a field left out, or a flag left off."""
    return value is None or value is False or (isinstance(value, list | dict) and not value)
