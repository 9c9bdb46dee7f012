"""A Chat Completions body (`POST /v1/chat/completions`) as the gateway's internal request.

The HTTP front door's protocol adapter for OpenAI's Chat JSON, in one pass
over the parsed body, built like messages_decoding.py: every hard problem
(no model, a part of the wrong shape, `n` > 1, a sampling value out of
OpenAI's range) is a field violation named by its path
(`messages[2].content[1].image_url.url`), all raised together as
InvalidArgumentError.

A route to an OpenAI or OpenAI-compatible deployment relays the body as it
came; any other route (Anthropic, the offline models) serves the decoded
request. What is valid Chat but has no internal equivalent (audio, files,
logprobs, penalties, `logit_bias`, `response_format` other than text, legacy
`functions`, custom tools, any field this module does not know) is listed in
`untranslatable`, for the adapter to refuse on a translated route. Hints
that only tune how OpenAI serves or stores a call (`store`, `metadata`,
`service_tier`, prompt-cache keys and retention, `seed`, `verbosity`, an
image's `detail`, a tool's `strict`, a participant's `name`, reasoning text
sent back in an assistant message) are listed in `dropped`: the answer
means the same without them. As in the Messages decoder, an untranslatable
part stands in the request as a TextBlock of its compact JSON (a base64
payload left out and counted as an image) so the token estimate counts it.

Where Chat and the internal request differ in shape:

- `system` and `developer` messages, wherever they stand, become system
  blocks, in order. `tool` messages become tool results in one user turn
  (Anthropic wants every result of a turn in the user message after it); a
  user message right after them joins that turn, after the results.
- A tool call's `arguments` (a JSON string) become the tool use's input
  object; a string that is not a JSON object is a violation.
- `max_completion_tokens` (else `max_tokens`) is max_tokens. When neither is
  given, max_tokens is left 0: the adapter fills in the model's default with
  fill_max_tokens, which also fits the thinking budget under it.
- `reasoning_effort` is a thinking budget (REASONING_BUDGETS; "none" is no
  thinking), kept below max_tokens; when fewer than 1024 tokens (Anthropic's
  least budget) would be left for it, the request has no thinking and
  `reasoning_effort` is listed in `dropped`.
- A part's `prompt_cache_breakpoint` (OpenAI's explicit cache mark, 30m or
  12h) or `cache_control` (the Anthropic-style mark that clients aiming at
  Claude through OpenAI's format send) is a CacheControl.
- `safety_identifier` (else `user`) is the end-user id.
"""

from __future__ import annotations

import base64
import json
import re
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
from server.schema import (
    CacheControl,
    CallerMetadata,
    ContentBlock,
    GenerationRequest,
    ImageBlock,
    Message,
    Role,
    TextBlock,
    Tool,
    ToolChoice,
    ToolChoiceMode,
    ToolResultBlock,
    ToolUseBlock,
)

UNTRANSLATABLE = "cannot be translated for a model served outside an OpenAI-compatible API"
IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_MESSAGES = 100_000
MAX_TEMPERATURE = 2.0
MIN_THINKING_BUDGET = 1024
# reasoning_effort -> thinking budget. Chosen so that the OpenAI provider's
# reverse mapping (_openai_codec.reasoning_effort) gives the same effort back
# (minimal excepted: it has no budget of its own there).
REASONING_BUDGETS = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 65536,
    "max": 131072,
}
# Cache lifetimes: Anthropic-style `cache_control.ttl`, OpenAI's breakpoint `ttl`.
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0, "30m": 1800.0, "12h": 43200.0}

