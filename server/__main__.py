"""Command line: `python -m server [--host H] [--port P] [--config FILE] [--no-auth]`.

With no subcommand it serves; `python -m server keys ...` manages API keys
(server/auth/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from server.app import run
from server.auth.cli import add_keys_parser, run_keys_command
from server.config import ConfigError, GatewayConfig, load_config
from server.logs import configure_logging
from server.port_claim import claim_port
from server.telemetry.audit import configure_audit
from server.workers import run_workers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve the llm-gateway: its gRPC API and its HTTP front door.",
    )
    parser.add_argument("--config", help="YAML config file (default: $LLMGW_CONFIG, or none)")
    parser.add_argument("--host", help="address to listen on (server.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (server.port, default 50051)")
    parser.add_argument(
        "--http-port", type=int, help="the HTTP front door's port (http.port, default 8080)"
    )
    parser.add_argument("--workers", type=int, help="server.workers: serving processes (default 1)")
    parser.add_argument("--log-level", help="logging.level: DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="auth.enabled=false: serve without credentials (local development, loopback only)",
    )
    add_keys_parser(parser.add_subparsers(dest="command", metavar="{keys}"))
    return parser


def _unshared_key_limits(args: argparse.Namespace, config: GatewayConfig) -> str | None:
    """Why `keys create` must not give a key limits under this configuration, or None.

    Workers refuse to start while stored keys carry limits they would each
    count alone (server/workers.py); this keeps such a key from appearing
    while they run, when the command reads the gateway's configuration.
    """
    if args.keys_command != "create" or (args.rpm, args.tpm, args.budget_usd) == (None,) * 3:
        return None
    if not config.workers_count_limits_alone:
        return None
    workers = config.server.workers
    return (
        f"--rpm, --tpm and --budget-usd need limits.backend: redis with server.workers:"
        f" {workers}: each worker would count the key's limits on its own, giving it"
        f" {workers} times them; set limits.backend: redis or server.workers: 1"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.http_port is not None:
        overrides["http.port"] = args.http_port
    if args.workers is not None:
        overrides["server.workers"] = args.workers
    if args.log_level is not None:
        overrides["logging.level"] = args.log_level.upper()
    if args.no_auth:
        overrides["auth.enabled"] = False
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as err:
        print(f"llm-gateway: {err}", file=sys.stderr)
        return 2
    configure_logging(config.logging)
    # The audit trail is process-wide like logging: `keys create` audits too.
    configure_audit(config.audit)
    if args.command == "keys":
        refusal = _unshared_key_limits(args, config)
        if refusal:
            print(f"llm-gateway keys: {refusal}", file=sys.stderr)
            return 2
        return run_keys_command(args, config)
    try:
        if config.server.workers > 1:
            return run_workers(config)
        with claim_port(config.server.port), claim_port(config.http_port):
            run(config)
    except ConfigError as err:
        print(f"llm-gateway: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
