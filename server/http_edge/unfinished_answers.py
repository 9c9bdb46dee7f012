"""uvicorn's ERROR for an answer a stalled stream left unfinished, moved to DEBUG.

A streamed answer whose client read nothing for
`server.stalled_stream_timeout_s` ends without its last bytes: the client's
socket is full, so nothing more can be written, not even the end of the
body (server/http_edge/generation.py, StreamWriter). uvicorn then closes the
connection and logs "ASGI callable returned without completing response." at
ERROR. The call is recorded (DEADLINE_EXCEEDED, STALLED_READER) and logged
like any other, and nothing failed on our side, so that one record goes to
DEBUG. An answer left unfinished any other way stays an ERROR.

The StreamWriter marks its task's context in `STALLED_ANSWER`; uvicorn logs
from the same task, once the application has returned, so the filter sees it.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

UVICORN_LOGGER = "uvicorn.error"
_UNFINISHED = "ASGI callable returned without completing response."

# Set in the task of a request whose stream the stall timeout ended.
STALLED_ANSWER: ContextVar[bool] = ContextVar("llmgateway_stalled_answer", default=False)


class UnfinishedAnswerFilter(logging.Filter):
    """Moves uvicorn's unfinished-answer ERROR to DEBUG for a stalled stream's answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _UNFINISHED or not STALLED_ANSWER.get():
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def install_unfinished_answer_filter() -> None:
    """Puts the filter on uvicorn's logger (once per process)."""
    logger = logging.getLogger(UVICORN_LOGGER)
    if not any(isinstance(f, UnfinishedAnswerFilter) for f in logger.filters):
        logger.addFilter(UnfinishedAnswerFilter())
