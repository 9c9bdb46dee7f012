"""Fake Anthropic and OpenAI upstreams: real HTTP servers that record what they get.

A test fixture only: product code never imports it.
"""

from tests.fake_upstream.script import (
    RedactedThinking,
    Reply,
    Text,
    Thinking,
    ToolCall,
    Usage,
)
from tests.fake_upstream.server import FakeUpstream, RecordedRequest

__all__ = [
    "FakeUpstream",
    "RecordedRequest",
    "RedactedThinking",
    "Reply",
    "Text",
    "Thinking",
    "ToolCall",
    "Usage",
]
