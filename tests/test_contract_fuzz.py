"""The contract under fuzzing: whatever a caller sends, the answer is a definite one.

Random but well-typed requests (NaN and ±Infinity anywhere in a Struct,
int32 edges, Durations out of range, deep and wide Structs, huge strings),
and bytes that are no request at all (invalid UTF-8 in a string field,
truncated or mutated serializations, uint32 and uint64 varints in int32
fields, nesting past the parser's limit, garbage) go to an in-process
gateway through a real channel; random JSON bodies go to the HTTP front
door's endpoints. No answer is INTERNAL or UNKNOWN (nor a 500), none passes
the client's metadata limit, and the gateway goes on serving (issue 17).

Each test runs a few hundred examples; `HYPOTHESIS_PROFILE=long` runs
thousands (LONG_EXAMPLES), for `make reliability`:

    HYPOTHESIS_PROFILE=long python -m pytest -q -p no:randomly tests/test_contract_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import grpc
import httpx2
import pytest
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from interceptors.malformed_request import PARSE_AT_ONCE_BYTES
from llmgateway.v1 import generation_pb2 as pb
from tests.conftest import RunningGateway, detail, request, rich_status, user

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
LONG_EXAMPLES = 4000


def examples(default: int) -> settings:
    return settings(
        max_examples=LONG_EXAMPLES if LONG else default,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# What a caller may be told. Anything else (INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED
# from an oversized trailer, a DEADLINE_EXCEEDED from a hang) is a gateway bug.
DEFINITE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
SERVICE = "/llmgateway.v1.GenerationService/"
# Generous: a call that takes this long has hung.
TIMEOUT_S = 30.0
# The sizes of the int32 and int64 fields, and the values at their edges.
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
VARINT_EDGES = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def _int32() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, -1, 2, *INT32, INT32[1] - 1, INT32[0] + 1]),
        st.integers(*INT32),
    )


# -- Strings ------------------------------------------------------------------------------

_huge_text = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "é", "語", "😀", "ab "]),
    st.integers(1_000, 200_000),
)
_text = st.one_of(st.text(max_size=12), st.text(max_size=12), st.text(max_size=12), _huge_text)
_ids = st.one_of(st.sampled_from(["", "a", "b", "toolu_1"]), _text)
_names = st.one_of(st.sampled_from(["", "lookup", "get_weather", "has space"]), _text)
_models = st.one_of(st.sampled_from(["echo", "tiny", "tiny-latest", "", "missing"]), _text)

# -- Structs: any JSON, and numbers JSON does not have ------------------------------------

_specials = st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324])
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and ±Infinity included
    _specials,
    st.text(max_size=8),
)
_json = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)


def _nested(depth: int, leaf: Any, in_list: bool) -> dict[str, Any]:
    value = leaf
    for _ in range(depth):
        value = [value] if in_list else {"a": value}
    return {"deep": value}


# Depth stays within what protobuf can build in Python; deeper nesting is sent as bytes.
_deep = st.builds(_nested, st.integers(1, 12), _leaves, st.booleans())
_wide = st.builds(
    lambda n, leaf: {**{f"k{i}": float(i) for i in range(n)}, "last": leaf},
    st.integers(100, 3_000),
    _leaves,
)
_objects = st.one_of(
    st.dictionaries(st.text(max_size=10), _json, max_size=6),
    st.dictionaries(st.text(max_size=10), _json, max_size=6).map(lambda d: {"type": "object", **d}),
    _deep,
    _wide,
)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


_structs = _objects.map(_struct)

# -- Requests -----------------------------------------------------------------------------

_durations = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(
        st.sampled_from([0, 1, 300, 3600, -1, 10**14, -(10**14), 315_576_000_001, *INT64]),
        st.integers(*INT64),
    ),
    nanos=_int32(),
)
_cache = st.one_of(
    st.none(),
    st.just(pb.CacheControl()),
    st.builds(pb.CacheControl, ttl=_durations),
)


def _with_cache(block: pb.ContentBlock, cache: pb.CacheControl | None) -> pb.ContentBlock:
    if cache is not None:
        block.cache_control.CopyFrom(cache)
    return block


_images = st.one_of(
    st.builds(
        pb.ImageBlock,
        data=st.binary(max_size=16),
        media_type=st.sampled_from(["", "image/png", "text/plain"]),
    ),
    st.builds(pb.ImageBlock, url=st.sampled_from(["https://x/y.png", "ftp://x", ""])),
    st.just(pb.ImageBlock()),
)
_leaf_blocks = st.one_of(
    st.builds(lambda t: pb.ContentBlock(text=t), _text),
    st.builds(lambda i: pb.ContentBlock(image=i), _images),
)
_blocks = st.builds(
    _with_cache,
    st.one_of(
        _leaf_blocks,
        st.just(pb.ContentBlock()),
        st.builds(
            lambda i, n, s: pb.ContentBlock(tool_use=pb.ToolUseBlock(id=i, name=n, input=s)),
            _ids,
            _names,
            _structs,
        ),
        st.builds(
            lambda i, c, e: pb.ContentBlock(
                tool_result=pb.ToolResultBlock(tool_use_id=i, content=c, is_error=e)
            ),
            _ids,
            st.lists(_leaf_blocks, max_size=2),
            st.booleans(),
        ),
        st.builds(
            lambda t, s: pb.ContentBlock(thinking=pb.ThinkingBlock(text=t, signature=s)),
            _text,
            st.text(max_size=8),
        ),
    ),
    _cache,
)
_roles = st.one_of(st.sampled_from([pb.ROLE_USER, pb.ROLE_ASSISTANT]), _int32())
_messages = st.builds(
    lambda role, blocks: pb.Message(role=role, content=blocks),
    _roles,
    st.lists(_blocks, max_size=3),
)
_tools = st.builds(pb.Tool, name=_names, description=_text, input_schema=_structs)
_tool_choices = st.one_of(
    st.none(),
    st.builds(
        pb.ToolChoice,
        mode=st.one_of(st.integers(0, 4), _int32()),
        tool_name=_names,
        disable_parallel_tool_use=st.booleans(),
    ),
)


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def _generate_request(
    model: str,
    system: list[pb.ContentBlock],
    messages: list[pb.Message],
    tools: list[pb.Tool],
    tool_choice: pb.ToolChoice | None,
    numbers: dict[str, Any],
    stop: list[str],
    thinking: int | None,
    tags: dict[str, str],
    options: struct_pb2.Struct | None,
    request_id: str,
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=model,
        system=system,
        messages=messages,
        tools=tools,
        stop_sequences=stop,
        request_id=request_id,
        metadata=pb.CallerMetadata(end_user_id=request_id[:8], tags=tags),
        **{k: v for k, v in numbers.items() if v is not None},
    )
    if tool_choice is not None:
        req.tool_choice.CopyFrom(tool_choice)
    if thinking is not None:
        req.thinking.budget_tokens = thinking
    if options is not None:
        req.provider_options.CopyFrom(options)
    return req


_generate_requests = st.builds(
    _generate_request,
    model=_models,
    system=st.lists(_blocks, max_size=2),
    messages=st.lists(_messages, max_size=4),
    tools=st.lists(_tools, max_size=3),
    tool_choice=_tool_choices,
    numbers=st.fixed_dictionaries(
        {
            "max_tokens": _optional(_int32()),
            "temperature": _optional(st.floats(width=32)),
            "top_p": _optional(st.floats(width=32)),
            "top_k": _optional(_int32()),
        }
    ),
    stop=st.lists(_text, max_size=3),
    thinking=_optional(_int32()),
    tags=st.dictionaries(st.text(max_size=8), _text, max_size=3),
    options=_optional(
        _objects.filter(lambda d: "chunk_delay_ms" not in d).map(_struct)  # not a slow stream
    ),
    request_id=st.one_of(st.just(""), st.text(max_size=12), _huge_text),
)

# Requests that pass validation (unless a NaN or Infinity lands in a Struct),
# so that what is deeper (admission, token estimates, the provider) sees
# odd values too: a tool, its use and its result, finite JSON everywhere.
_finite_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**53), 2**53),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
_finite_objects = st.dictionaries(st.text(max_size=10), _finite_json, max_size=6)
_sound_objects = st.one_of(_finite_objects, _finite_objects, _objects)
_sound_cache = st.one_of(
    st.none(),
    st.builds(
        lambda seconds: pb.CacheControl(ttl=duration_pb2.Duration(seconds=seconds)),
        st.integers(1, 315_576_000_000),
    ),
)


def _conversation(
    text: str,
    tool: str,
    schema: dict[str, Any],
    tool_input: dict[str, Any],
    answer: str,
    cache: pb.CacheControl | None,
) -> dict[str, Any]:
    def block(**fields: Any) -> pb.ContentBlock:
        return _with_cache(pb.ContentBlock(**fields), cache)

    return {
        "system": [block(text=answer)],
        "messages": [
            pb.Message(role=pb.ROLE_USER, content=[block(text=text)]),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                content=[
                    block(tool_use=pb.ToolUseBlock(id="a", name=tool, input=_struct(tool_input)))
                ],
            ),
            pb.Message(
                role=pb.ROLE_USER,
                content=[
                    block(
                        tool_result=pb.ToolResultBlock(
                            tool_use_id="a", content=[pb.ContentBlock(text=answer)]
                        )
                    )
                ],
            ),
        ],
        "tools": [pb.Tool(name=tool, input_schema=_struct({"type": "object", **schema}))],
    }


_conversations = st.builds(
    _conversation,
    text=_text,
    tool=st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True),
    schema=_sound_objects,
    tool_input=_sound_objects,
    answer=_text,
    cache=_sound_cache,
)
_sound_generate_requests = st.builds(
    lambda model, conversation, numbers, stop, options: pb.GenerateRequest(
        model=model,
        stop_sequences=stop,
        provider_options=_struct(options),
        **conversation,
        **{k: v for k, v in numbers.items() if v is not None},
    ),
    model=st.sampled_from(["echo", "tiny"]),
    conversation=_conversations,
    numbers=st.fixed_dictionaries(
        {
            "max_tokens": _optional(st.integers(1, 50)),
            "temperature": _optional(st.floats(0, 2, width=32)),
            "top_p": _optional(st.floats(0, 1, width=32)),
            "top_k": _optional(st.integers(1, INT32[1])),
        }
    ),
    stop=st.lists(st.text(min_size=1, max_size=8), max_size=2),
    options=_sound_objects.filter(lambda d: "chunk_delay_ms" not in d),
)
_count_requests = st.one_of(
    st.builds(
        pb.CountTokensRequest,
        model=_models,
        system=st.lists(_blocks, max_size=2),
        messages=st.lists(_messages, max_size=4),
        tools=st.lists(_tools, max_size=3),
    ),
    st.builds(
        lambda model, conversation: pb.CountTokensRequest(model=model, **conversation),
        st.sampled_from(["echo", "tiny"]),
        _conversations,
    ),
)

# -- Calls --------------------------------------------------------------------------------


def _raw(running: RunningGateway, method: str) -> Callable[..., Any]:
    if method == "StreamGenerate":
        return running.channel.unary_stream(
            SERVICE + method, request_serializer=None, response_deserializer=None
        )
    return running.channel.unary_unary(
        SERVICE + method, request_serializer=None, response_deserializer=None
    )


async def _answer(running: RunningGateway, method: str, payload: bytes) -> grpc.StatusCode:
    """The status of one call with `payload` as the request's bytes."""
    call = _raw(running, method)
    try:
        if method == "StreamGenerate":
            async for _ in call(payload, timeout=TIMEOUT_S):
                pass
        else:
            await call(payload, timeout=TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        assert error.code() in DEFINITE, (method, error.code(), error.details()[:500])
        return error.code()
    return grpc.StatusCode.OK


async def _still_serving(running: RunningGateway) -> None:
    reply = await running.stub.Generate(request("still there?"), timeout=TIMEOUT_S)
    assert reply.content


@examples(300)
@given(
    req=st.one_of(_generate_requests, _sound_generate_requests),
    method=st.sampled_from(["Generate", "StreamGenerate"]),
)
async def test_any_generate_request_gets_a_definite_answer(
    running: RunningGateway, req: pb.GenerateRequest, method: str
) -> None:
    code = await _answer(running, method, req.SerializeToString())
    event(f"{method}: {code.name}")


@examples(200)
@given(req=_count_requests)
async def test_any_count_tokens_request_gets_a_definite_answer(
    running: RunningGateway, req: pb.CountTokensRequest
) -> None:
    code = await _answer(running, "CountTokens", req.SerializeToString())
    event(code.name)


# -- Bytes that are no request ----------------------------------------------------------------

# Same-length stand-ins for a 4-byte placeholder: none is valid UTF-8.
_INVALID_UTF8 = [
    b"\xff\xff\xff\xff",
    b"\xc3\x28ab",  # a lead byte without its continuation
    b"\xed\xa0\x80a",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xc0\xafab",  # an overlong encoding
    b"a\x80bc",  # a lone continuation byte
]
PLACEHOLDER = "\u00a7\u00a7"  # two characters, four bytes of UTF-8


def _placed(where: str) -> pb.GenerateRequest:
    """A request with PLACEHOLDER in one string field (of the kinds a request has)."""
    req = request()
    block = req.messages[0].content[0]
    if where == "model":
        req.model = PLACEHOLDER
    elif where == "text":
        block.text = PLACEHOLDER
    elif where == "system":
        req.system.add(text=PLACEHOLDER)
    elif where == "tool_name":
        req.tools.add(name=PLACEHOLDER)
    elif where == "struct_key":
        req.provider_options.update({PLACEHOLDER: 1})
    elif where == "struct_value":
        req.tools.add(name="t").input_schema.update({"type": PLACEHOLDER})
    elif where == "tag_key":
        req.metadata.tags[PLACEHOLDER] = "v"
    elif where == "tag_value":
        req.metadata.tags["k"] = PLACEHOLDER
    elif where == "request_id":
        req.request_id = PLACEHOLDER
    elif where == "stop":
        req.stop_sequences.append(PLACEHOLDER)
    return req


_PLACES = [
    "model",
    "text",
    "system",
    "tool_name",
    "struct_key",
    "struct_value",
    "tag_key",
    "tag_value",
    "request_id",
    "stop",
]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _deep_tool(depth: int) -> bytes:
    """A tool whose input_schema nests `depth` deep, as bytes of the field
    `tools` that GenerateRequest and CountTokensRequest share (protobuf
    could not build it)."""
    value = _field(2, 1, b"\x00" * 8)  # Value.number_value = 0.0
    struct = b""
    for _ in range(depth):
        entry = _length_delimited(1, b"a") + _length_delimited(2, value)  # FieldsEntry
        struct = _length_delimited(1, entry)  # Struct.fields
        value = _length_delimited(5, struct)  # Value.struct_value
    tool = _length_delimited(1, b"deep") + _length_delimited(3, struct)  # name, input_schema
    return _length_delimited(4, tool)


_good_bytes = st.sampled_from(
    [
        request().SerializeToString(),
        request(
            tools=[pb.Tool(name="lookup", input_schema=_struct({"type": "object"}))],
            max_tokens=10,
            temperature=0.5,
        ).SerializeToString(),
    ]
)
# Fields of GenerateRequest sent with any varint: max_tokens, top_k, and
# ones of other wire types: temperature (fixed32), an unknown field.
_appended = st.one_of(
    st.builds(
        lambda number, value: _field(number, 0, _varint(value)),
        st.sampled_from([6, 9, 999]),
        st.one_of(st.sampled_from(VARINT_EDGES), st.integers(0, 2**64 - 1)),
    ),
    st.builds(lambda raw: _field(7, 5, raw), st.binary(min_size=4, max_size=4)),
    st.builds(lambda depth: _deep_tool(depth), st.sampled_from([20, 40, 101, 400])),
    st.builds(_length_delimited, st.integers(1, 20), st.binary(max_size=40)),
    # A tool whose schema holds an odd double (NaN and Infinity included).
    st.builds(
        lambda number: _length_delimited(
            4, pb.Tool(name="odd", input_schema=_struct({"x": number})).SerializeToString()
        ),
        st.one_of(_specials, st.floats()),
    ),
    # A message whose block's cache_control.ttl holds any int64 seconds and int32 nanos.
    st.builds(
        lambda ttl: _length_delimited(
            3,
            pb.Message(
                role=pb.ROLE_USER,
                content=[pb.ContentBlock(text="t", cache_control=pb.CacheControl(ttl=ttl))],
            ).SerializeToString(),
        ),
        _durations,
    ),
)


def _mutated(data: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for position, value in zip(positions, values, strict=False):
        out[position % len(out)] = value
    return bytes(out)


_payloads = st.one_of(
    # Invalid UTF-8 where a string field holds a placeholder of the same length.
    st.builds(
        lambda where, bad: _placed(where).SerializeToString().replace(PLACEHOLDER.encode(), bad),
        st.sampled_from(_PLACES),
        st.sampled_from(_INVALID_UTF8),
    ),
    # A request cut short.
    st.builds(lambda data, cut: data[: cut % len(data)], _good_bytes, st.integers(0, 10**6)),
    # A request with some bytes changed.
    st.builds(
        _mutated,
        _good_bytes,
        st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
        st.lists(st.integers(0, 255), min_size=1, max_size=4),
    ),
    # A request with fields appended: edge varints, random fixed32, nesting, junk.
    st.builds(lambda data, extra: data + extra, _good_bytes, _appended),
    # Garbage.
    st.binary(max_size=200),
)


@examples(300)
@given(
    payload=_payloads,
    method=st.sampled_from(["Generate", "StreamGenerate", "CountTokens"]),
)
async def test_any_bytes_get_a_definite_answer(
    running: RunningGateway, payload: bytes, method: str
) -> None:
    code = await _answer(running, method, payload)
    event(f"{method}: {code.name}")
    await _still_serving(running)


@pytest.mark.parametrize("method", ["Generate", "StreamGenerate", "CountTokens"])
async def test_large_requests_are_parsed_by_the_handler_with_the_same_answers(
    running: RunningGateway, method: str
) -> None:
    # Past PARSE_AT_ONCE_BYTES a request is parsed in a step of its own
    # (interceptors/malformed_request.py): garbage is still refused as
    # malformed, a sound request is still read (this one is longer than the
    # model's window: refused by its length, which only a parsed request has).
    size = PARSE_AT_ONCE_BYTES + 1
    assert await _reason(running, method, b"\xff" * size) == "MALFORMED_REQUEST"
    text = "word " * (size // 5 + 1)
    if method == "CountTokens":
        sound = pb.CountTokensRequest(model="tiny", messages=[user(text)]).SerializeToString()
        assert await _answer(running, method, sound) == grpc.StatusCode.OK
    else:
        sound = request(text).SerializeToString()
        assert await _reason(running, method, sound) == "CONTEXT_WINDOW_EXCEEDED"
    assert len(sound) > PARSE_AT_ONCE_BYTES


async def _reason(running: RunningGateway, method: str, payload: bytes) -> str:
    """The ErrorInfo reason of a call that fails."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = _raw(running, method)
        if method == "StreamGenerate":
            async for _ in call(payload, timeout=TIMEOUT_S):
                pass
        else:
            await call(payload, timeout=TIMEOUT_S)
    info = detail(rich_status(caught.value), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info.reason


# -- The HTTP front door ------------------------------------------------------------------

_BASES: dict[str, dict[str, Any]] = {
    "/v1/messages": {
        "model": "echo",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
    },
    "/v1/chat/completions": {
        "model": "echo",
        "max_completion_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        ],
    },
    "/v1/responses": {
        "model": "echo",
        "max_output_tokens": 16,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
    },
}
# Keys each endpoint reads, so that replaced values reach the decoders.
_KEYS = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "messages",
    "input",
    "instructions",
    "system",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_sequences",
    "stream",
    "thinking",
    "reasoning",
    "reasoning_effort",
    "metadata",
    "n",
    "top_logprobs",
    "logprobs",
    "response_format",
    "text",
    "cache_control",
    "ttl",
    "type",
    "role",
    "content",
    "input_schema",
    "parameters",
    "budget_tokens",
    "seed",
]
# JSON texts that Python's json module parses into values that other code
# may choke on: numbers past a float (1e400 is inf), integers past int64,
# lone surrogates, nesting near the parser's recursion limit.
_TRICKY_JSON = [
    "1e400",
    "-1e400",
    "1e308",
    "5e-324",
    str(2**63),
    str(2**64),
    "1" + "0" * 60,
    "-" + "9" * 4000,
    "1" + "0" * 5000,  # past Python's 4300-digit limit for int()
    '"\\ud800"',
    '"\\udfff x"',
    '"' + "x" * 100_000 + '"',
    "[" * 900 + "]" * 900,
    '{"a":' * 900 + "1" + "}" * 900,
    "[" * 5000 + "]" * 5000,
]
_MARKER = "@@tricky@@"

_http_values = st.one_of(_json, st.sampled_from(_TRICKY_JSON).map(lambda t: (_MARKER, t)))


def _set_at(document: Any, path: list[int], key: str, value: Any) -> None:
    """Sets `key` of the object reached by following `path` (indices into
    the containers met) from `document`."""
    node = document
    for step in path:
        children = list(node.values()) if isinstance(node, dict) else node
        containers = [c for c in children if isinstance(c, dict | list)]
        if not containers:
            break
        node = containers[step % len(containers)]
    if isinstance(node, dict):
        node[key] = value
    elif isinstance(node, list) and node:
        node[len(key) % len(node)] = value
    else:
        node.append(value)


def _body(endpoint: str, edits: list[tuple[list[int], str, Any]]) -> bytes:
    document = json.loads(json.dumps(_BASES[endpoint]))
    tricky: list[str] = []
    for path, key, value in edits:
        if isinstance(value, tuple):  # raw JSON text, spliced in below
            tricky.append(value[1])
            value = f"{_MARKER}{len(tricky) - 1}"
        _set_at(document, path, key, value)
    text = json.dumps(document, allow_nan=True)  # NaN too: the parser must refuse it
    for i, raw in enumerate(tricky):
        text = text.replace(json.dumps(f"{_MARKER}{i}"), raw)
    return text.encode()


_edits = st.lists(
    st.tuples(
        st.lists(st.integers(0, 5), max_size=4),
        st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)),
        _http_values,
    ),
    min_size=1,
    max_size=4,
)


async def _post(url: str, endpoint: str, body: bytes) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=TIMEOUT_S) as client:
        response = await client.post(
            url + endpoint,
            content=body,
            headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
        )
        await response.aread()
    return response


@examples(150)
@given(endpoint=st.sampled_from(sorted(_BASES)), edits=_edits)
async def test_any_json_body_gets_a_definite_answer(url: str, endpoint: str, edits: Any) -> None:
    body = _body(endpoint, edits)
    response = await _post(url, endpoint, body)
    event(f"{endpoint}: {response.status_code}")
    assert response.status_code < 500, (endpoint, body[:300], response.text[:500])
    # A stream that failed after its 200 ends with an "internal error" event.
    assert b"internal error" not in response.content, (endpoint, body[:300], response.text[-500:])


# Where a lone surrogate lands in each endpoint's base body (the echo model
# would repeat the text in its answer).
_TEXT_PATHS = {
    "/v1/messages": ("messages", 0, "content", 0, "text"),
    "/v1/chat/completions": ("messages", 0, "content"),
    "/v1/responses": ("input", 0, "content", 0, "text"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", sorted(_BASES))
async def test_a_lone_surrogate_is_refused_naming_its_field(
    url: str, endpoint: str, stream: bool
) -> None:
    document = json.loads(json.dumps(_BASES[endpoint]))
    *parents, last = _TEXT_PATHS[endpoint]
    node = document
    for step in parents:
        node = node[step]
    node[last] = "hi \ud800 there"  # the JSON escape of a lone surrogate
    document["stream"] = stream
    body = json.dumps(document).replace("\\\\ud800", "\\ud800").encode()
    assert b'"hi \\ud800 there"' in body
    response = await _post(url, endpoint, body)
    assert response.status_code == 400, response.text[:500]
    field = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in _TEXT_PATHS[endpoint])
    assert field.lstrip(".") in response.text
    assert "lone surrogate" in response.text
