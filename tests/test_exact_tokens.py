"""Exact token counts for OpenAI models, offline (issue 14, item 3).

The shipped encodings are tiktoken's; counts for known strings were computed
with tiktoken and agree with two independent tokenizers that ship their own
copies of the encodings (quicktok-v1 and bpe-openai on PyPI); the chat
examples are OpenAI's cookbook ("How to count tokens with tiktoken"), whose
counts the API confirmed. Tests needing tiktoken skip without it; the
fallback to the estimate is tested either way.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server import openai_tokenizer
from server.openai_tokenizer import ChatCount, TextEncoding, count_chat, count_request, load
from server.schema import Message, Role, TextBlock, Tool, ToolUseBlock
from server.token_estimate import count_request as estimate_request
from server.token_estimate import count_text
from tests.conftest import RunningGateway
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import provider_config, start_upstream_gateway, text
from tests.upstream_fixtures import user_blocks as user

needs_tiktoken = pytest.mark.skipif(
    importlib.util.find_spec("tiktoken") is None, reason="tiktoken is not installed"
)


def encoding(name: str) -> TextEncoding:
    loaded = load(name)
    assert loaded is not None
    return loaded


def tokens(name: str, value: str) -> int:
    return len(encoding(name).encode_ordinary(value))


def says(content: str, role: Role = Role.USER) -> Message:
    return Message(role=role, content=[TextBlock(text=content)])


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """Empties the loaded encodings for one test, and puts them back after it."""
    saved = dict(openai_tokenizer._encodings), dict(openai_tokenizer._model_encodings)
    openai_tokenizer._encodings.clear()
    openai_tokenizer._model_encodings.clear()
    yield
    openai_tokenizer._encodings.clear()
    openai_tokenizer._model_encodings.clear()
    openai_tokenizer._encodings.update(saved[0])
    openai_tokenizer._model_encodings.update(saved[1])


# -- The encodings -------------------------------------------------------------


@needs_tiktoken
@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_the_shipped_encodings_are_tiktokens(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own constructor, fed our ranks instead of its download.
    public = importlib.import_module("tiktoken_ext.openai_public")
    ranks = openai_tokenizer.read_ranks(name)  # checks tiktoken's pinned SHA-256
    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *_a, **_k: ranks)
    reference: dict[str, Any] = getattr(public, name)()
    shipped = openai_tokenizer.SHIPPED[name]
    assert reference["pat_str"] == shipped.pat_str
    assert reference["special_tokens"] == shipped.special_tokens
    assert encoding(name).name == name


@needs_tiktoken
@pytest.mark.parametrize(
    ("value", "o200k", "cl100k"),
    [
        ("hello world", 2, 2),
        ("The quick brown fox jumps over the lazy dog.", 10, 10),
        ("日本語の文章です。", 6, 8),
        ("Привет, как дела?", 6, 8),
        ("😀🎉👍🏽", 6, 11),
        ("x" * 1000, 125, 125),
        ("0.8444218515250481", 8, 8),
        ("def count_text(text: str) -> int:\n    return len(text)\n", 15, 15),
        # Special tokens in a caller's text are text, as the API treats them.
        ("<|endoftext|>", 7, 7),
    ],
)
def test_counts_of_known_strings(value: str, o200k: int, cl100k: int) -> None:
    assert (tokens("o200k_base", value), tokens("cl100k_base", value)) == (o200k, cl100k)


@needs_tiktoken
@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        # Unknown to tiktoken, or an encoding not shipped: no exact count.
        ("gpt-6-sol", None),
        ("gpt-oss-120b", None),
        ("llama-local", None),
    ],
)
def test_which_models_count_exactly(model: str, name: str | None) -> None:
    assert openai_tokenizer.encoding_name(model) == name


# -- Chat requests -----------------------------------------------------------

JARGON = [
    "You are a helpful, pattern-following assistant that translates corporate jargon"
    " into plain English.",
    "New synergies will help drive top-line growth.",
    "Things working well together will increase revenue.",
    "Let's circle back when we have more bandwidth to touch base on opportunities for"
    " increased leverage.",
    "Let's talk later when we're less busy about how to do better.",
    "This late pivot means we don't have time to boil the ocean for the client deliverable.",
]


@needs_tiktoken
@pytest.mark.parametrize(("name", "api_count"), [("o200k_base", 124), ("cl100k_base", 129)])
def test_the_message_format_is_the_cookbooks(name: str, api_count: int) -> None:
    # The cookbook's example, as the API counted it (gpt-4o: 124, gpt-4: 129).
    # Its four few-shot messages have a `name`, which our schema has not: the
    # cookbook counts one token more for each, besides the name itself.
    # Their role is "system", one token as "user" is.
    names = ["example_user", "example_assistant"] * 2
    name_tokens = sum(tokens(name, n) + 1 for n in names)
    counted = count_chat(
        encoding(name), [TextBlock(text=JARGON[0])], [says(t) for t in JARGON[1:]], []
    )
    assert counted == ChatCount(api_count - name_tokens, exact=True)


WEATHER_TOOL = Tool(
    name="get_current_weather",
    description="Get the current weather in a given location",
    input_schema={
        "type": "object",
        "properties": {
            "location": {
                "type": "string",
                "description": "The city and state, e.g. San Francisco, CA",
            },
            "unit": {
                "type": "string",
                "description": "The unit of temperature to return",
                "enum": ["celsius", "fahrenheit"],
            },
        },
        "required": ["location"],
    },
)
WEATHER_SYSTEM = [
    TextBlock(text="You are a helpful assistant that can answer to questions about the weather.")
]
WEATHER_QUESTION = says("What's the weather like in San Francisco?")


@needs_tiktoken
@pytest.mark.parametrize(("name", "api_count"), [("o200k_base", 101), ("cl100k_base", 105)])
def test_tools_count_by_the_cookbooks_formula(name: str, api_count: int) -> None:
    counted = count_chat(encoding(name), WEATHER_SYSTEM, [WEATHER_QUESTION], [WEATHER_TOOL])
    # The API's count for the cookbook's example, but flagged: the formula is
    # OpenAI's estimate, not its published format.
    assert counted == ChatCount(api_count, exact=False)


@needs_tiktoken
def test_what_openai_does_not_publish_is_flagged() -> None:
    o200k = encoding("o200k_base")
    plain = count_chat(o200k, WEATHER_SYSTEM, [WEATHER_QUESTION], [])
    assert plain.exact
    two_parts = Message(role=Role.USER, content=[TextBlock(text="a"), TextBlock(text="b")])
    call = Message(role=Role.ASSISTANT, content=[ToolUseBlock(id="t1", name="f", input={"x": 1})])
    assert not count_chat(o200k, [], [two_parts], []).exact
    assert not count_chat(o200k, [], [says("hi"), call], []).exact
    assert not count_chat(o200k, [TextBlock(text="a"), TextBlock(text="b")], [], []).exact


# -- Against the conservative bound --------------------------------------------

_WORDS = (
    "the of and to in is was for on that with as by it at from this be are or an have"
    " gateway token model request budget limit stream provider latency throughput"
    " internationalization misconfiguration Kubernetes PostgreSQL asyncio OpenAI"
)
WORDS = st.sampled_from(_WORDS.split(" "))
PUNCTUATION = st.sampled_from([" ", " ", " ", ", ", ". ", "\n", ": ", " (", ") ", "-", "'s "])
PROSE = st.lists(st.tuples(WORDS, PUNCTUATION).map("".join), max_size=100).map("".join)
NUMBERS = st.integers(0, 10**20).map(str) | st.floats(allow_nan=False).map(repr)
HEX = st.binary(min_size=1, max_size=200).map(bytes.hex)
UUIDS = st.uuids().map(str)
# Base64 of random bytes; a run of letters without a digit counts as letters
# (see test_where_only_a_tokenizer_knows), so each sample has some digits.
BASE64 = (
    st.binary(min_size=12, max_size=300)
    .map(lambda b: base64.b64encode(b).decode())
    .filter(lambda s: sum(c.isdigit() for c in s) * 12 >= len(s))
)
# Common hanzi and kanji, and kana: about a token each in o200k_base.
COMMON_HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会"
KANA = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
)
CJK = st.text(st.sampled_from(COMMON_HAN + KANA + "。、"), max_size=100)
RUSSIAN = st.lists(
    st.sampled_from(["Привет", "как", "дела", "Москва", "это", "текст", "для", "модели"]),
    max_size=30,
).map(" ".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | WORDS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(WORDS, inner),
    max_leaves=20,
).map(json.dumps)
ORDINARY = [PROSE, NUMBERS, HEX, UUIDS, BASE64, RUSSIAN, JSON_VALUES]


def ordinary_text(*kinds: st.SearchStrategy[str], parts: int) -> st.SearchStrategy[str]:
    """Text of `parts` or more pieces of the given kinds (60: thousands of characters)."""
    return st.lists(st.one_of(*kinds), min_size=parts, max_size=parts + 20).map(" ".join)


@needs_tiktoken
@settings(max_examples=200, deadline=None)
@given(ordinary_text(*ORDINARY, CJK, parts=60))
def test_the_estimate_is_never_below_o200k_on_ordinary_text(value: str) -> None:
    assert tokens("o200k_base", value) <= count_text(value)


@needs_tiktoken
@settings(max_examples=200, deadline=None)
@given(ordinary_text(*ORDINARY, parts=60))
def test_the_estimate_is_never_below_cl100k_on_ordinary_text_but_cjk(value: str) -> None:
    assert tokens("cl100k_base", value) <= count_text(value)


# A few words can count more than their share of the estimate's margin
# ("OpenAI" is two tokens, "misconfiguration" three, "the," two): a snippet
# may count a few tokens more than its estimate, never many.
def near(exact: int, estimate: int) -> bool:
    return exact <= estimate * 1.25 + 3


@needs_tiktoken
@settings(max_examples=1000, deadline=None)
@given(ordinary_text(*ORDINARY, CJK, parts=1))
def test_a_snippet_counts_at_most_a_few_tokens_more_in_o200k(value: str) -> None:
    assert near(tokens("o200k_base", value), count_text(value))


@needs_tiktoken
@settings(max_examples=1000, deadline=None)
@given(ordinary_text(*ORDINARY, parts=1))
def test_a_snippet_counts_at_most_a_few_tokens_more_in_cl100k(value: str) -> None:
    assert near(tokens("cl100k_base", value), count_text(value))


@needs_tiktoken
@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("😀🎉👍🏽🚀" * 100, "o200k_base"),  # more than a token a character
        ("\U00020000\U00020001\U0002a6d0" * 100, "o200k_base"),  # rare CJK: a token a byte
        ("丁丂七丄丅丆万丈三上下丌不与丏" * 20, "o200k_base"),  # uncommon hanzi
        (COMMON_HAN * 10, "cl100k_base"),  # hanzi: more than a token each in cl100k
        ("한국어는 대한민국의 공용어이다. " * 20, "cl100k_base"),  # so is hangul
        ("qWeRtYuIoPa " * 20, "o200k_base"),  # random letters, short and without a digit
    ],
)
def test_where_only_a_tokenizer_knows(value: str, name: str) -> None:
    # The bound stays at most a token a character (the context-window check's
    # cheap bound relies on it), and letters count as words: these count more
    # than estimated, as server/token_estimate.py says.
    assert count_text(value) < tokens(name, value)


# -- Loading and threads -----------------------------------------------------


@needs_tiktoken
@pytest.mark.usefixtures("fresh_caches")
def test_an_encoding_loads_once_for_concurrent_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []
    build = openai_tokenizer._build

    def counted_build(name: str) -> TextEncoding | None:
        builds.append(name)
        return build(name)

    monkeypatch.setattr(openai_tokenizer, "_build", counted_build)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(load, ["o200k_base"] * 8))
    assert builds == ["o200k_base"]
    assert all(e is loaded[0] for e in loaded)


class _ThreadRecorder:
    """An encoding that notes the thread each call runs on."""

    def __init__(self, inner: TextEncoding) -> None:
        self.inner = inner
        self.threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def encode_ordinary(self, text: str) -> list[int]:
        self.threads.append(threading.current_thread())
        return self.inner.encode_ordinary(text)


@needs_tiktoken
@pytest.mark.usefixtures("fresh_caches")
async def test_large_requests_and_first_loads_are_counted_off_the_event_loop() -> None:
    loop_thread = threading.current_thread()
    first = await count_request("gpt-4o", [], [says("hello world")], [])
    assert first == ChatCount(3 + 1 + 2 + 3, exact=True)
    recorder = _ThreadRecorder(encoding("o200k_base"))
    openai_tokenizer._encodings["o200k_base"] = recorder
    await count_request("gpt-4o", [], [says("hello world")], [])
    assert set(recorder.threads) == {loop_thread}  # small: a few microseconds inline
    recorder.threads.clear()
    big = "lorem ipsum " * 6_000  # 72,000 characters
    expected = 7 + len(recorder.inner.encode_ordinary(big))
    counted = await count_request("gpt-4o", [], [says(big)], [])
    assert counted == ChatCount(expected, exact=True)
    assert recorder.threads and loop_thread not in recorder.threads


@pytest.mark.usefixtures("fresh_caches")
async def test_without_tiktoken_there_is_no_exact_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_tokenizer, "_tiktoken", lambda: None)
    assert await count_request("gpt-4o", [], [says("hello world")], []) is None
    assert openai_tokenizer.encoding_name("gpt-4o") is None


@needs_tiktoken
@pytest.mark.usefixtures("fresh_caches")
async def test_a_missing_encoding_file_falls_back_to_the_estimate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(openai_tokenizer, "_DATA_FOLDER", "no_such_folder")
    assert await count_request("gpt-4o", [], [says("hello world")], []) is None
    assert "cannot load the o200k_base encoding" in caplog.text
    # Once: the next call does not try again.
    caplog.clear()
    assert await count_request("gpt-4o", [], [says("hello again")], []) is None
    assert caplog.text == ""


# -- The OpenAI provider's CountTokens, end to end --------------------------------


@pytest.fixture(scope="module")
async def exact_gateway(fake_upstream: FakeUpstream, _openai_key_in_environment: None) -> Any:
    providers = provider_config(fake_upstream)
    providers["openai"]["models"] += [
        {"id": "gpt-4o-pinned", "upstream_id": "gpt-4o-2024-08-06"},
        {"id": "gpt-4-legacy", "upstream_id": "gpt-4-0613"},
    ]
    gw: RunningGateway = await start_upstream_gateway(fake_upstream, providers=providers)
    yield gw
    await gw.aclose()


def weather_request(model: str, **fields: Any) -> pb.CountTokensRequest:
    return pb.CountTokensRequest(
        model=model,
        system=[text(WEATHER_SYSTEM[0].text)],
        messages=[user(text("What's the weather like in San Francisco?"))],
        **fields,
    )


@needs_tiktoken
@pytest.mark.parametrize(("model", "expected"), [("gpt-4o-pinned", 33), ("gpt-4-legacy", 34)])
async def test_count_tokens_is_exact_for_openai_models(
    exact_gateway: RunningGateway, fake: FakeUpstream, model: str, expected: int
) -> None:
    stub: pb_grpc.GenerationServiceStub = exact_gateway.stub
    counted = await stub.CountTokens(weather_request(model))
    assert (counted.input_tokens, counted.estimated) == (expected, False)
    assert fake.requests == []  # counted offline: nothing reached the upstream


@needs_tiktoken
async def test_count_tokens_with_tools_is_the_cookbooks_estimate(
    exact_gateway: RunningGateway, fake: FakeUpstream
) -> None:
    schema = pb.Tool(name=WEATHER_TOOL.name, description=WEATHER_TOOL.description)
    schema.input_schema.update(WEATHER_TOOL.input_schema)
    counted = await exact_gateway.stub.CountTokens(weather_request("gpt-4o-pinned", tools=[schema]))
    assert (counted.input_tokens, counted.estimated) == (101, True)
    assert fake.requests == []


async def test_count_tokens_of_other_models_is_the_estimate(
    exact_gateway: RunningGateway, fake: FakeUpstream
) -> None:
    counted = await exact_gateway.stub.CountTokens(weather_request("gpt-6-sol"))
    estimate = estimate_request(WEATHER_SYSTEM, [WEATHER_QUESTION], [])
    assert (counted.input_tokens, counted.estimated) == (estimate, True)
    assert fake.requests == []
