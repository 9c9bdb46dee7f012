"""Client libraries for the gateway: the Python client (async and sync) and its CLI.

    from clients import GatewayClient, response_text

    async with GatewayClient("localhost:50051", api_key=key) as client:
        print(response_text(await client.generate("echo", "Hello")))

Other languages live beside it (clients/node/). Names not listed in
`__all__` (modules starting with `_`) are internal.
"""

from .accumulator import StreamAccumulator
from .aio import GatewayClient, ResponseStream
from .credentials import TokenSource
from .errors import (
    DeadlineExceededError,
    FieldViolation,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    UnavailableError,
)
from .messages import (
    Prompt,
    RequestOptions,
    assistant,
    build_request,
    image,
    image_url,
    response_message,
    response_text,
    to_json,
    tool,
    tool_choice,
    tool_result,
    user,
)
from .response import Response, ResponseBlock
from .sync import GatewayClientSync, ResponseStreamSync

__all__ = [
    "DeadlineExceededError",
    "FieldViolation",
    "GatewayClient",
    "GatewayClientSync",
    "GatewayError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Prompt",
    "RateLimitedError",
    "RequestOptions",
    "Response",
    "ResponseBlock",
    "ResponseStream",
    "ResponseStreamSync",
    "StreamAccumulator",
    "TokenSource",
    "UnauthenticatedError",
    "UnavailableError",
    "assistant",
    "build_request",
    "image",
    "image_url",
    "response_message",
    "response_text",
    "to_json",
    "tool",
    "tool_choice",
    "tool_result",
    "user",
]