_REQUEST_KEYS = frozenset(
    [
        "model",
        "messages",
        "stream",
        "stream_options",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "user",
        "safety_identifier",
        "response_format",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "modalities",
    ]
)
# They tune how OpenAI serves, stores or caches a call; the answer means the same.
_DROPPABLE_REQUEST_KEYS = frozenset(
    [
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "seed",
        "verbosity",
    ]
)
_STREAM_OPTION_KEYS = frozenset({"include_usage", "include_obfuscation"})
_SYSTEM_KEYS = frozenset({"role", "content"})
_USER_KEYS = frozenset({"role", "content"})
_TOOL_MESSAGE_KEYS = frozenset({"role", "content", "tool_call_id"})
_ASSISTANT_KEYS = frozenset({"role", "content", "tool_calls", "refusal"})
# `name` labels a participant; `reasoning_content` is an answer's reasoning text
# sent back (without the signature a Claude model would need to take it back);
# `annotations` are an answer's citations.
_DROPPABLE_MESSAGE_KEYS = frozenset({"name", "reasoning_content", "annotations"})
_CACHE_KEYS = frozenset({"cache_control", "prompt_cache_breakpoint"})
_TEXT_PART_KEYS = frozenset({"type", "text"}) | _CACHE_KEYS
_IMAGE_PART_KEYS = frozenset({"type", "image_url"}) | _CACHE_KEYS
_IMAGE_URL_KEYS = frozenset({"url", "detail"})
_TOOL_CALL_KEYS = frozenset({"id", "type", "function"})
_FUNCTION_CALL_KEYS = frozenset({"name", "arguments"})
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters"})
_IMAGE_DETAILS = frozenset({"auto", "low", "high", "original"})
_TOOL_CHOICES = {
    "none": ToolChoiceMode.NONE,
    "auto": ToolChoiceMode.AUTO,
    "required": ToolChoiceMode.ANY,
}
_ROLES = '"system", "developer", "user", "assistant" or "tool"'
# Where a part carries a base64 payload that the estimate counts as an image.
_PAYLOADS = {"input_audio": ("input_audio", "data"), "file": ("file", "file_data")}


@dataclass(slots=True)
class DecodedChat:
    """A valid Chat Completions request: the internal request, and what it cannot carry.

    `request.max_tokens` is 0 when the body gave no limit (see
    fill_max_tokens). `include_usage` is `stream_options.include_usage`: the
    stream then ends with a usage chunk. `untranslatable` is empty when a
    deployment outside OpenAI's API may serve `request` faithfully;
    otherwise it names every field that would be lost. `dropped` names the
    hints a translation leaves out.
    """

    request: GenerationRequest
    stream: bool
    include_usage: bool
    untranslatable: list[FieldViolation]
    dropped: list[str] = field(default_factory=list)


def decode_chat(
    body: object, *, request_id: str, deadline: float | None, text_checked: bool = False
) -> DecodedChat:
    """Validates a Chat Completions request body (parsed JSON); raises InvalidArgumentError.

    `text_checked`: the body's bytes hold no lone surrogate (json_decoding.py).
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError([FieldViolation("body", "must be a JSON object")])
    if not text_checked:
        refuse_lone_surrogates(body)
    d = _BodyDecoder()
    d.extras(body, _REQUEST_KEYS, "", _DROPPABLE_REQUEST_KEYS)
    refuse_unpriced_tier(d, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        d.bad("model", "must be a non-empty string naming a model")
        model = ""
    system, messages = d.messages(body.get("messages"))
    tools, names = d.tools(body.get("tools"))
    tool_choice = d.tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), names)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        d.bad("stream", "must be a boolean")
    include_usage = d.stream_options(body.get("stream_options"))
    n = body.get("n")
    choices = 1
    if n is not None:
        if not is_int(n) or n < 1:
            d.bad("n", "must be a positive integer")
        elif n > 1:
            # An OpenAI deployment gives n choices (relayed, reserved n times);
            # a translation can give one.
            choices = n
            d.unsupported("n", f"n > 1 {UNTRANSLATABLE}")
    max_tokens = d.max_tokens(body)
    temperature = d.number(body, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = d.number(body, "top_p", 0.0, 1.0)
    d.options(body)
    budget = d.thinking_budget(body.get("reasoning_effort"), max_tokens)
    stop_sequences = d.stop(body.get("stop"))
    end_user_id = d.end_user(body)
    d.raise_if_invalid()
    return DecodedChat(
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
            stop_sequences=stop_sequences,
            thinking_budget_tokens=budget,
            metadata=CallerMetadata(end_user_id=end_user_id),
            incremental=bool(stream),
            deadline=deadline,
            choices=choices,
        ),
        bool(stream),
        include_usage,
        d.untranslatable,
        d.dropped,
    )


def fill_max_tokens(decoded: DecodedChat, default_max_tokens: int) -> None:
    """Gives a request that named no limit the model's default, and fits thinking under it."""
    request = decoded.request
    if request.max_tokens > 0:
        return
    request.max_tokens = default_max_tokens
    budget = request.thinking_budget_tokens
    if budget is not None:
        request.thinking_budget_tokens = _fit_budget(budget, default_max_tokens)
        if request.thinking_budget_tokens is None:
            decoded.dropped.append("reasoning_effort")


