"""`python -m server keys ...`: create, list, rotate and revoke API keys; rotate the signing key.

`keys copy-store --to LOCATION` copies the whole store to another
(key_store_copy.py), to move from SQLite to PostgreSQL without new keys.

These act on the files named by the `auth:` configuration (the same config
the gateway reads), so run them with the gateway's --config or LLMGW_*
environment. A created key is printed once, alone on stdout, so that
`KEY=$(python -m server keys create --name svc)` captures exactly the key;
everything else goes to stderr; `keys rotate` prints the new key the same
way. No command ever prints a key hash. `keys provider ...` (stored provider
keys) is in provider_cli.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from decimal import Decimal, InvalidOperation

# create_key is re-exported: the command line's and the admin API's one way to make a key.
from server.auth.key_admin import KeyFieldError, checked_lifetime, checked_scopes, rotate_key
from server.auth.key_admin import create_key as create_key
from server.auth.key_store_backend import KeyStoreError
from server.auth.key_store_copy import CopyRefusedError, copy_store, copy_target
from server.auth.keys import (
    DAY_S,
    DEFAULT_TTL,
    EXPIRY_WARNING_DAYS,
    DefaultTtl,
    KeyRecord,
    KeyStore,
)
from server.auth.provider_cli import add_provider_parser, run_provider_command
from server.auth.revocation import KeyChange, announce, redis_configured
from server.auth.tokens import create_signing_key
from server.config import AuthConfig, GatewayConfig
from server.identity import ALL_MODELS, KNOWN_SCOPES, SCOPE_GENERATE, KeyLimits

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S}
DEFAULT_GRACE = "24h"
# key_admin's field names, as `keys create` spells them.
_FLAGS = {
    "name": "--name",
    "models": "--models",
    "limits.requests_per_minute": "--rpm",
    "limits.tokens_per_minute": "--tpm",
    "limits.budget_nanos": "--budget-usd",
}


def parse_duration(text: str, *, allow_never: bool = False) -> float | None:
    """Seconds in `30d`, `12h`, `15m`, `45s` or `0`; None for `never` (when allowed)."""
    text = text.strip().lower()
    if allow_never and text == "never":
        return None
    if text == "0":
        return 0.0
    match = _DURATION.match(text)
    if match is None:
        never = ", or never" if allow_never else ""
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 15m or 45s{never}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def add_keys_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `keys` and its subcommands to the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="YAML config file (default: $LLMGW_CONFIG)"
    )
    keys = subparsers.add_parser("keys", help="manage API keys and signing keys")
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create", parents=[common], help="create an API key and print it (once)"
    )
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="models (ids, aliases or patterns like 'claude-*') the key may use; default all",
    )
    create.add_argument(
        "--scopes",
        nargs="+",
        default=[SCOPE_GENERATE],
        metavar="SCOPE",
        help=f"scopes among {', '.join(sorted(KNOWN_SCOPES))} (default: {SCOPE_GENERATE})",
    )
    create.add_argument("--rpm", type=int, help="requests per minute (for the rate limiter)")
    create.add_argument("--tpm", type=int, help="tokens per minute (for the rate limiter)")
    create.add_argument("--budget-usd", help="spending cap in US dollars")
    create.add_argument(
        "--expires-in",
        metavar="DURATION",
        help="lifetime, e.g. 30d or 12h (default: auth.key_ttl_days); `never` only with"
        " auth.allow_keys_without_expiry",
    )

    listing = commands.add_parser("list", parents=[common], help="list keys (never the secret)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    revoke = commands.add_parser(
        "revoke", parents=[common], help="revoke a key and every token issued for it"
    )
    revoke.add_argument("id", help="the key id, as `keys list` shows it")

    rotate = commands.add_parser(
        "rotate",
        parents=[common],
        help="give a key a new secret (printed once); the old one works for a grace period",
    )
    rotate.add_argument("id", help="the key id, as `keys list` shows it")
    rotate.add_argument(
        "--grace",
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help=f"how long the old secret still works, e.g. 1h (default {DEFAULT_GRACE});"
        " 0 ends it now",
    )
    rotate.add_argument(
        "--expires-in",
        metavar="DURATION",
        help="the new secret's lifetime (default: auth.key_ttl_days)",
    )

    copy = commands.add_parser(
        "copy-store",
        parents=[common],
        help="copy every key and stored provider key to another key store, as they are",
    )
    copy.add_argument(
        "--to",
        required=True,
        metavar="LOCATION",
        help="the target: a postgresql:// URL (its password in ~/.pgpass or PGPASSWORD,"
        " not here) or an SQLite file; auth.key_store is the source",
    )
    copy.add_argument(
        "--merge",
        action="store_true",
        help="copy into a target that holds some of the keys already: identical rows are"
        " skipped, different ones reported as conflicts and left as they are",
    )

    add_provider_parser(commands, common)

    commands.add_parser(
        "rotate-signing-key",
        parents=[common],
        help="create a new token signing key; it signs new tokens, older keys still verify",
    )


def _split(values: list[str]) -> list[str]:
    """Accepts both `--models a b` and `--models a,b`."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _describe(record: KeyRecord) -> dict[str, object]:
    def when(at: float | None) -> str | None:
        return None if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))

    limits = record.limits
    return {
        "id": record.id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "models": list(record.models),
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "budget_nanos": limits.budget_nanos,
        "created": when(record.created_at),
        "revoked": when(record.revoked_at),
        "expires": when(record.expires_at),
        "rotated": when(record.rotated_at),
        "previous_secret_until": when(record.previous_valid_until),
    }


