"""The HTTP edge: the providers' own APIs on the gateway's core.

Software that can change only its base URL (Claude Code, Codex CLI, the
`anthropic` and `openai` SDKs, n8n) reaches the gateway here in the
providers' own formats. server.py
runs uvicorn in the gateway's loop; app.py routes, authenticates and is the
error boundary; calls.py runs each generation call through the core (gate,
record, admission) and generation.py its loop, the same for every wire
format; messages.py (Anthropic's Messages), chat.py (OpenAI's Chat
Completions) and responses.py (OpenAI's Responses) are the dialects, with
their decoding and encoding beside them; models.py lists models for both
SDKs; errors.py says how a gateway error reads in each format.
"""

from server.http_edge.app import FrontDoor
from server.http_edge.calls import HttpCalls
from server.http_edge.generation import GenerationEndpoint
from server.http_edge.server import HttpServer

__all__ = ["FrontDoor", "GenerationEndpoint", "HttpCalls", "HttpServer"]
