"""Command line: `python -m server [--host H] [--port P] [--config FILE]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from server.app import serve
from server.config import ConfigError, load_config
from server.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server", description="Serve the llm-gateway gRPC API."
    )
    parser.add_argument("--config", help="YAML config file (default: $LLMGW_CONFIG, or none)")
    parser.add_argument("--host", help="address to listen on (server.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (server.port, default 50051)")
    parser.add_argument("--log-level", help="logging.level: DEBUG, INFO, WARNING or ERROR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.log_level is not None:
        overrides["logging.level"] = args.log_level.upper()
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as err:
        print(f"llm-gateway: {err}", file=sys.stderr)
        return 2
    configure_logging(config.logging)
    try:
        asyncio.run(serve(config))
    except ConfigError as err:
        print(f"llm-gateway: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
