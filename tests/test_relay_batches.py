"""A relayed stream goes to the client one upstream read at a time.

The HTTP front door's pass-through sends the upstream's bytes as they came;
each read becomes one RawChunk (one write to the client) holding every event
it completed, and the typed events the gateway reads from them (usage, when
content began, how much) are merged per read. These tests pin what batching
must keep: the bytes, byte for byte and cut only at event boundaries, an
error event ending the relayed bytes where it stands, the usage chunk a
client did not ask for left out of the middle of a batch, and the texts the
gateway reads from deltas it does not parse as JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import GatewayError
from server.events import (
    ContentBlockStart,
    MessageDelta,
    MessageStart,
    MessageStop,
    RawChunk,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
    ToolInputDelta,
)
from server.providers._relay import merged_deltas, relayed_bytes
from server.providers._sse import SseSplitter, after_first, after_first_match, batch_of
from server.providers.anthropic_messages import AnthropicProvider
from server.providers.openai_chat import OpenAIChatProvider
from server.schema import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    GenerationRequest,
    Message,
    Passthrough,
    Role,
    TextBlock,
)


def sse(name: str | None, data: Any, *, compact: bool = True) -> bytes:
    text = json.dumps(data, separators=(",", ":") if compact else None, ensure_ascii=False)
    return (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()


def anthropic_stream(*, compact: bool = True, error: bool = False) -> list[bytes]:
    def delta(index: int, kind: str, field: str, value: str) -> bytes:
        data = {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": kind, field: value},
        }
        return sse("content_block_delta", data, compact=compact)

    start = {
        "type": "message_start",
        "message": {"id": "msg_9", "usage": {"input_tokens": 11, "output_tokens": 1}},
    }
    events = [
        sse("message_start", start, compact=compact),
        sse("ping", {"type": "ping"}, compact=compact),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
            compact=compact,
        ),
        delta(0, "thinking_delta", "thinking", "Hmm, "),
        delta(0, "thinking_delta", "thinking", 'a "quote".'),
        delta(0, "signature_delta", "signature", "sig=="),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}, compact=compact),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "text", "text": ""},
            },
            compact=compact,
        ),
        delta(1, "text_delta", "text", "Grüße, "),
        delta(1, "text_delta", "text", "line\nbreak \\ and 日本"),
        delta(1, "text_delta", "text", "."),
    ]
    if error:
        failure = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
        return [
            *events,
            sse("error", failure, compact=compact),
            delta(1, "text_delta", "text", "never"),
        ]
    return [
        *events,
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}, compact=compact),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 9},
            },
            compact=compact,
        ),
        sse("message_stop", {"type": "message_stop"}, compact=compact),
    ]


@asynccontextmanager
async def upstream(stream: bytes, *, pieces: int = 1) -> AsyncIterator[int]:
    """An HTTP server answering every request with `stream`, in `pieces` writes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nrequest-id: req_b\r\n"
            b"x-request-id: req_b\r\ncontent-length: %d\r\n\r\n" % len(stream)
        )
        size = -(-len(stream) // pieces)
        for at in range(0, len(stream), size):
            writer.write(stream[at : at + size])
            await writer.drain()
            if pieces > 1:
                await asyncio.sleep(0.01)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def relayed_request(protocol: str, model: str, document: dict[str, Any]) -> GenerationRequest:
    body = json.dumps(document).encode()
    return GenerationRequest(
        model=model,
        messages=[Message(Role.USER, [TextBlock("Hi")])],
        max_tokens=10,
        request_id="rid-batch",
        passthrough=Passthrough(protocol, body, document),
    )


async def relay(
    kind: str, stream: bytes, request: GenerationRequest, *, pieces: int = 1
) -> tuple[list[bytes], list[StreamEvent], GatewayError | None]:
    async with upstream(stream, pieces=pieces) as port:
        if kind == "anthropic":
            provider: Any = AnthropicProvider.from_settings(
                "anthropic", {"api_key": "k", "base_url": f"http://127.0.0.1:{port}"}
            )
        else:
            provider = OpenAIChatProvider.from_settings(
                "openai",
                {"api_key": "k", "base_url": f"http://127.0.0.1:{port}/v1", "responses_api": True},
            )
        chunks: list[bytes] = []
        events: list[StreamEvent] = []
        error: GatewayError | None = None
        try:
            async for event in provider.stream(request):
                if isinstance(event, RawChunk):
                    chunks.append(event.data)
                else:
                    events.append(event)
        except GatewayError as err:
            error = err
        finally:
            await provider.aclose()
        return chunks, events, error


ANTHROPIC_ASK = {"model": "claude-sonnet-5-5", "max_tokens": 10, "stream": True, "messages": []}


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "spaced"])
@pytest.mark.parametrize("pieces", [1, 7])
async def test_an_anthropic_stream_is_relayed_read_by_read_and_read_for_its_texts(
    compact: bool, pieces: int
) -> None:
    events = anthropic_stream(compact=compact)
    stream = b"".join(events)
    request = relayed_request(ANTHROPIC_MESSAGES, "claude-sonnet-5-5", ANTHROPIC_ASK)
    chunks, typed, error = await relay("anthropic", stream, request, pieces=pieces)
    assert error is None
    assert b"".join(chunks) == stream
    # One per read, not one per event; the read with the first content delta in
    # two, cut after it (the first bytes leave before the rest is read).
    assert len(chunks) <= pieces + 1 < len(events)
    first_delta = next(
        i for i, e in enumerate(events) if e.startswith(b"event: content_block_delta")
    )
    assert b"".join(events[: first_delta + 1]) in {
        b"".join(chunks[:n]) for n in range(1, len(chunks) + 1)
    }
    for chunk in chunks:  # each ends at an event boundary
        assert chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == chunk.count(b"data:")
    assert isinstance(typed[0], MessageStart) and typed[0].id == "msg_9"
    assert isinstance(typed[-1], MessageStop)
    assert [type(e) for e in typed if isinstance(e, ContentBlockStart)] == [ContentBlockStart] * 2
    thinking = "".join(e.text for e in typed if isinstance(e, ThinkingDelta))
    text = "".join(e.text for e in typed if isinstance(e, TextDelta))
    assert thinking == 'Hmm, a "quote".'
    assert text == "Grüße, line\nbreak \\ and 日本."
    if pieces == 1:  # one read: the deltas of a block come as one
        assert len([e for e in typed if isinstance(e, TextDelta)]) == 1
    usage = [e.usage for e in typed if isinstance(e, MessageDelta) and e.usage is not None]
    assert usage[-1].output_tokens == 9 and usage[-1].input_tokens == 11


