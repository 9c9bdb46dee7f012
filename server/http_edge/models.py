"""`GET /v1/models`: the models the caller's key may use, in a shape both SDKs read.

The `anthropic` and `openai` SDKs call the same path. One answer carries
both lists' fields (Anthropic's `type`, `display_name`, `created_at`,
`has_more`, `first_id`, `last_id`; OpenAI's `object`, `created`,
`owned_by`): each SDK reads its own and ignores the rest, so neither needs
to say which it is.
"""

from __future__ import annotations

import json
from typing import Any

from server.errors import ModelNotFoundError
from server.http_edge.exchange import Exchange
from server.http_edge.generation import JSON
from server.identity import current_identity
from server.routing import Router
from server.schema import ModelInfo

# Listed models carry no release date; both shapes require one.
_CREATED_AT = "2025-01-01T00:00:00Z"
_CREATED = 1735689600


def visible_models(router: Router) -> list[ModelInfo]:
    models = router.models()
    identity = current_identity()
    if identity is not None:
        models = [m for m in models if identity.may_use((m.id, *m.aliases))]
    return models


def model_entry(model: ModelInfo) -> dict[str, Any]:
    return {
        "id": model.id,
        "type": "model",
        "object": "model",
        "display_name": model.display_name or model.id,
        "created_at": _CREATED_AT,
        "created": _CREATED,
        "owned_by": model.provider,
        "max_input_tokens": model.context_window,
        "max_tokens": model.max_output_tokens,
    }


async def list_models(router: Router, exchange: Exchange) -> None:
    data = [model_entry(m) for m in visible_models(router)]
    document = {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
    await exchange.respond(200, json.dumps(document).encode(), [("content-type", JSON)])


async def get_model(router: Router, exchange: Exchange, model_id: str) -> None:
    for model in visible_models(router):
        if model_id == model.id or model_id in model.aliases:
            payload = json.dumps(model_entry(model)).encode()
            await exchange.respond(200, payload, [("content-type", JSON)])
            return
    raise ModelNotFoundError(model_id)
