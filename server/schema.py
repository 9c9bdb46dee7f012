"""The gateway's internal, provider-neutral request and response types.

The servicer turns protobuf into these types at the edge (server/wire.py),
and providers speak only these: never protobuf, never another provider's
dict shapes. They are plain slotted dataclasses because they are built on
the hot path of every call; pydantic is kept for configuration.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from server.errors import FieldViolation
    from server.json_members import Members


class Role(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class StopReason(enum.Enum):
    END_TURN = "end_turn"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_USE = "tool_use"
    REFUSAL = "refusal"
    CONTENT_FILTER = "content_filter"
    PAUSE_TURN = "pause_turn"
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"
    ANY = "any"
    NONE = "none"
    TOOL = "tool"


@dataclass(slots=True)
class CacheControl:
    """A prompt-caching breakpoint; `ttl_seconds` None means the provider default."""

    ttl_seconds: float | None = None


@dataclass(slots=True)
class TextBlock:
    text: str
    cache_control: CacheControl | None = None


@dataclass(slots=True)
class ImageBlock:
    """An image given inline (`data` + `media_type`) or by `url`."""

    data: bytes | None = None
    url: str | None = None
    media_type: str = ""
    cache_control: CacheControl | None = None


@dataclass(slots=True)
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any] = field(default_factory=dict)
    cache_control: CacheControl | None = None


@dataclass(slots=True)
class ToolResultBlock:
    tool_use_id: str
    content: list[TextBlock | ImageBlock] = field(default_factory=list)
    is_error: bool = False
    cache_control: CacheControl | None = None


@dataclass(slots=True)
class ThinkingBlock:
    text: str = ""
    signature: str = ""
    redacted_data: str = ""
    cache_control: CacheControl | None = None


ContentBlock: TypeAlias = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


@dataclass(slots=True)
class Message:
    role: Role
    content: list[ContentBlock]


@dataclass(slots=True)
class Tool:
    name: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    tool_name: str = ""
    disable_parallel_tool_use: bool = False


@dataclass(slots=True)
class CallerMetadata:
    end_user_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)


# The wire formats the HTTP front door speaks (Passthrough.protocol).
ANTHROPIC_MESSAGES = "anthropic.messages"
OPENAI_CHAT = "openai.chat_completions"
OPENAI_RESPONSES = "openai.responses"


@dataclass(slots=True)
class Passthrough:
    """A request to forward verbatim to a provider that speaks its wire format.

    Set by the HTTP front door: a provider of `protocol` (e.g.
    "anthropic.messages") sends `body` as it came, its model aside, with
    `headers`, and yields, besides the events, the upstream's bytes as
    RawChunk events; any other provider serves the decoded request.
    """

    protocol: str
    body: bytes  # the request body as the client sent it
    document: dict[str, Any]  # `body`, parsed
    headers: dict[str, str] = field(default_factory=dict)  # forwarded as they came
    query: str = ""
    # What a translation to another API would lose: only a provider that relays
    # `protocol` may serve the request then (server/routing/router.py).
    untranslatable: list[FieldViolation] = field(default_factory=list)
    # Where `body`'s top-level values lie, so that a value the gateway sets
    # (the model of an alias) is written into the body as it came.
    members: Members | None = None


@dataclass(slots=True)
class GenerationRequest:
    """A validated generation request.

    `model` is the model the caller asked for; `max_tokens` is always set
    (the servicer fills in the model's default). `request_id` is never empty.
    """

    model: str
    messages: list[Message]
    max_tokens: int
    request_id: str
    system: list[TextBlock] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    thinking_budget_tokens: int | None = None
    metadata: CallerMetadata = field(default_factory=CallerMetadata)
    provider_options: dict[str, Any] = field(default_factory=dict)
    # False when the caller wants only the whole response (Generate): a
    # provider may then make one non-streaming upstream call and replay its
    # result as events through the same decoder (cheaper than parsing SSE).
    incremental: bool = True
    # When the caller's deadline runs out, on the event loop's clock
    # (loop.time()); None: no deadline. Upstream calls get what is left.
    deadline: float | None = None
    # Set when the request came through the HTTP front door in a provider's
    # own format (see Passthrough).
    passthrough: Passthrough | None = None
    # How many answers the caller pays for (Chat Completions' `n`, relayed to
    # an OpenAI deployment): the reservation covers max_tokens of each.
    choices: int = 1


@dataclass(slots=True)
class TokenCountRequest:
    model: str
    messages: list[Message]
    system: list[TextBlock] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    deadline: float | None = None  # as GenerationRequest.deadline
    passthrough: Passthrough | None = None  # as GenerationRequest.passthrough


@dataclass(slots=True)
class TokenCount:
    input_tokens: int
    estimated: bool


@dataclass(slots=True)
class Usage:
    """Token counts. Input counts are disjoint (see the proto's Usage)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


@dataclass(slots=True, frozen=True)
class LongContextPricing:
    """The dearer rates of a prompt longer than `above_tokens` (its input, cache
    reads and cache writes together), which then apply to the whole call."""

    above_tokens: int
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cache_read_per_mtok: float = 0.0
    cache_creation_per_mtok: float = 0.0


@dataclass(slots=True, frozen=True)
class Pricing:
    """US dollars per million tokens; `long_context`, when set, the rates of long prompts."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cache_read_per_mtok: float = 0.0
    cache_creation_per_mtok: float = 0.0
    long_context: LongContextPricing | None = None

    def for_prompt(self, prompt_tokens: int) -> Pricing:
        """The flat rates of a call whose prompt is `prompt_tokens` long."""
        tier = self.long_context
        if tier is None or prompt_tokens <= tier.above_tokens:
            return self
        return Pricing(
            input_per_mtok=tier.input_per_mtok,
            output_per_mtok=tier.output_per_mtok,
            cache_read_per_mtok=tier.cache_read_per_mtok,
            cache_creation_per_mtok=tier.cache_creation_per_mtok,
        )


def dearest_pricing(prices: Iterable[Pricing]) -> Pricing:
    """Each price at its highest among `prices` (all zero when there are none); a long
    prompt at the highest long-prompt rate, from the lowest threshold of any of them."""
    listed = list(prices)
    tiers = [p.long_context for p in listed if p.long_context is not None]
    longer = [p.for_prompt(sys.maxsize) for p in listed]
    return Pricing(
        input_per_mtok=max((p.input_per_mtok for p in listed), default=0.0),
        output_per_mtok=max((p.output_per_mtok for p in listed), default=0.0),
        cache_read_per_mtok=max((p.cache_read_per_mtok for p in listed), default=0.0),
        cache_creation_per_mtok=max((p.cache_creation_per_mtok for p in listed), default=0.0),
        long_context=LongContextPricing(
            above_tokens=min(t.above_tokens for t in tiers),
            input_per_mtok=max(p.input_per_mtok for p in longer),
            output_per_mtok=max(p.output_per_mtok for p in longer),
            cache_read_per_mtok=max(p.cache_read_per_mtok for p in longer),
            cache_creation_per_mtok=max(p.cache_creation_per_mtok for p in longer),
        )
        if tiers
        else None,
    )


@dataclass(slots=True, frozen=True)
class Cost:
    """The price of one call in billionths of a US dollar (exact sums)."""

    input_nanos: int = 0
    output_nanos: int = 0
    cache_read_nanos: int = 0
    cache_creation_nanos: int = 0
    currency_code: str = "USD"

    @property
    def total_nanos(self) -> int:
        return (
            self.input_nanos + self.output_nanos + self.cache_read_nanos + self.cache_creation_nanos
        )


@dataclass(slots=True, frozen=True)
class Capabilities:
    streaming: bool = True
    tools: bool = False
    images: bool = False
    thinking: bool = False


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """A model a provider serves, as ListModels shows it."""

    id: str
    provider: str
    context_window: int
    max_output_tokens: int
    default_max_tokens: int
    display_name: str = ""
    aliases: tuple[str, ...] = ()
    pricing: Pricing = Pricing()
    capabilities: Capabilities = Capabilities()


@dataclass(slots=True, frozen=True)
class RoutingDecision:
    """Why a routed alias (e.g. `auto`) was served by the model it was."""

    alias: str
    tier: str
    reason: str


@dataclass(slots=True)
class GenerationResponse:
    """A complete response: what folding a stream of events gives."""

    id: str
    model: str
    provider: str
    request_id: str = ""
    upstream_request_id: str = ""
    content: list[ContentBlock] = field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_sequence: str = ""
    usage: Usage = field(default_factory=Usage)
    cost: Cost = field(default_factory=Cost)
    routing: RoutingDecision | None = None


# Service tiers billed at a price of their own, which the gateway does not
# price (OpenAI's priority processing: about twice the standard rates): a call
# asking for one would be reserved and charged at the standard price, so it is
# refused, on every path (provider_options, a relayed body).
UNPRICED_SERVICE_TIERS = frozenset({"priority"})
UNPRICED_SERVICE_TIER = (
    "{tier!r} is billed at a price this gateway does not charge; use 'auto' or 'default'"
)
