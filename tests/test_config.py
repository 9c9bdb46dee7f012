"""Configuration: precedence, errors that name the bad key, and the shipped example."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from server.app import loop_factory
from server.config import CLIENT_ENV, ConfigError, load_config
from server.routing import Router, build_providers
from tests.conftest import REPO_ROOT, start_server_process

# What a shell set up for the client exports (README, clients/).
CLIENT_VARIABLES = {
    "LLMGW_ADDRESS": "gateway.internal:50051",
    "LLMGW_API_KEY": "llmgw_not-a-real-key",
    "LLMGW_MODEL": "echo",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_the_offline_provider() -> None:
    config = load_config(environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50051)
    router = Router(build_providers(config))
    route = router.resolve("echo")
    assert route is not None
    assert route.provider.kind == "offline"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6000\n  host: 0.0.0.0\nlogging:\n  level: DEBUG\n")
    config = load_config(
        path,
        environ={"LLMGW_SERVER__PORT": "7000", "LLMGW_SERVER__SHUTDOWN_GRACE_S": "2.5"},
        overrides={"server.port": 8000},
    )
    assert config.server.port == 8000
    assert config.server.host == "0.0.0.0"
    assert config.server.shutdown_grace_s == 2.5
    assert config.logging.level == "DEBUG"
    assert load_config(path, environ={"LLMGW_SERVER__PORT": "7000"}).server.port == 7000


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 6001\n")
    assert load_config(environ={"LLMGW_CONFIG": str(path)}).server.port == 6001


@pytest.mark.parametrize(
    ("text", "environ", "key"),
    [
        ("server:\n  port: 99999\n", {}, "server.port"),
        ("server:\n  prot: 1\n", {}, "server.prot"),
        ("logging:\n  level: LOUD\n", {}, "logging.level"),
        ("", {"LLMGW_SERVR__PORT": "1"}, "servr"),
        ("providers:\n  x:\n    models: []\n", {}, "providers.x.type"),
    ],
    ids=["out-of-range", "misspelt-key", "bad-enum", "misspelt-env", "missing-type"],
)
def test_errors_name_the_bad_key(
    tmp_path: Path, text: str, environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=environ)
    assert key in str(caught.value)


@pytest.mark.parametrize(
    ("providers", "key"),
    [
        ("x:\n    type: nope\n", "providers.x.type"),
        ("x:\n    type: offline\n    chunk_delay_ms: -1\n", "providers.x.chunk_delay_ms"),
        ("x:\n    type: offline\n    colour: red\n", "providers.x.colour"),
        (
            "x:\n    type: offline\n    scripts:\n"
            "      - match: {regex: '('}\n        reply: {text: hi}\n",
            "providers.x.scripts.0.match.regex",
        ),
        (
            "x:\n    type: offline\n    scripts:\n      - match: {}\n        reply: {text: hi}\n",
            "providers.x.scripts.0.match",
        ),
    ],
    ids=["unknown-type", "negative-delay", "unknown-key", "bad-regex", "empty-match"],
)
def test_provider_settings_errors_name_the_key(tmp_path: Path, providers: str, key: str) -> None:
    config = load_config(write(tmp_path, f"providers:\n  {providers}"), environ={})
    with pytest.raises(ConfigError) as caught:
        build_providers(config)
    assert key in str(caught.value)


def test_one_model_served_twice_is_refused(tmp_path: Path) -> None:
    text = "providers:\n  a:\n    type: offline\n  b:\n    type: offline\n"
    with pytest.raises(ConfigError) as caught:
        Router(build_providers(load_config(write(tmp_path, text), environ={})))
    assert "echo" in str(caught.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [unclosed\n"), environ={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a list\n"), environ={})


def test_shipped_example_config_is_valid() -> None:
    config = load_config(REPO_ROOT / "config.example.yaml", environ={})
    router = Router(build_providers(config))
    assert router.resolve("echo") is not None


def test_event_loop_auto_takes_uvloop_when_installed_and_asyncio_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match=r"server\.event_loop is uvloop"):
        loop_factory("uvloop")


def test_client_variables_are_not_configuration_keys() -> None:
    config = load_config(environ={**CLIENT_VARIABLES, "LLMGW_PROTO_ROOT": "/srv/proto"})
    assert config == load_config(environ={})
    with pytest.raises(ConfigError, match=r"server\.portt"):
        load_config(environ={**CLIENT_VARIABLES, "LLMGW_SERVER__PORTT": "1"})


def test_client_variables_are_the_ones_the_clients_read() -> None:
    # A variable a client starts reading must be passed over by the server too.
    sources = [
        path for pattern in ("*.py", "node/*.js") for path in (REPO_ROOT / "clients").glob(pattern)
    ]
    read = {
        name
        for path in sources
        for name in re.findall(r"\bLLMGW_[A-Z0-9_]+", path.read_text(encoding="utf-8"))
    }
    assert read == CLIENT_ENV


async def test_server_starts_with_the_client_variables_set() -> None:
    server = await start_server_process(env=CLIENT_VARIABLES)
    server.process.terminate()
    assert await asyncio.wait_for(server.process.wait(), 30) == 0


async def run_server_command(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return await process.wait(), output.decode()


async def test_keys_cli_runs_with_the_client_variables_set(tmp_path: Path) -> None:
    store = {"LLMGW_AUTH__KEY_STORE": str(tmp_path / "keys.sqlite3")}
    code, output = await run_server_command("keys", "list", env={**CLIENT_VARIABLES, **store})
    assert code == 0, output


@pytest.mark.parametrize("command", [(), ("keys", "list")], ids=["server", "keys-cli"])
async def test_a_misspelt_variable_is_still_refused(command: tuple[str, ...]) -> None:
    env = {**CLIENT_VARIABLES, "LLMGW_SERVER__PORTT": "50052", "LLMGW_HTTP__PORT": "0"}
    code, output = await run_server_command("--port", "0", *command, env=env)
    assert code != 0
    assert "server.portt" in output