def _fit_budget(budget: int, max_tokens: int) -> int | None:
    fitted = min(budget, max_tokens - 1)
    return fitted if fitted >= MIN_THINKING_BUDGET else None


class _BodyDecoder(FieldCollector):
    """Builds internal values while collecting every violation it meets."""

    __slots__ = ()

    UNTRANSLATABLE = UNTRANSLATABLE

    def __init__(self) -> None:
        super().__init__()

    # -- the request ---------------------------------------------------------

    def stream_options(self, value: Any) -> bool:
        if value is None:
            return False
        if not isinstance(value, dict):
            self.bad("stream_options", "must be an object")
            return False
        # include_obfuscation only pads chunks; a translated stream has no padding.
        self.extras(value, _STREAM_OPTION_KEYS, "stream_options")
        for key in _STREAM_OPTION_KEYS:
            if value.get(key) is not None and not isinstance(value[key], bool):
                self.bad(f"stream_options.{key}", "must be a boolean")
        return value.get("include_usage") is True

    def max_tokens(self, body: dict[str, Any]) -> int:
        """max_completion_tokens, else max_tokens; 0 when neither is given."""
        chosen = 0
        for key in ("max_tokens", "max_completion_tokens"):  # the second wins
            value = body.get(key)
            if value is None:
                continue
            if not is_int(value) or value < 1:
                self.bad(key, "must be a positive integer")
            else:
                chosen = value
        return chosen

    def number(self, body: dict[str, Any], key: str, low: float, high: float) -> float | None:
        value = body.get(key)
        if value is None:
            return None
        if not is_number(value) or not low <= value <= high:
            self.bad(key, f"must be a number from {low:g} to {high:g}")
            return None
        return float(value)

    def options(self, body: dict[str, Any]) -> None:
        """The fields a translation can honour only at their neutral value."""
        for key in ("frequency_penalty", "presence_penalty"):
            if self.number(body, key, -2.0, 2.0):  # 0 changes nothing
                self.unsupported(key)
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            self.bad("logprobs", "must be a boolean")
        elif logprobs:
            self.unsupported("logprobs")
        top_logprobs = body.get("top_logprobs")
        if top_logprobs is not None:
            if not is_int(top_logprobs) or not 0 <= top_logprobs <= 20:
                self.bad("top_logprobs", "must be an integer from 0 to 20")
            elif top_logprobs:
                self.unsupported("top_logprobs")
        modalities = body.get("modalities")
        if modalities is not None:
            if not isinstance(modalities, list) or not all(
                m in ("text", "audio") for m in modalities
            ):
                self.bad("modalities", 'must be an array of "text" and "audio"')
            elif "audio" in modalities:
                self.unsupported("modalities", f"audio output {UNTRANSLATABLE}")
        response_format = body.get("response_format")
        if response_format is not None:
            kind = response_format.get("type") if isinstance(response_format, dict) else None
            if kind in ("json_object", "json_schema"):
                # The internal request has no place for an output format, and
                # a forced tool would answer in a tool call, not in content.
                self.unsupported("response_format", f"{kind!r} {UNTRANSLATABLE}")
            elif kind != "text":
                self.bad("response_format.type", 'must be "text", "json_object" or "json_schema"')

    def thinking_budget(self, value: Any, max_tokens: int) -> int | None:
        if value is None or value == "none":
            return None
        budget = REASONING_BUDGETS.get(value) if isinstance(value, str) else None
        if budget is None:
            efforts = ", ".join(f'"{e}"' for e in ("none", *REASONING_BUDGETS))
            self.bad("reasoning_effort", f"must be one of {efforts}")
            return None
        if max_tokens == 0:
            return budget  # fitted by fill_max_tokens
        fitted = _fit_budget(budget, max_tokens)
        if fitted is None:
            self.dropped.append("reasoning_effort")
        return fitted

    def stop(self, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value] if value else []
        if not isinstance(value, list):
            self.bad("stop", "must be a string or an array of strings")
            return []
        for i, sequence in enumerate(value):
            if not isinstance(sequence, str):
                self.bad(f"stop[{i}]", "must be a string")
        # An empty sequence stops nothing (and Anthropic refuses one).
        return [s for s in value if isinstance(s, str) and s]

    def end_user(self, body: dict[str, Any]) -> str:
        chosen = ""
        for key in ("user", "safety_identifier"):  # the second wins
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                self.bad(key, "must be a string")
            elif value:
                chosen = value
        return chosen

    # -- messages ------------------------------------------------------------

    def messages(self, value: Any) -> tuple[list[TextBlock], list[Message]]:
        """The system blocks and the conversation."""
        system: list[TextBlock] = []
        out: list[Message] = []
        if not isinstance(value, list) or not value:
            self.bad("messages", "must be a non-empty array of messages")
            return system, out
        if len(value) > MAX_MESSAGES:
            self.bad("messages", f"must hold at most {MAX_MESSAGES} messages")
            return system, out
        # The calls of the last assistant message not answered yet: id -> its path.
        pending: dict[str, str] = {}
        known_ids: set[str] = set()
        for i, raw in enumerate(value):
            path = f"messages[{i}]"
            role = raw.get("role") if isinstance(raw, dict) else None
            if not isinstance(raw, dict) or not isinstance(role, str):
                self.bad(path, 'must be an object with a "role"')
                continue
            content = raw.get("content")
            if role in ("system", "developer"):
                self.extras(raw, _SYSTEM_KEYS, path, _DROPPABLE_MESSAGE_KEYS)
                system.extend(self.text_parts(content, f"{path}.content"))
                continue
            if role == "tool":
                self.extras(raw, _TOOL_MESSAGE_KEYS, path, _DROPPABLE_MESSAGE_KEYS)
                _append(out, Role.USER, [self.tool_result(raw, path, pending)])
                continue
            self.unanswered(pending)
            if role == "user":
                self.extras(raw, _USER_KEYS, path, _DROPPABLE_MESSAGE_KEYS)
                _append(out, Role.USER, self.user_content(content, f"{path}.content"))
            elif role == "assistant":
                self.extras(raw, _ASSISTANT_KEYS, path, _DROPPABLE_MESSAGE_KEYS)
                blocks = self.assistant(raw, path, pending, known_ids)
                _append(out, Role.ASSISTANT, blocks)
            elif role == "function":
                # Legacy function results: their calls were `function_call`s, which
                # carry no id to pair them with. Kept as text for the estimate.
                self.unsupported(path, f"legacy function messages {UNTRANSLATABLE}")
                _append(out, Role.USER, [TextBlock(compact(raw))])
            else:
                self.bad(f"{path}.role", f"must be {_ROLES}")
        if not out and not self.violations:
            self.unsupported("messages", f"a conversation of instructions alone {UNTRANSLATABLE}")
        return system, out

    def unanswered(self, pending: dict[str, str]) -> None:
        """Tool calls left without a tool message when the conversation moves on."""
        for call_id, path in pending.items():
            self.bad(path, f"tool call {call_id!r} has no tool message answering it")
        pending.clear()

    def text_parts(self, content: Any, path: str) -> list[TextBlock]:
        """A string, or an array of text parts (system, developer and tool messages)."""
        if isinstance(content, str):
            return [TextBlock(content)] if content else []
        if not isinstance(content, list):
            self.bad(path, "must be a string or an array of text parts")
            return []
        blocks: list[TextBlock] = []
        for j, part in enumerate(content):
            part_path = f"{path}[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                self.bad(part_path, 'must be a text part: {"type": "text", "text": ...}')
                continue
            block = self.text(part, part_path)
            if block is not None:
                blocks.append(block)
        return blocks

    def text(self, part: dict[str, Any], path: str) -> TextBlock | None:
        self.extras(part, _TEXT_PART_KEYS, path)
        cache = self.cache(part, path)
        text = part.get("text")
        if not isinstance(text, str):
            self.bad(f"{path}.text", "must be a string")
            return None
        return TextBlock(text, cache) if text else None

    def user_content(self, content: Any, path: str) -> list[ContentBlock]:
        if isinstance(content, str):
            return [TextBlock(content)] if content else []
        if not isinstance(content, list):
            self.bad(path, "must be a string or an array of content parts")
            return []
        blocks: list[ContentBlock] = []
        for j, part in enumerate(content):
            part_path = f"{path}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(part, dict) or not isinstance(kind, str):
                self.bad(part_path, 'must be a content part: an object with a "type"')
            elif kind == "text":
                text = self.text(part, part_path)
                if text is not None:
                    blocks.append(text)
            elif kind == "image_url":
                self.extras(part, _IMAGE_PART_KEYS, part_path)
                image = self.image(part.get("image_url"), f"{part_path}.image_url")
                if image is not None:
                    image.cache_control = self.cache(part, part_path)
                    blocks.append(image)
            else:  # input_audio, file, or a part still to come
                self.unsupported(part_path, f"{kind!r} parts {UNTRANSLATABLE}")
                blocks.extend(_stand_in(part, kind))
        return blocks

    def image(self, value: Any, path: str) -> ImageBlock | None:
        if not isinstance(value, dict):
            self.bad(path, 'must be an object with a "url"')
            return None
        self.extras(value, _IMAGE_URL_KEYS, path)
        detail = value.get("detail")
        if detail is not None and detail not in _IMAGE_DETAILS:
            self.bad(f"{path}.detail", 'must be "auto", "low", "high" or "original"')
        elif detail is not None and detail != "auto":
            self.dropped.append(f"{path}.detail")  # a resolution hint
        url = value.get("url")
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return ImageBlock(url=url)
        if not isinstance(url, str) or not url.startswith("data:"):
            self.bad(f"{path}.url", "must be an http(s) URL or a base64 data URL")
            return None
        comma = url.find(",")
        header = url[5:comma].split(";") if comma > 0 else []
        if not header or header[-1] != "base64":
            self.bad(f"{path}.url", "must be a base64 data URL (data:<type>;base64,...)")
            return None
        media_type = header[0].lower()
        if media_type not in IMAGE_MEDIA_TYPES:
            types = ", ".join(sorted(IMAGE_MEDIA_TYPES))
            self.bad(f"{path}.url", f"must hold an image of type {types}")
            return None
        try:
            data = base64.b64decode(url[comma + 1 :], validate=True)
        except ValueError:  # binascii.Error, or a character outside ASCII
            self.bad(f"{path}.url", "must hold valid base64")
            return None
        if not data:
            self.bad(f"{path}.url", "must hold an image")
            return None
        return ImageBlock(data=data, media_type=media_type)

    def cache(self, part: dict[str, Any], path: str) -> CacheControl | None:
        """A part's cache mark: OpenAI's `prompt_cache_breakpoint` or a `cache_control`."""
        cache: CacheControl | None = None
        for key, kind_key, kind in (
            ("cache_control", "type", "ephemeral"),
            ("prompt_cache_breakpoint", "mode", "explicit"),
        ):
            value = part.get(key)
            if value is None:
                continue
            ttl = value.get("ttl") if isinstance(value, dict) else None
            seconds = CACHE_TTLS.get(ttl) if isinstance(ttl, str) else None
            if not isinstance(value, dict) or value.get(kind_key) != kind:
                self.bad(f"{path}.{key}", f'must be {{"{kind_key}": "{kind}"}}, with a ttl')
            elif ttl is not None and seconds is None:
                self.bad(f"{path}.{key}.ttl", "must be one of " + ", ".join(CACHE_TTLS))
            else:
                cache = CacheControl(seconds)
        return cache

    def assistant(
        self, raw: dict[str, Any], path: str, pending: dict[str, str], known_ids: set[str]
    ) -> list[ContentBlock]:
        blocks: list[ContentBlock] = []
        content = raw.get("content")
        if isinstance(content, str):
            if content:
                blocks.append(TextBlock(content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                part_path = f"{path}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(part, dict) and kind == "text":
                    text = self.text(part, part_path)
                elif isinstance(part, dict) and kind == "refusal":
                    text = self.refusal(part.get("refusal"), f"{part_path}.refusal")
                else:
                    self.bad(part_path, "must be a text or refusal part")
                    continue
                if text is not None:
                    blocks.append(text)
        elif content is not None:
            self.bad(f"{path}.content", "must be a string, an array of parts or null")
        refusal = self.refusal(raw.get("refusal"), f"{path}.refusal")
        if refusal is not None:
            blocks.append(refusal)
        calls = raw.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            self.bad(f"{path}.tool_calls", "must be an array of tool calls")
        elif calls:
            for j, call in enumerate(calls):
                use = self.tool_call(call, f"{path}.tool_calls[{j}]", pending, known_ids)
                if use is not None:
                    blocks.append(use)
        return blocks

    def refusal(self, value: Any, path: str) -> TextBlock | None:
        """An earlier refusal is what the assistant said: text."""
        if value is None:
            return None
        if not isinstance(value, str):
            self.bad(path, "must be a string")
            return None
        return TextBlock(value) if value else None

    def tool_call(
        self, call: Any, path: str, pending: dict[str, str], known_ids: set[str]
    ) -> ContentBlock | None:
        if not isinstance(call, dict):
            self.bad(path, "must be an object")
            return None
        kind = call.get("type")
        if kind is None:
            kind = "function"
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            self.bad(f"{path}.id", "must be a non-empty string")
            call_id = ""
        elif call_id in known_ids:
            self.bad(f"{path}.id", f"duplicate tool call id {call_id!r}")
        else:
            known_ids.add(call_id)
            pending[call_id] = f"{path}.id"
        if kind != "function":
            if not isinstance(kind, str):
                self.bad(f"{path}.type", 'must be "function" or "custom"')
                return None
            self.unsupported(path, f"{kind!r} tool calls {UNTRANSLATABLE}")
            return TextBlock(compact(call))
        self.extras(call, _TOOL_CALL_KEYS, path)
        function = call.get("function")
        if not isinstance(function, dict):
            self.bad(f"{path}.function", "must be an object with a name and arguments")
            return None
        self.extras(function, _FUNCTION_CALL_KEYS, f"{path}.function")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            self.bad(f"{path}.function.name", "must be a non-empty string")
            name = ""
        parsed: Any = {}
        if not isinstance(arguments, str):
            self.bad(f"{path}.function.arguments", "must be a string of JSON")
        elif arguments.strip():  # "" is how some models call a function without arguments
            try:
                parsed = json.loads(arguments)
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict):
                self.bad(f"{path}.function.arguments", "must be a JSON object")
                parsed = {}
        return ToolUseBlock(call_id, name, parsed)

    def tool_result(
        self, raw: dict[str, Any], path: str, pending: dict[str, str]
    ) -> ToolResultBlock:
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            self.bad(f"{path}.tool_call_id", "must be a non-empty string")
            call_id = ""
        elif pending.pop(call_id, None) is None:
            self.bad(
                f"{path}.tool_call_id",
                f"{call_id!r} answers no unanswered tool call of the assistant message before it",
            )
        content = raw.get("content")
        return ToolResultBlock(call_id, list(self.text_parts(content, f"{path}.content")))

    # -- tools ---------------------------------------------------------------

    def tools(self, value: Any) -> tuple[list[Tool], set[str]]:
        """The function tools, and the names of every tool declared."""
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
                self.bad(path, 'must be an object with a "type"')
                continue
            if kind != "function":
                # A custom (free-form text) tool, or a type still to come: kept,
                # described by its JSON, for the estimate.
                self.unsupported(path, f"{kind!r} tools {UNTRANSLATABLE}")
                inner = tool.get(kind)
                name = inner.get("name") if isinstance(inner, dict) else None
                label = name if isinstance(name, str) and name else kind
                names.add(label)
                decoded.append(Tool(label, compact(tool)))
                continue
            self.extras(tool, _TOOL_KEYS, path)
            function = tool.get("function")
            if not isinstance(function, dict):
                self.bad(f"{path}.function", "must be an object with a name")
                continue
            path = f"{path}.function"
            self.extras(function, _FUNCTION_KEYS, path, frozenset({"strict"}))
            name = function.get("name")
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                self.bad(f"{path}.name", "must be 1-64 letters, digits, '_' or '-'")
                name = ""
            elif name in names:
                self.bad(f"{path}.name", f"duplicate tool name {name!r}")
            names.add(name)
            description = function.get("description")
            if description is not None and not isinstance(description, str):
                self.bad(f"{path}.description", "must be a string")
                description = None
            schema = function.get("parameters")
            if schema is None:
                schema = _empty_schema()  # OpenAI: a function without parameters
            elif not isinstance(schema, dict) or schema.get("type", "object") != "object":
                self.bad(f"{path}.parameters", 'must be a JSON schema of "type": "object"')
                schema = _empty_schema()
            decoded.append(Tool(name, description or "", schema))
        return decoded, names

    def tool_choice(self, value: Any, parallel: Any, names: set[str]) -> ToolChoice | None:
        if parallel is not None and not isinstance(parallel, bool):
            self.bad("parallel_tool_calls", "must be a boolean")
        choice: ToolChoice | None = None
        if isinstance(value, str) and value in _TOOL_CHOICES:
            choice = ToolChoice(_TOOL_CHOICES[value])
        elif isinstance(value, dict) and value.get("type") == "function":
            function = value.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                self.bad("tool_choice.function.name", "must name a tool")
            elif name not in names:
                self.bad("tool_choice.function.name", f"no tool named {name!r} in tools")
            else:
                choice = ToolChoice(ToolChoiceMode.TOOL, name)
        elif isinstance(value, dict) and value.get("type") in ("allowed_tools", "custom"):
            self.unsupported("tool_choice", f"{value['type']!r} {UNTRANSLATABLE}")
        elif value is not None:
            self.bad(
                "tool_choice",
                'must be "none", "auto", "required" or {"type": "function", "function": '
                '{"name": ...}}',
            )
        forced = choice is not None and choice.mode in (ToolChoiceMode.ANY, ToolChoiceMode.TOOL)
        if forced and not names:
            self.bad("tool_choice", "requires tools")
        if parallel is False and names:
            choice = choice or ToolChoice()
            choice.disable_parallel_tool_use = True
        return choice


def _append(out: list[Message], role: Role, blocks: list[ContentBlock]) -> None:
    """Adds a turn; tool results, and a user message after them, join one user turn."""
    if not blocks:
        return  # an empty message says nothing (and Anthropic refuses one)
    if role is Role.USER and out and out[-1].role is Role.USER:
        previous = out[-1].content
        if isinstance(previous[0], ToolResultBlock):
            previous.extend(blocks)
            return
    out.append(Message(role, blocks))


def _stand_in(part: dict[str, Any], kind: str) -> list[ContentBlock]:
    """An untranslatable part as the estimate should count it."""
    where = _PAYLOADS.get(kind)
    inner = part.get(where[0]) if where is not None else None
    if where is not None and isinstance(inner, dict) and where[1] in inner:
        # A base64 payload counts as an image: a floor rather than an estimate
        # of a token per four characters (the upstream's usage corrects it).
        elided = part | {where[0]: inner | {where[1]: ""}}
        return [TextBlock(compact(elided)), ImageBlock()]
    return [TextBlock(compact(part))]


def _empty_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {}}
