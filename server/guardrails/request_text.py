"""Where a request's text is, and the request with some of it replaced.

Covered: system text, user and assistant text, tool results' text and the
string values of tool-use input, in the gateway's own request and, for a
pass-through request, in the client's document (Anthropic Messages, Chat
Completions, Responses). Never thinking blocks, their signatures, redacted
thinking, images or documents: they are not visited, so they travel as
they came.

Each text has a path in the style of field violations (`messages[3].content[0]`,
`messages[2].content[1].input.query`); replacing rebuilds what changed and
keeps everything else as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from server.schema import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    GenerationRequest,
    Message,
    Passthrough,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)

Replace = Callable[[str, str], str]  # (path, text) -> new text


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """The string values of a JSON value (object keys are names, not content)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _replaced_json(value: Any, path: str, replace: Replace) -> Any:
    if isinstance(value, str):
        return replace(path, value)
    if isinstance(value, dict):
        return {k: _replaced_json(v, f"{path}.{k}", replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced_json(v, f"{path}[{i}]", replace) for i, v in enumerate(value)]
    return value


# -- the gateway's request ---------------------------------------------------


def request_texts(request: GenerationRequest) -> Iterator[tuple[str, str]]:
    """(path, text) for every text of the request the guardrail reads."""
    for k, block in enumerate(request.system):
        yield f"system[{k}]", block.text
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextBlock):
                yield where, part.text
            elif isinstance(part, ToolResultBlock):
                for k, inner in enumerate(part.content):
                    if isinstance(inner, TextBlock):
                        yield f"{where}.content[{k}]", inner.text
            elif isinstance(part, ToolUseBlock):
                yield from _strings(part.input, f"{where}.input")


def rewrite_request(request: GenerationRequest, replace: Replace) -> None:
    """Replaces the request's texts in place (new blocks and lists; the old ones,
    which an edge may still hold, are not changed)."""
    request.system = [
        dataclasses.replace(b, text=replace(f"system[{k}]", b.text))
        for k, b in enumerate(request.system)
    ]
    messages = []
    for i, message in enumerate(request.messages):
        content: list[Any] = []
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextBlock):
                part = dataclasses.replace(part, text=replace(where, part.text))
            elif isinstance(part, ToolResultBlock):
                inner = [
                    dataclasses.replace(b, text=replace(f"{where}.content[{k}]", b.text))
                    if isinstance(b, TextBlock)
                    else b
                    for k, b in enumerate(part.content)
                ]
                part = dataclasses.replace(part, content=inner)
            elif isinstance(part, ToolUseBlock):
                part = dataclasses.replace(
                    part, input=_replaced_json(part.input, f"{where}.input", replace)
                )
            content.append(part)
        messages.append(Message(message.role, content))
    request.messages = messages


# -- a pass-through document -----------------------------------------------------
# A location: keys into the document, and for a JSON string (tool-call
# arguments) the path's prefix that names the string itself.


def _anthropic(document: Mapping[str, Any]) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
    system = document.get("system")
    if isinstance(system, str):
        yield "system", ("system",), False
    elif isinstance(system, list):
        for k, block in enumerate(system):
            if isinstance(block, dict) and block.get("type") == "text":
                yield f"system[{k}].text", ("system", k, "text"), False
    for i, message in enumerate(_list(document.get("messages"))):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield f"messages[{i}].content", ("messages", i, "content"), False
            continue
        for j, block in enumerate(_list(content)):
            if not isinstance(block, dict):
                continue
            at = ("messages", i, "content", j)
            where = f"messages[{i}].content[{j}]"
            kind = block.get("type")
            if kind == "text":
                yield f"{where}.text", (*at, "text"), False
            elif kind == "tool_result":
                inner = block.get("content")
                if isinstance(inner, str):
                    yield f"{where}.content", (*at, "content"), False
                for k, part in enumerate(_list(inner)):
                    if isinstance(part, dict) and part.get("type") == "text":
                        yield f"{where}.content[{k}].text", (*at, "content", k, "text"), False
            elif kind == "tool_use":
                yield f"{where}.input", (*at, "input"), True


def _chat(document: Mapping[str, Any]) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
    for i, message in enumerate(_list(document.get("messages"))):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield f"messages[{i}].content", ("messages", i, "content"), False
        for k, part in enumerate(_list(content)):
            if isinstance(part, dict) and part.get("type") == "text":
                yield (
                    f"messages[{i}].content[{k}].text",
                    ("messages", i, "content", k, "text"),
                    False,
                )
        for k, call in enumerate(_list(message.get("tool_calls"))):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                at = ("messages", i, "tool_calls", k, "function", "arguments")
                yield f"messages[{i}].tool_calls[{k}].function.arguments", at, True


def _responses(document: Mapping[str, Any]) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
    if isinstance(document.get("instructions"), str):
        yield "instructions", ("instructions",), False
    items = document.get("input")
    if isinstance(items, str):
        yield "input", ("input",), False
    for i, item in enumerate(_list(items)):
        if not isinstance(item, dict):
            continue
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, str):
                yield f"{where}.content", ("input", i, "content"), False
            for k, part in enumerate(_list(content)):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield f"{where}.content[{k}].text", ("input", i, "content", k, "text"), False
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            yield f"{where}.arguments", ("input", i, "arguments"), True
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, str):
                yield f"{where}.output", ("input", i, "output"), False
            for k, part in enumerate(_list(output)):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield f"{where}.output[{k}].text", ("input", i, "output", k, "text"), False


_WALKERS = {ANTHROPIC_MESSAGES: _anthropic, OPENAI_CHAT: _chat, OPENAI_RESPONSES: _responses}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _get(document: Any, location: tuple[Any, ...]) -> Any:
    for key in location:
        document = document[key]
    return document


def _json_value(document: Any, location: tuple[Any, ...]) -> tuple[Any, bool]:
    """A tool input: an object (Messages) or a JSON string (Chat, Responses), and
    whether it was decoded from a JSON string (one that is not JSON is one text)."""
    value = _get(document, location)
    if isinstance(value, str):
        try:
            return json.loads(value), True
        except ValueError:
            return value, False
    return value, False


def document_texts(passthrough: Passthrough) -> Iterator[tuple[str, str]]:
    """(path, text) for every text of a pass-through document the guardrail reads."""
    walker = _WALKERS.get(passthrough.protocol)
    if walker is None:
        return
    document = passthrough.document
    for path, location, structured in walker(document):
        if structured:
            yield from _strings(_json_value(document, location)[0], path)
        else:
            value = _get(document, location)
            if isinstance(value, str):
                yield path, value


def rewrite_document(passthrough: Passthrough, replace: Replace) -> Passthrough:
    """The pass-through request with its document's texts replaced, and its body
    re-serialized the way the HTTP front door serializes a changed document
    (compact JSON, UTF-8); the same one when nothing changed."""
    walker = _WALKERS.get(passthrough.protocol)
    if walker is None:
        return passthrough
    document = copy.deepcopy(passthrough.document)
    changed = False
    for path, location, structured in walker(document):
        *parents, last = location
        parent = _get(document, tuple(parents))
        old = parent[last]
        if structured:
            value, encoded = _json_value(document, location)
            new_value = _replaced_json(value, path, replace)
            if new_value == value:
                continue
            new: Any = (
                json.dumps(new_value, ensure_ascii=False, separators=(",", ":"))
                if encoded
                else new_value
            )
        elif isinstance(old, str):
            new = replace(path, old)
            if new == old:
                continue
        else:
            continue
        parent[last] = new
        changed = True
    if not changed:
        return passthrough
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return dataclasses.replace(passthrough, document=document, body=body)
