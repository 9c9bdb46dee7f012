"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

The Messages dialect of the generation loop (generation.py), and token
counting. A call to an Anthropic deployment is relayed: the body goes
upstream as it came (only `model` renamed for an alias) with every
`anthropic-*` header but the gateway's own, and the upstream's bytes come
back as they arrive, its error answers with their status. A call to any
other deployment is translated: the body is decoded into the gateway's
request (messages_decoding.py) and the events encoded in Anthropic's SSE
grammar (messages_encoding.py); what the translation cannot carry is
refused with a 400 naming it. Silent streams get `event: ping`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from server.errors import GatewayError
from server.http_edge import errors
from server.http_edge.exchange import Exchange
from server.http_edge.generation import JSON, Decoded, Encoder, parse_json, resolve
from server.http_edge.json_decoding import free_of_lone_surrogates
from server.http_edge.messages_decoding import decode_count_tokens, decode_messages
from server.http_edge.messages_encoding import StreamEncoder, encode_message, ping_event
from server.identity import require_model_access
from server.providers._upstream import GATEWAY_HEADERS
from server.routing import Route, Router
from server.schema import ANTHROPIC_MESSAGES, GenerationResponse, Passthrough
from server.token_estimate import count_request


def anthropic_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's `anthropic-*` headers (version, betas, any new one) for the upstream.

    Credentials and billing routing (anthropic-workspace-id) stay the gateway's.
    """
    return {
        name: value
        for name, value in headers.items()
        if name.startswith("anthropic-") and name not in GATEWAY_HEADERS
    }


class MessagesDialect:
    """Anthropic's Messages format, for the generation loop."""

    protocol = ANTHROPIC_MESSAGES
    span_name = "POST /v1/messages"
    ping = ping_event()

    def decode(self, document: dict[str, Any], request_id: str, text_checked: bool) -> Decoded:
        decoded = decode_messages(
            document, request_id=request_id, deadline=None, text_checked=text_checked
        )
        return Decoded(decoded.request, decoded.stream, decoded.untranslatable)

    def routed(self, decoded: Decoded, route: Route) -> None:
        """Nothing to add: a Messages request always names its max_tokens."""

    def relayed(self, document: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def forwarded_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return anthropic_headers(headers)

    def encoder(self, decoded: Decoded, request_id: str) -> Encoder:
        return StreamEncoder()

    def whole(self, response: GenerationResponse, decoded: Decoded, request_id: str) -> bytes:
        document = encode_message(response)
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def error_response(
        self, error: GatewayError, request_id: str
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        return errors.error_response(error, request_id)

    def error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        return errors.error_body(error_type, message, request_id)

    def stream_error(self, error: GatewayError, encoder: Encoder | None) -> bytes:
        return errors.stream_error_event(error)


async def count_tokens(router: Router, exchange: Exchange, body: bytes) -> None:
    """`POST /v1/messages/count_tokens`: the upstream's count for an Anthropic
    deployment (the body relayed), the gateway's estimate otherwise."""
    document, members = parse_json(body)
    request = decode_count_tokens(
        document, deadline=None, text_checked=free_of_lone_surrogates(body)
    )
    route = resolve(router, request.model)
    require_model_access(request.model, route.model.id)
    request.passthrough = Passthrough(
        ANTHROPIC_MESSAGES,
        body,
        document,
        anthropic_headers(exchange.headers),
        exchange.query,
        members=members,
    )
    count = await router.count_tokens(request, route)
    tokens = count.input_tokens
    if count.estimated or not any(
        ANTHROPIC_MESSAGES in d.provider.relays for d in route.deployments
    ):
        # Never below what the gateway itself will hold the request to (the
        # context window, the key's tokens per minute): Claude Code compacts
        # its conversation on this count.
        tokens = max(tokens, count_request(request.system, request.messages, request.tools))
    payload = json.dumps({"input_tokens": tokens}).encode()
    await exchange.respond(200, payload, [("content-type", JSON)])
