"""Multi-process serving: N gateway processes sharing one port (SO_REUSEPORT).

A grpc.aio server is one event loop on one core. With `server.workers: N`
the parent starts N worker processes, each a complete gateway bound to the
same port with SO_REUSEPORT, so the kernel spreads connections (not calls:
one HTTP/2 connection stays with one worker) across them. The parent only
forwards SIGTERM/SIGINT and waits; each worker drains as a single gateway
does. Per-process state (caches, in-memory rate limits) is per worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from types import FrameType
from typing import Any

from server.config import GatewayConfig

log = logging.getLogger(__name__)


def _worker_main(config_data: dict[str, Any], index: int) -> None:
    from server.app import run
    from server.logs import configure_logging

    # Out of the terminal's process group: a Ctrl-C reaches only the parent,
    # which forwards it once (a second signal would mean "exit without draining").
    os.setpgid(0, 0)
    config = GatewayConfig.model_validate(config_data)
    configure_logging(config.logging)
    logging.getLogger(__name__).info("worker %d (pid %d) starting", index, os.getpid())
    run(config)


def run_workers(config: GatewayConfig) -> int:
    """Runs `config.server.workers` serving processes until they exit; returns the exit code."""
    context = multiprocessing.get_context("spawn")
    data = config.model_dump(mode="json")
    workers = [
        context.Process(target=_worker_main, args=(data, i), name=f"llm-gateway-{i}")
        for i in range(config.server.workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    codes = [worker.exitcode or 0 for worker in workers]
    log.info("all %d workers exited (exit codes %s)", len(workers), codes)
    return 0 if all(code == 0 for code in codes) else 1
