"""Gateway tokens for the sync client: clients/credentials.py's policy without asyncio.

The same contract as TokenSource: the API key travels only to IssueToken,
on a channel of its own; a token is replaced once 80% of its lifetime has
passed; a refusal refreshes it once. Threads share one token and one
refresh at a time (a lock, where the async source shares a task); with no
event loop there is no background refresh, so the caller that finds the
token due fetches the new one while the others wait for it. After IssueToken
fails it is not asked again before the same backoff has passed
(clients/_token_backoff.py); a token still valid is used meanwhile.
Against a gateway run with `--no-auth` (IssueToken says AUTH_DISABLED) the
token is "": calls go without credentials until one is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from llmgateway.v1 import token_pb2, token_pb2_grpc

from ._token_backoff import IssueTokenBackoff, auth_disabled

__all__ = ["SyncTokenSource"]

# Below this much remaining life a token is not used when its refresh failed.
_EXPIRY_MARGIN_S = 1.0


class SyncTokenSource:
    """Holds a gateway token for an API key and refreshes it before it expires."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        refresh_fraction: float = 0.8,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        backoff: IssueTokenBackoff | None = None,
    ) -> None:
        self._api_key = api_key
        self._fraction = refresh_fraction
        self._timeout = timeout
        self._clock = clock
        if channel_credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, channel_credentials)
        self._stub = token_pb2_grpc.TokenServiceStub(self._channel)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._backoff = backoff or IssueTokenBackoff(clock=clock)
        # The gateway said AUTH_DISABLED: call without credentials.
        self.auth_disabled = False
        self.issued = 0  # tokens obtained so far (for tests and metrics)

    def __repr__(self) -> str:  # never shows the key or the token
        return "SyncTokenSource()"

    def token(self) -> str:
        """A token to call with: the current one while fresh, else a new one.

        "" when the gateway runs without authentication: send no credentials.
        """
        with self._lock:
            if self.auth_disabled:
                return ""
            now = self._clock()
            if self._token is not None and now < self._refresh_at:
                return self._token
            usable = self._token is not None and now < self._expires_at - _EXPIRY_MARGIN_S
            try:
                return self._fetch()
            except grpc.RpcError:
                if usable and not self._backoff.refused:
                    assert self._token is not None
                    return self._token  # still valid: the next call tries again
                raise

    def refresh(self, refused: str) -> str:
        """A new token after the gateway refused `refused` (shared by every refused call)."""
        with self._lock:
            self.auth_disabled = False  # refused without credentials: authentication is back on
            if self._token is not None and self._token != refused:
                return self._token
            return self._fetch()

    def _fetch(self) -> str:
        """A new token, unless IssueToken failed lately: then its error, at once."""
        if self._backoff.wait() > 0:
            raise self._backoff.error()
        sent = self._clock()  # lifetimes count from before the request: refresh early, not late
        try:
            response = self._stub.IssueToken(
                token_pb2.IssueTokenRequest(),
                metadata=(("authorization", f"Bearer {self._api_key}"),),
                timeout=self._timeout,
            )
        except grpc.RpcError as error:
            if auth_disabled(error):
                self._backoff.succeeded()
                self.auth_disabled, self._token = True, None
                return ""
            failure = self._backoff.failed(error)
            if self._backoff.refused:
                self._token = None  # the key's tokens are refused with it
            raise failure from error
        self._backoff.succeeded()
        lifetime = response.lifetime.ToTimedelta().total_seconds()
        self._token = response.token
        self._refresh_at = sent + self._fraction * lifetime
        self._expires_at = sent + lifetime
        self.issued += 1
        return self._token

    def close(self) -> None:
        """Closes the token channel."""
        self._channel.close()
