"""A checker of OpenAI's Responses stream grammar, for every streaming test of `/v1/responses`.

`check_responses_stream` parses the SSE bytes a client received and fails
(AssertionError) unless they follow the grammar that the official SDKs'
`responses.stream` and Codex CLI rely on:

    response.created  response.in_progress?
    ( output_item.added  <the item's content events>  output_item.done )*   # output_index 0, 1...
    response.completed | response.incomplete | response.failed | error

where a message's content events are content_part.added, output_text.delta*,
output_text.done and content_part.done per part; a function call's
function_call_arguments.delta* and .done; a reasoning item's
reasoning_summary_part.added, reasoning_summary_text.delta*, .done and
reasoning_summary_part.done per summary part. Every event's name equals its
data's `type`, `sequence_number` counts from 0 with no gap, deltas add up to
their `.done` text and to the item that output_item.done carries, and the
last event's Response holds, in order, exactly the items done (all of them
done, unless it failed), with usage that adds up. Each event must also
validate as the `openai` SDK's ResponseStreamEvent, and the whole stream
must go through the SDK's own ResponseStreamState (what `responses.stream`
runs). `partial=True` accepts a stream cut anywhere (a client that
disconnected): a prefix of the grammar, its last incomplete event ignored.
"""

from __future__ import annotations

import copy
from typing import Any, cast, get_args

from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel

from tests.anthropic_grammar import parse_sse

Event = tuple[str, dict[str, Any]]

TERMINAL = {
    "response.completed": "completed",
    "response.incomplete": "incomplete",
    "response.failed": "failed",
}
ITEM_KINDS = {"message", "function_call", "reasoning"}
# Event name -> the kind of item it belongs to.
ITEM_EVENTS = {
    "response.content_part.added": "message",
    "response.output_text.delta": "message",
    "response.output_text.done": "message",
    "response.content_part.done": "message",
    "response.function_call_arguments.delta": "function_call",
    "response.function_call_arguments.done": "function_call",
    "response.reasoning_summary_part.added": "reasoning",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.reasoning_summary_text.done": "reasoning",
    "response.reasoning_summary_part.done": "reasoning",
}
# Event type -> the SDK's model of it.
_MODELS: dict[str, type[BaseModel]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in get_args(get_args(ResponseStreamEvent)[0])
}


def check_responses_stream(raw: bytes, *, partial: bool = False) -> list[Event]:
    """Parses `raw` and asserts the Responses stream grammar; returns every event."""
    events = parse_sse(raw, partial=partial)
    grammar = _Grammar()
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for position, (name, data) in enumerate(events):
        where = f"event {position} ({name})"
        assert not grammar.ended, f"{where} follows the end of the stream"
        assert data.get("sequence_number") == position, (
            f"{where}: sequence_number {data.get('sequence_number')!r}, expected {position}"
        )
        grammar.step(where, name, data)
        model = _MODELS.get(name)
        assert model is not None, f"{where}: the SDK knows no such event"
        parsed = model.model_validate(_sdk_view(name, data))
        state.handle_event(cast(Any, parsed))  # raises RuntimeError on what the SDK cannot follow
    if not partial:
        assert grammar.ended, "the stream ends without response.completed, incomplete or failed"
    return events