def _fail(message: str) -> int:
    print(f"llm-gateway keys: {message}", file=sys.stderr)
    return 2


def run_keys_command(args: argparse.Namespace, gateway_config: GatewayConfig) -> int:
    """Runs one `keys` subcommand; returns the exit status."""
    try:
        return _run(args, gateway_config)
    except KeyStoreError as err:  # e.g. a PostgreSQL store that cannot be reached
        return _fail(str(err))  # names the store (a path or user@host:port/db), no password


def _run(args: argparse.Namespace, gateway_config: GatewayConfig) -> int:
    config = gateway_config.auth
    store = KeyStore(config.key_store, key_ttl_days=config.key_ttl_days)
    command = args.keys_command
    if command == "create":
        return _create(args, config)
    if command == "rotate":
        return _rotate(args, gateway_config)
    if command == "provider":
        return run_provider_command(args, gateway_config)
    if command == "copy-store":
        return _copy_store(args, config)
    if command == "list":
        records = store.list()
        if args.json:
            for record in records:
                print(json.dumps(_describe(record)))
        else:
            _print_table(records)
        return 0
    if command == "revoke":
        if not store.revoke(args.id):
            return _fail(f"no active key with id {args.id!r}")
        seen = _seen_by_gateways(gateway_config, args.id, "revoked")
        print(f"revoked key {args.id} and the tokens issued for it. {seen}", file=sys.stderr)
        return 0
    if command == "rotate-signing-key":
        kid = create_signing_key(config.signing_keys_dir)
        print(kid)
        wait = config.token_ttl_s + config.leeway_s
        print(
            f"created signing key {kid} in {config.signing_keys_dir}; gateways sign with it"
            " within 10 seconds. Delete an older key file only once its last token has"
            f" expired: {wait:g} s (auth.token_ttl_s + auth.leeway_s) after this rotation.",
            file=sys.stderr,
        )
        return 0
    return _fail(f"unknown command {command!r}")


def _seen_by_gateways(config: GatewayConfig, key_id: str, change: KeyChange) -> str:
    """Announces the change on Redis (revocation.py); a sentence saying when gateways see it."""
    ttl = f"within auth.cache_ttl_s ({config.auth.cache_ttl_s:g} s)"
    if announce(config, key_id, change):
        return (
            "The change was published on Redis: gateways listening there see it at once"
            f" (any that are not, {ttl})."
        )
    if not redis_configured(config):
        return f"No Redis is configured to announce it: gateways see the change {ttl}."
    return f"Publishing the change on Redis failed: gateways see it {ttl}."


def _lifetime(text: str | None, config: AuthConfig) -> float | DefaultTtl | None:
    """--expires-in as create_key takes it; raises ValueError with what is wrong."""
    if text is None:
        return DEFAULT_TTL
    return checked_lifetime(config, parse_duration(text, allow_never=True))


