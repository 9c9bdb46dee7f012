"""OpenAI's Responses API: `POST /v1/responses`, in the subset Codex CLI and the SDKs use.

The Responses dialect of the generation loop (generation.py). A call to an
OpenAI deployment whose upstream serves the Responses API is relayed: the
body goes upstream as it came (the model renamed for an alias) and the
upstream's events come back as they arrive. A call to any other deployment
is translated: responses_decoding.py reads the body, responses_encoding.py
writes the events (`response.created` ... `response.completed`), and a
failure after the stream began is a `response.failed` whose `error.code`
Codex acts on (compact, stop, or retry later). The gateway keeps no
conversation state: `previous_response_id` and `store: true` are refused
with a 400 that says so. Errors are OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, cast

from server.errors import GatewayError
from server.http_edge import errors
from server.http_edge.chat import openai_headers
from server.http_edge.generation import Decoded, Encoder
from server.http_edge.responses_decoding import (
    DecodedResponses,
    decode_responses,
    fit_max_tokens,
)
from server.http_edge.responses_encoding import (
    SEALED_PREFIX,
    ResponsesStreamEncoder,
    encode_response,
    failure_code,
)
from server.routing import Route
from server.schema import OPENAI_RESPONSES, GenerationResponse

KEEPALIVE = b": keep-alive\n\n"


class ResponsesDialect(errors.OpenAIErrors):
    """OpenAI's Responses format, for the generation loop."""

    span_name = "POST /v1/responses"
    ping = KEEPALIVE

    def __init__(self) -> None:
        super().__init__(OPENAI_RESPONSES)

    def decode(self, document: dict[str, Any], request_id: str, text_checked: bool) -> Decoded:
        decoded = decode_responses(
            document, request_id=request_id, deadline=None, text_checked=text_checked
        )
        options = {
            "responses": decoded,
            "response_id": f"resp_{os.urandom(12).hex()}",
            "model": decoded.request.model,
        }
        return Decoded(decoded.request, decoded.stream, decoded.untranslatable, options=options)

    def routed(self, decoded: Decoded, route: Route) -> None:
        request = decoded.request
        if request.max_tokens == 0:
            # Codex sends no max_output_tokens and OpenAI caps an answer by the
            # context window alone: the model's largest output, not its default.
            fit_max_tokens(request, route.model.max_output_tokens)
        if not route.model.capabilities.thinking:
            # Codex always asks for an effort; a model that does not think ignores it.
            request.thinking_budget_tokens = None

    def relayed(self, document: dict[str, Any]) -> dict[str, Any] | None:
        """Without the reasoning items the gateway sealed (a Claude model's
        thinking, server/http_edge/responses_encoding.py): a conversation begun
        on Claude and carried on on an OpenAI model would otherwise be refused
        there, as OpenAI cannot read them. OpenAI's own reasoning items stay."""
        items = document.get("input")
        if not isinstance(items, list):
            return None
        kept = [item for item in items if not _sealed_reasoning(item)]
        return None if len(kept) == len(items) else {**document, "input": kept}

    def forwarded_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return openai_headers(headers)

    def encoder(self, decoded: Decoded, request_id: str) -> Encoder:
        responses = cast(DecodedResponses, decoded.options["responses"])
        return ResponsesStreamEncoder(
            response_id=decoded.options["response_id"],
            model=decoded.options["model"],
            created_at=int(time.time()),
            request_echo=responses.echo,
        )

    def whole(self, response: GenerationResponse, decoded: Decoded, request_id: str) -> bytes:
        responses = cast(DecodedResponses, decoded.options["responses"])
        document = encode_response(
            response,
            response_id=decoded.options["response_id"],
            created_at=int(time.time()),
            model=decoded.options["model"],
            request_echo=responses.echo,
        )
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def stream_error(self, error: GatewayError, encoder: Encoder | None) -> bytes:
        if isinstance(encoder, ResponsesStreamEncoder):
            return encoder.failed(failure_code(error), errors.message_of(error))
        reply = error.upstream_reply
        if reply is not None and reply.protocol == OPENAI_RESPONSES and reply.event:
            return reply.event
        # A relayed stream cut by something other than an upstream event.
        data = {
            "type": "error",
            "code": failure_code(error),
            "message": errors.message_of(error),
            "param": None,
        }
        return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"


def _sealed_reasoning(item: object) -> bool:
    return (
        isinstance(item, dict)
        and item.get("type") == "reasoning"
        and isinstance(content := item.get("encrypted_content"), str)
        and content.startswith(SEALED_PREFIX)
    )