def _sdk_view(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The event as the SDK's types are strict about: a failed response's error
    code may be one the SDK does not list (Codex reads context_length_exceeded)."""
    if name != "response.failed":
        return data
    view = copy.deepcopy(data)
    view["response"]["error"]["code"] = "server_error"
    return view


class _Item:
    def __init__(self, index: int, item: dict[str, Any]) -> None:
        self.index = index
        self.kind: str = item["type"]
        self.id: str = item["id"]
        self.added = item
        self.done = False
        self.parts: list[list[str]] = []  # per content or summary part, its deltas
        self.part_done: list[str | None] = []  # per part, its done text
        self.part_closed: list[bool] = []  # per part, whether part.done came
        self.arguments: list[str] = []
        self.arguments_done: str | None = None


class _Grammar:
    """The state of a stream being checked: the response, its items, the open ones."""

    def __init__(self) -> None:
        self.response_id: str | None = None
        self.ended = False
        self.items: list[_Item] = []
        self.done_items: list[dict[str, Any]] = []

    def step(self, where: str, name: str, data: dict[str, Any]) -> None:
        if name == "response.created":
            assert self.response_id is None, f"{where}: a second response.created"
            self.response_id = _check_response(where, data, "in_progress")["id"]
            assert data["response"]["output"] == [], f"{where}: output is not empty"
            return
        assert self.response_id is not None, f"{where} before response.created"
        if name == "error":
            assert isinstance(data.get("message"), str), f"{where}: the error has no message"
            self.ended = True
        elif name == "response.in_progress":
            assert not self.items, f"{where}: after the first item"
            _check_response(where, data, "in_progress", self.response_id)
        elif name in TERMINAL:
            self.terminal(where, name, data)
        elif name == "response.output_item.added":
            self.added(where, data)
        elif name == "response.output_item.done":
            self.item_done(where, data)
        elif name in ITEM_EVENTS:
            item = self.item_of(where, data, data.get("item_id"))
            kind = ITEM_EVENTS[name]
            assert item.kind == kind, f"{where}: an event of a {kind} for a {item.kind}"
            self.content(where, name, data, item)
        else:
            raise AssertionError(
                f"{where}: not an event of the Responses stream this gateway sends"
            )

    def added(self, where: str, data: dict[str, Any]) -> None:
        assert data.get("output_index") == len(self.items), (
            f"{where}: output_index {data.get('output_index')!r}, expected {len(self.items)}"
        )
        assert all(i.done for i in self.items), f"{where}: an earlier item is not done"
        item = data.get("item")
        assert isinstance(item, dict), f"{where}: no item"
        assert item.get("type") in ITEM_KINDS, f"{where}: item type {item.get('type')!r}"
        assert isinstance(item.get("id"), str) and item["id"], f"{where}: the item has no id"
        assert item.get("status") == "in_progress", f"{where}: the item is not in progress"
        if item["type"] == "message":
            assert item.get("role") == "assistant", f"{where}: message role"
            assert item.get("content") == [], f"{where}: a message starts with content"
        elif item["type"] == "function_call":
            assert item.get("arguments") == "", f"{where}: a call starts with arguments"
            assert isinstance(item.get("call_id"), str) and item["call_id"], f"{where}: call_id"
            assert isinstance(item.get("name"), str) and item["name"], f"{where}: name"
        else:
            assert item.get("summary") == [], f"{where}: reasoning starts with a summary"
        self.items.append(_Item(len(self.items), item))

    def item_of(self, where: str, data: dict[str, Any], item_id: Any) -> _Item:
        index = data.get("output_index")
        assert isinstance(index, int) and 0 <= index < len(self.items), (
            f"{where}: output_index {index!r} of no item added"
        )
        item = self.items[index]
        assert not item.done, f"{where}: item {index} is done"
        assert item_id == item.id, f"{where}: item id {item_id!r}, expected {item.id!r}"
        return item

    def content(self, where: str, name: str, data: dict[str, Any], item: _Item) -> None:
        if item.kind == "function_call":
            assert item.arguments_done is None, f"{where}: after the arguments were done"
            if name.endswith(".delta"):
                assert isinstance(data.get("delta"), str), f"{where}: delta"
                item.arguments.append(data["delta"])
            else:
                assert data.get("arguments") == "".join(item.arguments), (
                    f"{where}: the arguments are not their deltas joined"
                )
                item.arguments_done = data["arguments"]
            return
        key = "content_index" if item.kind == "message" else "summary_index"
        part_type = "output_text" if item.kind == "message" else "summary_text"
        index = data.get(key)
        if name.endswith("part.added"):
            assert index == len(item.parts), f"{where}: {key} {index!r}, expected {len(item.parts)}"
            assert all(item.part_closed), f"{where}: a part is open"
            part = data.get("part")
            assert isinstance(part, dict), f"{where}: no part"
            assert part.get("type") == part_type and part.get("text") == "", (
                f"{where}: the part does not start as an empty {part_type}"
            )
            item.parts.append([])
            item.part_done.append(None)
            item.part_closed.append(False)
            return
        assert isinstance(index, int) and 0 <= index < len(item.parts), (
            f"{where}: {key} {index!r} of no part added"
        )
        joined = "".join(item.parts[index])
        if name.endswith(".delta"):
            assert item.part_done[index] is None, f"{where}: after the text was done"
            assert isinstance(data.get("delta"), str), f"{where}: delta"
            item.parts[index].append(data["delta"])
        elif name.endswith("text.done"):
            assert item.part_done[index] is None, f"{where}: the text was done already"
            assert data.get("text") == joined, f"{where}: the text is not its deltas joined"
            item.part_done[index] = joined
        else:  # part.done
            assert not item.part_closed[index], f"{where}: the part was done already"
            assert item.part_done[index] == joined, f"{where}: the part's text was not done"
            part = data.get("part")
            assert isinstance(part, dict) and part.get("text") == joined, (
                f"{where}: the part's text is not its deltas joined"
            )
            item.part_closed[index] = True

    def item_done(self, where: str, data: dict[str, Any]) -> None:
        done = data.get("item")
        assert isinstance(done, dict), f"{where}: no item"
        item = self.item_of(where, data, done.get("id"))
        assert done.get("type") == item.kind, f"{where}: the item changed type"
        assert done.get("status") in ("completed", "incomplete"), f"{where}: status"
        texts = ["".join(parts) for parts in item.parts]
        assert all(item.part_closed), f"{where}: a part is still open"
        if item.kind == "message":
            content = done.get("content")
            assert isinstance(content, list), f"{where}: content"
            assert [p.get("text") for p in content] == texts, f"{where}: content != deltas"
        elif item.kind == "function_call":
            assert item.arguments_done is not None, f"{where}: arguments were never done"
            assert done.get("arguments") == item.arguments_done, f"{where}: arguments"
            for key in ("call_id", "name"):
                assert done.get(key) == item.added[key], f"{where}: the call's {key} changed"
        else:
            summary = done.get("summary")
            assert isinstance(summary, list), f"{where}: summary"
            assert [p.get("text") for p in summary] == texts, f"{where}: summary != deltas"
        item.done = True
        self.done_items.append(done)

    def terminal(self, where: str, name: str, data: dict[str, Any]) -> None:
        status = TERMINAL[name]
        response = _check_response(where, data, status, self.response_id)
        if status != "failed":
            assert all(i.done for i in self.items), f"{where}: an item is not done"
            _check_usage(where, response.get("usage"))
        else:
            error = response.get("error")
            assert isinstance(error, dict), f"{where}: a failed response has no error"
            assert isinstance(error.get("code"), str), f"{where}: error.code"
            assert isinstance(error.get("message"), str), f"{where}: error.message"
        details = response.get("incomplete_details")
        if status == "incomplete":
            assert isinstance(details, dict) and details.get("reason"), f"{where}: no reason"
        else:
            assert details is None, f"{where}: incomplete_details in a {status} response"
        assert response.get("output") == self.done_items, f"{where}: output != the items done"
        self.ended = True


def _check_response(
    where: str, data: dict[str, Any], status: str, response_id: str | None = None
) -> dict[str, Any]:
    response = data.get("response")
    assert isinstance(response, dict), f"{where}: no response"
    assert response.get("object") == "response", f"{where}: response.object"
    assert isinstance(response.get("id"), str) and response["id"], f"{where}: response.id"
    if response_id is not None:
        assert response["id"] == response_id, f"{where}: the response id changed"
    assert response.get("status") == status, f"{where}: status {response.get('status')!r}"
    assert isinstance(response.get("output"), list), f"{where}: response.output"
    return response


def _check_usage(where: str, usage: Any) -> None:
    assert isinstance(usage, dict), f"{where}: no usage"
    details = usage.get("input_tokens_details") or {}, usage.get("output_tokens_details") or {}
    counts: tuple[Any, ...] = (
        usage.get("input_tokens"),
        usage.get("output_tokens"),
        usage.get("total_tokens"),
        details[0].get("cached_tokens"),
        details[1].get("reasoning_tokens"),
    )
    assert all(_is_count(c) for c in counts), f"{where}: usage counts {counts}"
    prompt, output, total, cached, reasoning = counts
    assert total == prompt + output, f"{where}: usage.total_tokens is not input + output"
    assert cached <= prompt, f"{where}: more cached tokens than input tokens"
    assert reasoning <= output, f"{where}: more reasoning tokens than output tokens"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
