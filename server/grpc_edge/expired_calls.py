"""grpc's ERROR for a send to a call its caller's deadline had just ended, moved to DEBUG.

When a caller's deadline passes while the servicer hands grpc a message or
the final status, grpc core fails the send, and grpc aio logs "ExecuteBatchError
raised in core by servicer method" at ERROR, with a traceback, unless it has
already noticed that the caller is gone: a race that it loses a few times per
thousand expiring calls, and once in every twenty when the deadline falls
right on a send. Nothing failed on our side, and the call is recorded
(DEADLINE_EXCEEDED) like any other, so that one record goes to DEBUG: a batch
that failed in core, in a call whose deadline had passed. Any other failed
send (a message over `server.max_send_message_bytes`) stays an ERROR.

The servicer names the call it serves in `SERVED_CALL`; grpc logs from the
same task, so the filter sees it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # type: ignore[import-not-found]

from server.calls import DEADLINE_SLACK_S

GRPC_AIO_LOGGER = "grpc._cython.cygrpc"
_FAILED_SEND = "ExecuteBatchError raised in core by servicer method"
# What an ExecuteBatchError says when the batch ran and failed (not when grpc
# refused to start it: a usage error, which stays an ERROR).
_FAILED_IN_CORE = 'Failed "execute_batch"'

# The generation call the current task serves (set by the servicer).
SERVED_CALL: ContextVar[grpc.aio.ServicerContext[Any, Any] | None] = ContextVar(
    "llmgateway_served_call", default=None
)


class ExpiredCallFilter(logging.Filter):
    """Moves grpc's failed-send ERROR to DEBUG when the call's deadline had passed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _expired_call_send(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _expired_call_send(record: logging.LogRecord) -> bool:
    if not isinstance(record.msg, str) or not record.msg.startswith(_FAILED_SEND):
        return False
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, ExecuteBatchError) or not str(error).startswith(_FAILED_IN_CORE):
        return False
    context = SERVED_CALL.get()
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def install_expired_call_filter() -> None:
    """Puts the filter on grpc aio's logger (once per process)."""
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, ExpiredCallFilter) for f in logger.filters):
        logger.addFilter(ExpiredCallFilter())
