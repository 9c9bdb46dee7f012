"""The HTTP edge: the providers' own APIs on the gateway's core.

Software that can change only its base URL (Claude Code, the `anthropic`
SDKs, n8n) reaches the gateway here in Anthropic's Messages format. server.py
runs uvicorn in the gateway's loop; app.py routes, authenticates and is the
error boundary; calls.py runs each generation call through the core (gate,
record, admission); messages.py is the Messages protocol adapter, with its
decoding and encoding beside it; errors.py says how a gateway error reads
in Anthropic's format.
"""

from server.http_edge.app import FrontDoor
from server.http_edge.calls import HttpCalls
from server.http_edge.messages import MessagesApi
from server.http_edge.server import HttpServer

__all__ = ["FrontDoor", "HttpCalls", "HttpServer", "MessagesApi"]
