"""Multi-process serving: N gateway processes sharing one port (SO_REUSEPORT).

A grpc.aio server is one event loop on one core. With `server.workers: N`
the parent starts N worker processes, each a complete gateway bound to the
same port with SO_REUSEPORT, so the kernel spreads connections (not calls:
one HTTP/2 connection stays with one worker) across them. The parent only
forwards SIGTERM/SIGINT and waits; each worker drains as a single gateway
does. Per-process state (caches, in-memory rate limits) is per worker, so
workers refuse to start when keys have limits or budgets and the limits
backend is not shared (limits.backend: redis): the configuration's are
refused when it is loaded (server/config.py), the key store's here. The
parent claims the port for its workers (server/port_claim.py), so no other
gateway can bind it beside them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from types import FrameType
from typing import Any

from server.auth.key_store_backend import KeyStoreError
from server.auth.keys import KeyStore
from server.config import ConfigError, GatewayConfig
from server.identity import KeyLimits
from server.port_claim import claim_port, join_port_claim

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
    try:
        with join_port_claim(config.server.port), join_port_claim(config.http_port):
            run(config)
    except ConfigError as err:
        print(f"llm-gateway worker {index}: {err}", file=sys.stderr)
        sys.exit(2)


def refuse_unshared_store_limits(config: GatewayConfig) -> None:
    """Raises ConfigError when workers would each count the key store's limits alone.

    Keys created with `keys create --rpm/--tpm/--budget-usd` carry limits the
    configuration does not show. Reading every record is cheap next to
    starting workers. A key given limits after start-up is not seen here.
    """
    if not config.workers_count_limits_alone or not config.auth.enabled:
        return
    key_store = KeyStore(config.auth.key_store)
    store = key_store.where  # never a DSN's password
    try:
        records = key_store.list()
    except KeyStoreError as err:
        raise ConfigError(f"cannot read the key store to check its keys' limits: {err}") from None
    finally:
        key_store.close()  # not inherited by the workers forked next
    limited = [r.id for r in records if not r.revoked and r.limits != KeyLimits()]
    if limited:
        shown = ", ".join(limited[:5]) + (
            f" and {len(limited) - 5} more" if len(limited) > 5 else ""
        )
        raise ConfigError(
            f"server.workers: {config.server.workers} with limits.backend:"
            f" {config.limits.backend}: keys in the key store {store} carry limits or"
            f" budgets ({shown}), and each worker would count them on its own, so every"
            f" key would get {config.server.workers} times its limits; set"
            " limits.backend: redis (shared by all workers) or server.workers: 1"
        )


def run_workers(config: GatewayConfig) -> int:
    """Runs `config.server.workers` serving processes until they exit; returns the exit code.

    Raises ConfigError, before any worker starts, when the workers would not
    share the key store's limits or the port is served by another gateway.
    """
    refuse_unshared_store_limits(config)
    workers = config.server.workers
    with (
        claim_port(config.server.port, workers=workers),
        claim_port(config.http_port, workers=workers),
    ):
        return _run_workers(config)


def _run_workers(config: GatewayConfig) -> int:
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
