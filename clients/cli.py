"""The command line: chat with a model through the gateway.

    python -m clients chat "Why is the sky blue?" --model claude-sonnet-5-5
    python -m clients chat --model echo              # interactive, multi-turn
    python -m clients models

Tokens go to stdout as they arrive; usage and cost go to stderr at the end,
so `> answer.txt` keeps only the answer. `--json` prints each response as
one line of the contract's JSON instead. The address and key come from
--address / --api-key or LLMGW_ADDRESS / LLMGW_API_KEY (and the model from
LLMGW_MODEL). Built on the sync client: one process, one call at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from llmgateway.v1 import generation_pb2 as pb

from ._channel import ADDRESS_ENV, API_KEY_ENV, DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S
from .errors import GatewayError
from .messages import RequestOptions, response_message, to_json, user
from .response import Response
from .sync import GatewayClientSync

__all__ = ["main"]

MODEL_ENV = "LLMGW_MODEL"
EXIT_COMMANDS = {"/exit", "/quit"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        help=f"the gateway's host:port (${ADDRESS_ENV}, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"an API key (${API_KEY_ENV}); none for a gateway run with --no-auth",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="stream a model's answer; interactive without PROMPT")
    chat.add_argument("prompt", nargs="?", help="the first message (omit for interactive mode)")
    chat.add_argument(
        "--model", "-m", default=os.environ.get(MODEL_ENV), help=f"model id or alias (${MODEL_ENV})"
    )
    chat.add_argument("--system", "-s", help="system instructions")
    chat.add_argument("--max-tokens", type=int, help="the most tokens to generate per turn")
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--interactive", "-i", action="store_true", help="keep reading turns from stdin"
    )
    chat.add_argument("--json", action="store_true", help="print each response as one line of JSON")

    models = commands.add_parser("models", help="list the models the gateway serves")
    models.add_argument("--json", action="store_true", help="print the response as JSON")
    return parser


def _usage_line(response: Response) -> str:
    usage, parts = response.usage, [f"{response.model} ({response.provider})"]
    tokens = f"{usage.input_tokens} in, {usage.output_tokens} out"
    cached = usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    if cached:
        tokens += f", {cached} cached"
    parts.append(tokens + " tokens")
    parts.append(f"${response.cost.total_nanos / 1e9:.6f}")
    parts.append(response.stop_reason or "unknown")
    parts.append(f"request {response.request_id}")
    return "[" + " · ".join(parts) + "]"


def _turn(
    client: GatewayClientSync,
    model: str,
    conversation: list[pb.Message],
    options: RequestOptions,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> Response:
    if as_json:
        response = client.generate(model, conversation, **options)
        print(to_json(response, indent=None), file=out, flush=True)
        return response
    with client.stream(model, conversation, **options) as stream:
        for text in stream.text_stream:
            out.write(text)
            out.flush()
        response = stream.final_response()
    print(file=out, flush=True)
    print(_usage_line(response), file=err, flush=True)
    return response


def chat(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """Runs one turn, or turns read from stdin until EOF or /exit."""
    if not args.model:
        print(f"error: give --model or set {MODEL_ENV}", file=err)
        return 2
    options: RequestOptions = {}
    if args.system:
        options["system"] = args.system
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    interactive = args.interactive or args.prompt is None
    conversation: list[pb.Message] = []
    failed = False
    with GatewayClientSync(
        args.address, args.api_key, credentials="key", timeout=args.timeout
    ) as client:
        pending = [args.prompt] if args.prompt else []
        while True:
            if pending:
                line = pending.pop()
            elif not interactive:
                break
            else:
                if stdin.isatty():
                    print("> ", end="", file=err, flush=True)
                read = stdin.readline()
                if not read:
                    break
                line = read.strip()
                if not line:
                    continue
                if line in EXIT_COMMANDS:
                    break
            conversation.append(user(line))
            try:
                response = _turn(client, args.model, conversation, options, args.json, out, err)
            except GatewayError as error:
                print(f"\nerror: {error}", file=err, flush=True)
                conversation.pop()  # the turn did not happen; the next one starts from here
                failed = True
                continue
            conversation.append(response_message(response))
    return 1 if failed else 0


def list_models(args: argparse.Namespace, out: TextIO) -> int:
    with GatewayClientSync(
        args.address, args.api_key, credentials="key", timeout=args.timeout
    ) as client:
        models = client.list_models()
    for model in models:
        if args.json:
            print(to_json(model, indent=None), file=out)
        else:
            aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
            print(f"{model.id}\t{model.provider}{aliases}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m clients` entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return list_models(args, sys.stdout)
        return chat(args, sys.stdin, sys.stdout, sys.stderr)
    except GatewayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
