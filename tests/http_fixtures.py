"""Fixtures for the HTTP front door: a gateway on the fake upstream, reached over HTTP.

The gateway serves the fake upstream's Anthropic, OpenAI and OpenAI-
compatible providers (tests/upstream_fixtures.py) and the offline `echo`
model; tests call its HTTP port with the official `anthropic` SDK, which
records the bytes it sent (`SentLog`), or with httpx2 for raw bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest

from server.app import Gateway
from server.config import load_config
from server.routing import Router
from tests.conftest import RunningGateway, started
from tests.fake_upstream import FakeUpstream
from tests.upstream_fixtures import SINGLE_ATTEMPT, provider_config


def front_door_providers(fake: FakeUpstream) -> dict[str, Any]:
    return {
        **provider_config(fake),
        "offline": {
            "type": "offline",
            "models": [{"id": "echo", "display_name": "Echo (offline)"}],
            "scripts": [
                {
                    "match": {"contains": "weather"},
                    "reply": {
                        "text": "Let me check.",
                        "tool_calls": [{"name": "get_weather", "input": {"city": "Paris"}}],
                    },
                }
            ],
        },
    }


async def start_front_door(fake: FakeUpstream, tmp: Path, **overrides: Any) -> RunningGateway:
    """A gateway with both edges on port 0, a ledger in `tmp`, and `overrides`."""
    config = load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": front_door_providers(fake),
            "routing": SINGLE_ATTEMPT,
            "ledger.path": str(tmp / f"usage-{os.urandom(4).hex()}.sqlite3"),
            "ledger.flush_interval_s": 0.05,
            **overrides,
        },
    )
    return await started(Gateway(config, router=Router.from_config(config)))


def base_url(gateway: RunningGateway) -> str:
    return f"http://127.0.0.1:{gateway.gateway.http_port}"


@dataclass
class SentLog:
    """The requests an SDK client sent, as bytes (an httpx2 event hook fills it)."""

    requests: list[httpx2.Request] = field(default_factory=list)

    async def hook(self, request: httpx2.Request) -> None:
        self.requests.append(request)

    @property
    def last(self) -> httpx2.Request:
        return self.requests[-1]


def sdk_client(
    url: str, sent: SentLog | None = None, api_key: str = "unused", **kwargs: Any
) -> anthropic.AsyncAnthropic:
    """The official SDK pointed at the front door (no retries: tests see each answer)."""
    hooks = {"request": [sent.hook]} if sent is not None else {}
    http = httpx2.AsyncClient(event_hooks=hooks)
    return anthropic.AsyncAnthropic(
        base_url=url, api_key=api_key, max_retries=0, http_client=http, **kwargs
    )


@pytest.fixture(scope="module")
async def front_door(
    fake_upstream: FakeUpstream,
    _openai_key_in_environment: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGateway]:
    gateway = await start_front_door(
        fake_upstream, tmp_path_factory.mktemp("front-door"), **{"http.ping_interval_s": 0.2}
    )
    yield gateway
    await gateway.aclose()


@pytest.fixture
def url(front_door: RunningGateway) -> str:
    return base_url(front_door)


# The keep-alives a stream may carry before or between the upstream's events
# (http.ping_interval_s is 0.2 s in these tests: a loaded machine sends one):
# the gateway's own, not the upstream's bytes.
_KEEPALIVES = re.compile(rb": ping\n\n|: keep-alive\n\n|event: ping\ndata: \{[^\n]*\}\n\n")


def without_pings(stream: bytes) -> bytes:
    """A relayed stream's bytes less the gateway's keep-alives."""
    return _KEEPALIVES.sub(b"", stream)
