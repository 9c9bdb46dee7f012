"""OpenAI's Chat Completions: `POST /v1/chat/completions`.

The Chat Completions dialect of the generation loop (generation.py). A call
to an OpenAI or OpenAI-compatible deployment is relayed: the body goes
upstream as it came (the model renamed for an alias; a stream always asks
for usage, which the gateway bills from, and the client sees the usage chunk
only if it asked for it), and the upstream's chunks come back as they
arrive. A call to any other deployment (Anthropic, the offline models) is
translated: chat_decoding.py reads the body, chat_encoding.py writes the
chunks, `data: [DONE]` last. A failure after the stream began is a last
`data: {"error": ...}` chunk. Errors are OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from server.errors import GatewayError
from server.http_edge import errors
from server.http_edge.chat_decoding import DecodedChat, decode_chat, fill_max_tokens
from server.http_edge.chat_encoding import ChatStreamEncoder, encode_completion, error_chunk
from server.http_edge.generation import Decoded, Encoder
from server.routing import Route
from server.schema import OPENAI_CHAT, GenerationResponse

# SSE comments: every SSE parser skips them, the OpenAI SDKs included.
KEEPALIVE = b": ping\n\n"
# Headers of an OpenAI client the upstream may act on (betas); credentials,
# organisation and project, which bill the call, are the gateway's.
_FORWARDED = frozenset({"openai-beta"})


def openai_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name in _FORWARDED}


def openai_stream_error(error: GatewayError, protocol: str) -> bytes:
    """A failure after an OpenAI-format stream began: the upstream's own error event
    when it was relayed, else an error chunk."""
    reply = error.upstream_reply
    if reply is not None and reply.protocol == protocol and reply.event:
        return reply.event
    status, _ = errors.status_of(error)
    document = json.loads(errors.openai_error_body(status, errors.message_of(error)))
    details = document["error"]
    return error_chunk(details["message"], details["type"], details["code"])


class ChatDialect(errors.OpenAIErrors):
    """OpenAI's Chat Completions format, for the generation loop."""

    span_name = "POST /v1/chat/completions"
    ping = KEEPALIVE

    def __init__(self) -> None:
        super().__init__(OPENAI_CHAT)

    def decode(self, document: dict[str, Any], request_id: str, text_checked: bool) -> Decoded:
        chat = decode_chat(
            document, request_id=request_id, deadline=None, text_checked=text_checked
        )
        return Decoded(chat.request, chat.stream, chat.untranslatable, options={"chat": chat})

    def routed(self, decoded: Decoded, route: Route) -> None:
        chat: DecodedChat = decoded.options["chat"]
        fill_max_tokens(chat, route.model.default_max_tokens)

    def relayed(self, document: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def forwarded_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return openai_headers(headers)

    def encoder(self, decoded: Decoded, request_id: str) -> Encoder:
        chat: DecodedChat = decoded.options["chat"]
        return ChatStreamEncoder(
            completion_id=f"chatcmpl-{request_id}",
            model=decoded.request.model,
            created=int(time.time()),
            include_usage=chat.include_usage,
        )

    def whole(self, response: GenerationResponse, decoded: Decoded, request_id: str) -> bytes:
        document = encode_completion(
            response,
            completion_id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=response.model,
        )
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def stream_error(self, error: GatewayError, encoder: Encoder | None) -> bytes:
        return openai_stream_error(error, self.protocol)
