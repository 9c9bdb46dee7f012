"""`python -m server keys provider ...`: providers' API keys, encrypted in the key store.

    keys provider set NAME      the key is read from standard input (never an argument)
    keys provider list          names, the KEK each is sealed with, dates: never a key
    keys provider delete NAME
    keys provider rotate-kek    re-seal every key with the ring's first KEK
    keys provider new-kek ID    print a fresh `ID:base64key` entry for the ring

The key-encryption keys come from secrets.encryption_keys_file or
$LLMGW_ENCRYPTION_KEYS (server/auth/envelope.py). A gateway reads a stored
key at start-up, and again every api_key_ttl_s (60 s), so `set` needs no restart.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from server.auth.envelope import KekRingError, new_kek_entry
from server.auth.provider_keys import ProviderKeyStore, StoredKeyError
from server.config import GatewayConfig

# The names `api_key_stored:` may give (server/providers/_upstream.py checks the same).
STORED_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def add_provider_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    provider = commands.add_parser(
        "provider", help="providers' API keys, stored encrypted in the key store"
    )
    sub = provider.add_subparsers(dest="provider_command", required=True, metavar="COMMAND")
    put = sub.add_parser(
        "set",
        parents=[common],
        help="store a provider's API key, read from standard input",
    )
    put.add_argument("name", help="the name a provider's `api_key_stored:` gives")
    sub.add_parser("list", parents=[common], help="list stored provider keys (never the key)")
    delete = sub.add_parser("delete", parents=[common], help="delete a stored provider key")
    delete.add_argument("name")
    sub.add_parser(
        "rotate-kek",
        parents=[common],
        help="re-encrypt every stored key with the first key-encryption key",
    )
    new = sub.add_parser("new-kek", help="print a new `ID:base64key` key-encryption key")
    new.add_argument("id", help="the new key's id, e.g. 2026-01")


def _fail(message: str) -> int:
    print(f"llm-gateway keys provider: {message}", file=sys.stderr)
    return 2


def _read_secret() -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("API key (not echoed): ")
    return sys.stdin.read()


def run_provider_command(args: argparse.Namespace, config: GatewayConfig) -> int:
    command = args.provider_command
    if command == "new-kek":
        try:
            print(new_kek_entry(args.id))
        except KekRingError as err:
            return _fail(str(err))
        return 0
    needs_ring = command in ("set", "rotate-kek")
    try:
        store = ProviderKeyStore.at(
            config.auth.key_store, config.secrets.encryption_keys_file, need_ring=needs_ring
        )
    except KekRingError as err:
        return _fail(str(err))
    if command == "set":
        if not STORED_KEY_NAME.match(args.name):
            return _fail(f"invalid name {args.name!r}: letters, digits, '.', '_' and '-'")
        secret = _read_secret().strip()
        if not secret:
            return _fail("no key on standard input")
        info = store.set(args.name, secret)
        print(
            f"stored provider key {info.name} (encrypted with key-encryption key"
            f" {info.kek_id}); providers with `api_key_stored: {info.name}` use it"
            " within api_key_ttl_s",
            file=sys.stderr,
        )
        return 0
    if command == "list":
        rows = [("NAME", "KEK", "CREATED", "UPDATED")]
        for stored in store.list():
            rows.append(
                (stored.name, stored.kek_id, _when(stored.created_at), _when(stored.updated_at))
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return 0
    if command == "delete":
        if not store.delete(args.name):
            return _fail(f"no stored provider key named {args.name!r}")
        print(f"deleted stored provider key {args.name}", file=sys.stderr)
        return 0
    if command == "rotate-kek":
        try:
            report = store.rotate_kek()
        except StoredKeyError as err:
            return _fail(str(err))
        print(
            f"re-encrypted {report.reencrypted} stored key(s) with {store.ring.primary};"
            f" {report.already_current} already were; {len(report.failed)} could not be"
            " decrypted" + (f": {', '.join(report.failed)}" if report.failed else ""),
            file=sys.stderr,
        )
        if report.failed:
            return 1
        print(
            f"every stored key is now on {store.ring.primary}: the other keys can leave the ring",
            file=sys.stderr,
        )
        return 0
    return _fail(f"unknown command {command!r}")


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