async def test_an_error_event_ends_the_relayed_bytes_where_it_stands() -> None:
    events = anthropic_stream(error=True)
    stream = b"".join(events)
    request = relayed_request(ANTHROPIC_MESSAGES, "claude-sonnet-5-5", ANTHROPIC_ASK)
    chunks, typed, error = await relay("anthropic", stream, request)
    assert error is not None and error.upstream_reply is not None
    before = b"".join(events[:-2])
    assert b"".join(chunks) == before  # everything before the error, in the same read
    assert error.upstream_reply.event == events[-2]  # the error event, relayed by the edge
    assert (
        "".join(e.text for e in typed if isinstance(e, TextDelta))
        == "Grüße, line\nbreak \\ and 日本."
    )


def chat_stream(*, usage_chunk: bool = True) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse(
            None, {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
        )

    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "one "}),
        chunk({"content": "two"}),
        chunk({}, "stop"),
    ]
    if usage_chunk:
        events.append(
            sse(
                None, {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        )
    return [*events, b"data: [DONE]\n\n"]


@pytest.mark.parametrize("wants_usage", [False, True])
async def test_the_usage_chunk_a_client_did_not_ask_for_is_cut_out_of_a_read(
    wants_usage: bool,
) -> None:
    events = chat_stream()
    document: dict[str, Any] = {"model": "gpt-6-sol", "stream": True, "messages": []}
    if wants_usage:
        document["stream_options"] = {"include_usage": True}
    request = relayed_request(OPENAI_CHAT, "gpt-6-sol", document)
    chunks, typed, error = await relay("openai", b"".join(events), request)
    assert error is None
    expected = events if wants_usage else [*events[:4], events[5]]
    assert b"".join(chunks) == b"".join(expected)
    # One read, in two parts: to the first chunk with text (the role chunk's
    # empty content is none), and the rest.
    assert chunks[0] == b"".join(events[:2])
    assert len(chunks) == 2
    assert "".join(e.text for e in typed if isinstance(e, TextDelta)) == "one two"
    usage = [e.usage for e in typed if isinstance(e, MessageDelta) and e.usage is not None]
    assert usage and usage[-1].output_tokens == 3  # billed from it all the same


async def test_a_responses_stream_is_relayed_by_reads_and_read_for_usage() -> None:
    def event(data: dict[str, Any]) -> bytes:
        return sse(data["type"], data)

    item = {"type": "message", "id": "m1", "content": []}
    final = {
        "id": "r1",
        "status": "completed",
        "output": [item],
        "usage": {"input_tokens": 6, "output_tokens": 2},
    }
    events = [
        event({"type": "response.created", "response": {"id": "r1"}}),
        event({"type": "response.in_progress", "response": {"id": "r1"}}),
        event({"type": "response.output_item.added", "output_index": 0, "item": item}),
        event({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi "}),
        event({"type": "response.output_text.delta", "output_index": 0, "delta": "there"}),
        event({"type": "response.output_text.done", "output_index": 0, "text": "Hi there"}),
        event({"type": "response.output_item.done", "output_index": 0, "item": item}),
        event({"type": "response.completed", "response": final}),
    ]
    document = {"model": "gpt-6-sol", "stream": True, "input": "Hi"}
    request = relayed_request(OPENAI_RESPONSES, "gpt-6-sol", document)
    chunks, typed, error = await relay("openai", b"".join(events), request)
    assert error is None
    assert b"".join(chunks) == b"".join(events)
    # One read, in two parts: to the first text delta, and the rest.
    assert chunks == [b"".join(events[:4]), b"".join(events[4:])]
    assert [e.text for e in typed if isinstance(e, TextDelta)] == ["Hi ", "there"]
    usage = [e.usage for e in typed if isinstance(e, MessageDelta) and e.usage is not None]
    assert usage[-1].input_tokens == 6 and usage[-1].output_tokens == 2


STREAM = b"".join(
    [
        *anthropic_stream(),
        b": a comment\n\n",
        b'event: odd\r\ndata: {"a": 1}\r\ndata: 2\r\n\r\n',
        b"data: [DONE]\n\n",
    ]
)


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12, unique=True))
def test_the_splitter_cuts_batches_at_event_boundaries_whatever_the_reads(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    splitter = SseSplitter()
    relayed = b""
    names: list[str] = []
    for start, end in itertools.pairwise(points):
        batch = splitter.feed(STREAM[start:end])
        if batch is None:
            continue
        assert batch.raw.endswith((b"\n\n", b"\r\n\r\n"))
        assert b"".join(batch.bytes_of(e) for e in batch.events) == batch.raw
        relayed += batch.raw
        names += [e.name for e in batch.events]
        last = batch.events[-1]
        if last.name == "odd":
            assert last.data == b'{"a": 1}\n2'
    assert relayed == STREAM and splitter.pending == b""
    assert names[0] == "message_start" and names[-3:] == ["", "odd", ""]


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12, unique=True))
def test_after_first_cuts_a_read_of_whole_events_after_the_named_one(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    splitter = SseSplitter()
    for start, end in itertools.pairwise(points):
        whole = splitter.complete(STREAM[start:end])
        if whole is None:
            continue
        cut = after_first(whole, b"content_block_delta")
        names = [e.name for e in batch_of(whole).events]
        if "content_block_delta" not in names or b"\r" in whole:
            assert cut == -1
            continue
        head = batch_of(whole[:cut]).events
        assert [e.name for e in head] == names[: names.index("content_block_delta") + 1]
        tail = batch_of(whole[cut:]).events
        assert [e.name for e in head + tail] == names


def test_after_first_finds_only_an_event_line() -> None:
    text = b'event: ping\ndata: {"t":"event: content_block_delta\\n"}\n\n'
    delta = b'event: content_block_delta\ndata: {"d":1}\n\n'
    assert after_first(text, b"content_block_delta") == -1
    assert after_first(text + delta + text, b"content_block_delta") == len(text + delta)
    assert after_first(delta, b"content_block_delta") == len(delta)


def test_the_first_chat_chunk_with_text_ends_the_first_part() -> None:
    from server.providers.openai_chat import _CHAT_CONTENT

    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    quoted = b'data: {"choices":[{"delta":{"content":"\\"content\\":\\"x"}}]}\n\n'
    spaced = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    assert after_first_match(role + spaced + done, _CHAT_CONTENT) == len(role + spaced)
    assert after_first_match(role + quoted + done, _CHAT_CONTENT) == len(role + quoted)
    assert after_first_match(role + done, _CHAT_CONTENT) == -1


def test_relayed_bytes_leave_out_events_in_the_middle() -> None:
    batch = SseSplitter().feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")
    assert batch is not None
    assert relayed_bytes(batch, [batch.events[1]], len(batch.raw)) == b"data: 1\n\ndata: 3\n\n"
    assert relayed_bytes(batch, [], batch.events[2].start) == b"data: 1\n\ndata: 2\n\n"


def test_merged_deltas_join_only_runs_of_one_kind_and_block() -> None:
    events: list[StreamEvent] = [
        TextDelta(0, "a"),
        TextDelta(0, "b"),
        TextDelta(1, "c"),
        ToolInputDelta(1, "{"),
        ToolInputDelta(1, "}"),
        ThinkingDelta(1, "x"),
    ]
    merged = merged_deltas(events)
    assert merged == [
        TextDelta(0, "ab"),
        TextDelta(1, "c"),
        ToolInputDelta(1, "{}"),
        ThinkingDelta(1, "x"),
    ]


# Chat Completions chunks of every shape the reading by pattern must tell apart.
_TEXTS = st.text(max_size=12) | st.sampled_from(["usage", "error", 'a"b', "c\\d", "é\n😀", ""])
_TEXT_DELTA = st.builds(lambda t: {"content": t}, _TEXTS)
_DELTAS = st.one_of(
    _TEXT_DELTA,
    _TEXT_DELTA,
    _TEXT_DELTA,
    st.builds(lambda t: {"role": "assistant", "content": t}, _TEXTS),
    st.builds(lambda t: {"content": t, "refusal": None}, _TEXTS),
    st.builds(lambda t: {"refusal": t}, _TEXTS),
    st.builds(lambda t: {"reasoning_content": t}, _TEXTS),
    st.builds(lambda t: {"tool_calls": [{"index": 0, "function": {"arguments": t}}]}, _TEXTS),
    st.just({}),
)


@st.composite
def chat_chunks(draw: st.DrawFn) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": draw(st.sampled_from([0, 0, 1])), "delta": draw(_DELTAS)}
    if draw(st.booleans()):
        choice["logprobs"] = None
    choice["finish_reason"] = draw(st.sampled_from([None, None, "stop", "length"]))
    choices = [choice]
    if draw(st.integers(0, 4)) == 0:
        choices.append({"index": 1, "delta": draw(_DELTAS), "finish_reason": None})
    chunk: dict[str, Any] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
    }
    usage = draw(st.sampled_from(["absent", "null", "null", "counts"]))
    if usage != "absent":
        chunk["usage"] = None if usage == "null" else {"prompt_tokens": 2, "completion_tokens": 1}
    if draw(st.integers(0, 5)) == 0:
        chunk["error"] = {"message": "overloaded", "type": "server_error"}
    if draw(st.booleans()):
        chunk["obfuscation"] = draw(st.text(alphabet="abc123", min_size=6, max_size=8))
    return chunk


def _started_decoder() -> Any:
    from server.providers._openai_codec import ChatStreamDecoder

    decoder = ChatStreamDecoder(
        provider="openai", model="m", request_id="r", upstream_request_id=""
    )
    decoder.feed({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    return decoder


@settings(max_examples=500, deadline=None)
@given(chat_chunks(), st.booleans(), st.booleans(), st.booleans())
def test_a_chunk_read_by_pattern_says_what_parsing_it_says(
    chunk: dict[str, Any], compact: bool, ascii_only: bool, after_text: bool
) -> None:
    """plain_text reads a chunk only if parsing it would give its text and nothing
    else; OpenAI's shape of a text chunk it always reads."""
    from server.providers._openai_codec import plain_text

    data = json.dumps(
        chunk, separators=(",", ":") if compact else None, ensure_ascii=ascii_only
    ).encode()
    parsed, by_pattern = _started_decoder(), _started_decoder()
    if after_text:  # a text block already open
        parsed.text("x")
        by_pattern.text("x")
    text = plain_text(data)
    if text is not None:
        assert by_pattern.text(text) == parsed.feed(json.loads(data))
    choice = chunk["choices"][0]
    delta_text = choice["delta"].get("content")
    openai_shape = (
        len(chunk["choices"]) == 1
        and choice["index"] == 0
        and set(choice["delta"]) == {"content"}
        and delta_text not in ("", "usage", "error")
        and choice["finish_reason"] is None
        and chunk.get("usage") is None
        and "error" not in chunk
    )
    assert (text is not None) == openai_shape


async def test_a_relayed_chat_stream_is_read_for_its_texts_whatever_their_shape() -> None:
    """A stream mixing chunks read by pattern and parsed ones (role with text,
    escapes, a refusal-free tool call between texts) gives the texts and blocks
    that parsing every chunk gives."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Grüße, "}),
        chunk({"content": 'a "quoted"\nline'}),
        chunk({"role": "assistant", "content": " and 日本"}),
        chunk({"content": " \\ 😀"}),
        chunk(
            {"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f", "arguments": ""}}]}
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk({"content": "after"}),
        chunk({}, "tool_calls"),
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}},
    ]
    stream = b"".join(sse(None, c) for c in chunks) + b"data: [DONE]\n\n"
    document = {"model": "gpt-6-sol", "stream": True, "stream_options": {"include_usage": True}}
    request = relayed_request(OPENAI_CHAT, "gpt-6-sol", {**document, "messages": []})
    relayed, typed, error = await relay("openai", stream, request, pieces=7)
    assert error is None
    assert b"".join(relayed) == stream
    reference = _started_decoder()
    expected: list[StreamEvent] = []
    for one in chunks[1:]:
        expected += reference.feed(one)
    expected += reference.finish()

    def blocks_and_texts(events: list[StreamEvent]) -> list[Any]:
        kept = [e for e in events if not isinstance(e, MessageStart)]
        return merged_deltas(kept)

    assert blocks_and_texts(typed) == blocks_and_texts(expected)


@st.composite
def responses_text_events(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": draw(
            st.sampled_from(
                ["response.output_text.delta"] * 3
                + ["response.function_call_arguments.delta", "response.refusal.delta"]
            )
        )
    }
    if draw(st.booleans()):
        data["item_id"] = "msg_1"
    if draw(st.integers(0, 6)):
        data["output_index"] = draw(st.sampled_from([0, 1, 2, "0", None]))
    data["content_index"] = 0
    if draw(st.integers(0, 6)):
        data["delta"] = draw(
            _TEXTS | st.sampled_from(["type", "delta", "output_index"]) | st.none()
        )
    data["sequence_number"] = draw(st.integers(0, 99))
    if draw(st.booleans()):
        data["logprobs"] = []
    if draw(st.booleans()):
        data["obfuscation"] = draw(st.text(alphabet="abc123", min_size=6, max_size=8))
    keys = list(data)
    order = draw(st.permutations(keys))
    return {key: data[key] for key in order}


@settings(max_examples=500, deadline=None)
@given(responses_text_events(), st.booleans(), st.booleans())
def test_a_responses_text_delta_read_by_pattern_says_what_parsing_it_says(
    data: dict[str, Any], compact: bool, ascii_only: bool
) -> None:
    """text_delta reads an event only if parsing it would give the same delta;
    OpenAI's shape of a text delta it always reads."""
    from server.providers._openai_responses_codec import ResponsesStreamDecoder, text_delta

    def decoder() -> ResponsesStreamDecoder:
        made = ResponsesStreamDecoder(
            provider="o", model="m", request_id="r", upstream_request_id=""
        )
        for index, kind in enumerate(["message", "function_call", "message"]):
            item = {"type": kind, "call_id": "c", "name": "f"}
            made.feed({"type": "response.output_item.added", "output_index": index, "item": item})
        return made

    raw = json.dumps(data, separators=(",", ":") if compact else None, ensure_ascii=ascii_only)
    read = text_delta(raw.encode())
    if read is not None:
        assert decoder().text(*read) == decoder().feed(json.loads(raw))
    openai_shape = (
        data["type"] == "response.output_text.delta"
        and isinstance(data.get("output_index"), int)
        and isinstance(data.get("delta"), str)
        and data["delta"] not in ("type", "delta", "output_index")
    )
    assert (read is not None) == openai_shape
