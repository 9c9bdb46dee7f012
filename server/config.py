"""Typed configuration: defaults, then a YAML file, then environment, then flags.

Environment variables override file keys with the prefix LLMGW_ and `__`
between nesting levels: LLMGW_SERVER__PORT=50052 sets `server.port`. Values
are read as YAML scalars, so numbers and booleans work. Every problem stops
start-up with a message naming the key (`server.port: ...`).

This is a small loader over pydantic rather than pydantic-settings: we want
one strict precedence order and unknown keys, including misspelt
environment variables, reported by name rather than silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "LLMGW_"
CONFIG_PATH_ENV = "LLMGW_CONFIG"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Inline images make requests large; 32 MiB covers several.
    max_receive_message_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_send_message_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # Server pings idle connections so dead peers are noticed behind proxies.
    keepalive_time_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    # The most often a client may ping us; grpc's default (5 min) kills
    # clients configured with the usual 10-30 s keepalive.
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    # Drops connections idle this long (0: never); lets load balancers rebalance.
    max_connection_idle_s: float = Field(0.0, ge=0)
    max_concurrent_streams: int = Field(0, ge=0)  # per connection; 0: grpc's default
    # On SIGTERM: how long in-flight calls may run before they are cancelled.
    shutdown_grace_s: float = Field(30.0, ge=0)
    reflection: bool = True


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class ProviderConfig(BaseModel):
    """One provider instance: `type` picks the implementation, the rest is its settings."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _default_providers() -> dict[str, ProviderConfig]:
    return {"offline": ProviderConfig(type="offline")}


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    # Instance name -> provider. The offline provider serves when none is configured.
    providers: dict[str, ProviderConfig] = Field(default_factory=_default_providers)


class ConfigError(Exception):
    """The configuration is invalid; the message names every bad key."""


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """Loads and validates the configuration.

    `path` defaults to $LLMGW_CONFIG; no file means defaults. `overrides`
    are dotted keys from command-line flags ({"server.port": 50052}).
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_PATH_ENV) or None
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}

    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_PATH_ENV:
            keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
            _set(data, keys, yaml.safe_load(raw) if raw else raw, origin=name)
    for dotted, value in (overrides or {}).items():
        _set(data, dotted.split("."), value, origin=f"--{dotted}")

    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"invalid configuration ({source}):\n{problems}") from None


def _set(data: dict[str, Any], keys: list[str], value: Any, *, origin: str) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys)} sets a key inside a non-mapping")
        node = child
    node[keys[-1]] = value