def _rotate(args: argparse.Namespace, gateway_config: GatewayConfig) -> int:
    config = gateway_config.auth
    try:
        grace = parse_duration(args.grace)
        lifetime = _lifetime(args.expires_in, config)
    except ValueError as err:
        return _fail(str(err))
    assert grace is not None
    rotated = rotate_key(config, args.id, grace_s=grace, expires_in_s=lifetime)
    if rotated is None:
        return _fail(f"no active key with id {args.id!r}")
    seen = _seen_by_gateways(gateway_config, args.id, "rotated")
    record, key = rotated
    print(key)
    described = _describe(record)
    old = (
        f"the old secret works until {described['previous_secret_until']}"
        if record.previous_valid_until is not None
        else "the old secret no longer works"
    )
    print(
        f"rotated key {record.id} ({record.name}): store the new key now, it is not shown"
        f" again; {old}; the new one expires {described['expires'] or 'never'}. {seen}",
        file=sys.stderr,
    )
    return 0


def _copy_store(args: argparse.Namespace, config: AuthConfig) -> int:
    try:
        target_location = copy_target(args.to)
    except CopyRefusedError as err:
        return _fail(str(err))
    source = KeyStore.from_config(config)
    target = KeyStore(target_location, key_ttl_days=config.key_ttl_days)
    try:
        report = copy_store(source, target, merge=args.merge)
    except CopyRefusedError as err:
        return _fail(str(err))
    finally:
        source.close()
        target.close()
    keys, provider_keys = report.keys, report.provider_keys
    print(
        f"copied {keys.copied} key(s) and {provider_keys.copied} stored provider key(s)"
        f" from {source.where} to {target.where}",
        file=sys.stderr,
    )
    if args.merge:
        print(
            f"already there and identical, skipped: {keys.identical} key(s),"
            f" {provider_keys.identical} stored provider key(s)",
            file=sys.stderr,
        )
    if report.conflicts:
        conflicts = [f"key {key_id}" for key_id in keys.conflicts]
        conflicts += [f"stored provider key {name}" for name in provider_keys.conflicts]
        print(
            f"conflicts, left as they are in the target (it holds other values): {len(conflicts)}:"
            f" {', '.join(conflicts)}",
            file=sys.stderr,
        )
        return 1
    print(
        f"gateways may now read {target.where} (auth.key_store), with the same"
        " auth.secret_file, auth.signing_keys_dir and key-encryption keys as before",
        file=sys.stderr,
    )
    return 0


def _create(args: argparse.Namespace, config: AuthConfig) -> int:
    try:
        scopes = sorted(checked_scopes(_split(args.scopes)))
    except KeyFieldError as err:
        return _fail(f"--scopes: {err}")
    budget_nanos = None
    if args.budget_usd is not None:
        try:
            budget_nanos = int(Decimal(args.budget_usd) * 1_000_000_000)
        except InvalidOperation:
            return _fail(f"--budget-usd: not a number: {args.budget_usd!r}")
    try:
        lifetime = _lifetime(args.expires_in, config)
    except ValueError as err:
        return _fail(f"--expires-in: {err}")
    try:
        record, key = create_key(
            config,
            name=args.name,
            scopes=scopes,
            models=_split(args.models) or ALL_MODELS,
            limits=KeyLimits(args.rpm, args.tpm, budget_nanos),
            expires_in_s=lifetime,
        )
    except KeyFieldError as err:
        return _fail(f"{_FLAGS.get(err.field, err.field)}: {err}")
    print(key)
    expires = _describe(record)["expires"] or "never"
    print(
        f"created key {record.id} ({record.name}), expiring {expires}: store it now,"
        " it is not shown again",
        file=sys.stderr,
    )
    return 0


def _expiry_cell(record: KeyRecord, now: float) -> str:
    """EXPIRES: the date, marked when it is past or within the warning window."""
    if record.expires_at is None:
        return "never"
    shown = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires_at))
    days = (record.expires_at - now) / DAY_S
    if days <= 0:
        return f"{shown} (expired)"
    if days < EXPIRY_WARNING_DAYS and not record.revoked:
        return f"{shown} (in {days:.1f} d: rotate)"
    return shown


def _print_table(records: list[KeyRecord]) -> None:
    now = time.time()
    rows = [("ID", "NAME", "SCOPES", "MODELS", "CREATED", "EXPIRES", "REVOKED")]
    for record in records:
        described = _describe(record)
        rows.append(
            (
                record.id,
                record.name,
                ",".join(sorted(record.scopes)),
                ",".join(record.models),
                str(described["created"]),
                _expiry_cell(record, now),
                str(described["revoked"] or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
