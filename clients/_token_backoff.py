"""When a token source may ask IssueToken again after it failed.

Shared by the async and sync token sources (clients/credentials.py,
clients/_sync_tokens.py). After a transient failure (the gateway
unreachable, overloaded, too slow) the next IssueToken waits 0.5 s, then
1 s, 2 s, ... up to 30 s, each with jitter, so that many clients do not
come back at once. A refusal of the key itself (UNAUTHENTICATED: revoked or
unknown; PERMISSION_DENIED: it may not have tokens) does not go away by
asking again: the source waits 5 minutes before it sends the key again.
Meanwhile every call that needs a new token fails at once with the
refusal, and the gateway sees nothing.

A gateway run with `--no-auth` issues no tokens: IssueToken answers
FAILED_PRECONDITION with reason AUTH_DISABLED (`auth_disabled`). That is
no failure: the token sources then call without credentials, and ask
IssueToken again only when a call is refused (the gateway restarted with
authentication on).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import grpc

from .errors import from_rpc_error

__all__ = ["IssueTokenBackoff", "auth_disabled"]

# IssueToken's answers that say the key will not get a token, however often asked.
REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def auth_disabled(error: grpc.RpcError) -> bool:
    """Whether IssueToken's failure says the gateway runs without authentication."""
    call: grpc.Call = error  # type: ignore[assignment]  # RPC errors are calls too
    if call.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    return from_rpc_error(error).reason == "AUTH_DISABLED"


class IssueTokenBackoff:
    """Exponential backoff with jitter after IssueToken failures, and a long one after refusals.

    Each delay is drawn between half and all of its step ("equal jitter"):
    never shorter than half, so failures cannot come faster than the steps
    allow, and spread over the other half.
    """

    def __init__(
        self,
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        refused_s: float = 300.0,
        clock: Callable[[], float],
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._initial = initial_s
        self._max = max_s
        self._refused_s = refused_s
        self._clock = clock
        self._rng = rng
        self.failures = 0  # in a row
        self._retry_at = 0.0
        self._code = grpc.StatusCode.OK
        self._details = ""
        self._trailers: tuple[tuple[str, str | bytes], ...] = ()

    @property
    def refused(self) -> bool:
        """Whether the last IssueToken refused the key itself."""
        return self.failures > 0 and self._code in REFUSALS

    def wait(self) -> float:
        """Seconds until IssueToken may be asked again (0: now)."""
        return max(0.0, self._retry_at - self._clock()) if self.failures else 0.0

    def failed(self, error: grpc.RpcError) -> grpc.aio.AioRpcError:
        """Records a failed IssueToken; returns the error to raise in its place."""
        call: grpc.Call = error  # type: ignore[assignment]  # RPC errors are calls too
        self.failures += 1
        self._code = call.code()
        self._details = call.details() or ""
        self._trailers = tuple(call.trailing_metadata() or ())
        if self._code in REFUSALS:
            step = self._refused_s
        else:
            step = min(self._max, self._initial * 2 ** (self.failures - 1))
        self._retry_at = self._clock() + step * (0.5 + 0.5 * self._rng())
        return self.error()

    def succeeded(self) -> None:
        self.failures = 0

    def error(self) -> grpc.aio.AioRpcError:
        """The last failure, saying when IssueToken will be asked again.

        An AioRpcError (an RpcError and a call) with the gateway's code and
        trailers, so its reason and request id read as they came; the sync
        source raises it too.
        """
        wait = self.wait()
        if self.refused:
            details = (
                f"the gateway refused the API key ({self._details or self._code.name}):"
                f" it is revoked, unknown or may not have tokens; not sending it again"
                f" for {wait:.0f} s"
            )
        else:
            details = (
                f"IssueToken failed ({self._details or self._code.name});"
                f" not asking again for {wait:.1f} s"
            )
        return grpc.aio.AioRpcError(
            self._code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*self._trailers),
            details=details,
        )
