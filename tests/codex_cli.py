"""Run Codex CLI (`codex exec`, npm @openai/codex) offline against a local server.

Codex speaks only OpenAI's Responses API, to the `base_url` of the model
provider its config names: one streaming `POST {base_url}/responses` per
model turn (a tool call's output goes back in the next one), with the key
as `Authorization: Bearer KEY`. run_codex() starts
`codex exec --json PROMPT` with a config.toml of its own (OFFLINE_CONFIG and
a `model_providers.gateway` entry) in a fresh CODEX_HOME, a fresh HOME and
TMPDIR in a temporary folder, an empty working directory, stdin at
/dev/null and an environment built from scratch (no OPENAI_* or CODEX_*
variable of the caller leaks in). Then a run makes no request except to
base_url: without OFFLINE_CONFIG it also sends analytics to ab.chatgpt.com
and syncs the plugin marketplace (`git ls-remote
https://github.com/openai/plugins.git`, api.github.com, chatgpt.com), which
tests/test_codex_cli.py would not notice but a machine without internet
would wait on.

The npm package is a small Node launcher whose platform package
(@openai/codex-linux-x64, an alias of @openai/codex@VERSION-linux-x64)
holds a static native binary (Rust, musl) with its helpers (rg, bwrap);
Node is needed only for npm, and any Node >= 16 will do. The version is
pinned (CODEX_VERSION) in tests/node/codex/package.json and its
package-lock.json; `make codex` (a prerequisite of `make pytest`) runs
`npm ci` there when the binary is missing: about 420 MB on disk, a few
seconds from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# The version whose traffic the front door was tested against (see the module docstring).
CODEX_VERSION = "0.171.0"

# Where the project installs it: an npm project of its own (package.json and
# package-lock.json pin the version; node_modules is ignored by git).
NPM_DIR = REPO_ROOT / "tests" / "node" / "codex"

# The provider entry run_codex writes, and the variable holding its key.
PROVIDER = "gateway"
KEY_ENV = "LLM_GATEWAY_API_KEY"

# What makes a run offline and quiet, as dotted config.toml keys. Analytics
# (ab.chatgpt.com) and the plugin marketplace are what a run reaches besides
# base_url; `codex exec` checks for updates only in the interactive TUI, so
# the last key is for a config copied from here.
OFFLINE_CONFIG: dict[str, Any] = {
    "analytics.enabled": False,
    "features.plugins": False,
    "check_for_update_on_startup": False,
}

# Variables of the caller passed through; everything else starts empty.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "SHELL")


def find_in(node_modules: Path) -> str | None:
    """The native `codex` binary installed in node_modules, if any.

    The platform package's binary is taken directly (the launcher in
    .bin/codex only finds it and execs it, under Node).
    """
    for native in sorted(node_modules.glob("@openai/codex-*/vendor/*/bin/codex")):
        if os.access(native, os.X_OK):
            return str(native)
    return None


def codex_path() -> str | None:
    """The installed `codex` executable: $CODEX_BIN, else the one in NPM_DIR."""
    override = os.environ.get("CODEX_BIN")
    if override:
        return override if os.access(override, os.X_OK) else None
    return find_in(NPM_DIR / "node_modules")


def toml_value(value: Any) -> str:
    """`value` as a TOML value (strings, booleans, numbers, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML value for {value!r}")


def codex_config(
    base_url: str, *, model: str, extra_config: Mapping[str, Any] | None = None
) -> str:
    """The config.toml of a run, as dotted keys: the model, the provider at
    base_url (key in $KEY_ENV), OFFLINE_CONFIG, then extra_config over them."""
    provider = f"model_providers.{PROVIDER}"
    settings: dict[str, Any] = {
        "model": model,
        "model_provider": PROVIDER,
        f"{provider}.name": "LLM gateway",
        f"{provider}.base_url": base_url.rstrip("/"),
        f"{provider}.env_key": KEY_ENV,
        f"{provider}.wire_api": "responses",
        **OFFLINE_CONFIG,
        **(extra_config or {}),
    }
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items())


@dataclass
class CodexResult:
    """One `codex exec --json` run."""

    returncode: int | None  # None when it was killed at the timeout
    stdout: str
    stderr: str
    duration_s: float
    argv: list[str]
    env: dict[str, str]
    config: str  # the run's config.toml
    events: list[dict[str, Any]]  # stdout's JSON lines: thread.started ... turn.completed
    last_message: str | None  # what --output-last-message wrote, if anything
    timed_out: bool = False

    @property
    def thread_id(self) -> str | None:
        """The session's id (Codex sends it as the session-id header and prompt_cache_key)."""
        for event in self.events:
            if event.get("type") == "thread.started":
                return str(event.get("thread_id"))
        return None

    @property
    def answer(self) -> str | None:
        """The final agent message, if the turn produced one."""
        messages = [
            e["item"].get("text")
            for e in self.events
            if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"
        ]
        return messages[-1] if messages else self.last_message

    @property
    def usage(self) -> dict[str, Any] | None:
        """The token counts of turn.completed."""
        for event in self.events:
            if event.get("type") == "turn.completed":
                return dict(event.get("usage") or {})
        return None

    @property
    def error(self) -> str | None:
        """turn.failed's message (the HTTP status and body, for a refusal), else the last error."""
        messages = [
            e.get("error", {}).get("message")
            if e.get("type") == "turn.failed"
            else e.get("message")
            for e in self.events
            if e.get("type") in ("turn.failed", "error")
        ]
        return messages[-1] if messages else None

    @property
    def is_error(self) -> bool:
        """True when the run failed: killed, non-zero exit or a failed turn."""
        if self.timed_out or self.returncode != 0:
            return True
        return any(e.get("type") == "turn.failed" for e in self.events) or self.usage is None


def codex_env(
    api_key: str, home: Path, extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a run: the caller's PATH and locale, a fresh HOME/CODEX_HOME/TMPDIR."""
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "CODEX_HOME": str(home / ".codex"),
            "TMPDIR": str(tmp),
            "TERM": "dumb",
            "NO_COLOR": "1",
            KEY_ENV: api_key,
        }
    )
    env.update(extra_env or {})
    return env


async def run_codex(
    base_url: str,
    api_key: str,
    prompt: str,
    *,
    model: str,
    timeout: float = 90,  # noqa: ASYNC109 (the run's deadline, enforced with a kill)
    extra_config: Mapping[str, Any] | None = None,
    extra_env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    cwd: Path | None = None,
    executable: str | None = None,
) -> CodexResult:
    """Run `codex exec --json PROMPT` against base_url and collect its output.

    base_url is what Codex's provider entry takes: the API root with /v1
    (Codex appends /responses). extra_config adds or overrides dotted
    config.toml keys, e.g. {"model_providers.gateway.request_max_retries": 0,
    "model_providers.gateway.stream_max_retries": 0} so that a 401, 429 or
    5xx answer fails at once instead of after 5 reconnections with back-off
    (6 requests; 30 for a 5xx, which each attempt also retries 4 times).
    args are extra `codex exec` arguments. cwd defaults to an empty folder in
    the run's temporary HOME (no AGENTS.md or .codex of the repo is read;
    --skip-git-repo-check lets Codex run outside a git repository). On
    timeout the process group is killed and the result has timed_out=True.
    """
    binary = executable or codex_path()
    if binary is None:
        raise FileNotFoundError("Codex CLI is not installed: run `make codex`")
    with tempfile.TemporaryDirectory(prefix="codex-run-") as scratch:
        home = Path(scratch) / "home"
        (home / ".codex").mkdir(parents=True)
        config = codex_config(base_url, model=model, extra_config=extra_config)
        (home / ".codex" / "config.toml").write_text(config)
        workdir = cwd or Path(scratch) / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        last_message_file = Path(scratch) / "last-message.txt"
        env = codex_env(api_key, home, extra_env)
        argv = [
            binary,
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--color",
            "never",
            "--output-last-message",
            str(last_message_file),
            *args,
            prompt,
        ]
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=workdir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,  # else it waits for more of the prompt on stdin
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills its children too
        )
        timed_out = False
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = await process.communicate()
        duration = time.monotonic() - started
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        events: list[dict[str, Any]] = []
        for line in stdout.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        last_message = None
        with contextlib.suppress(OSError):
            last_message = last_message_file.read_text()
        return CodexResult(
            returncode=None if timed_out else process.returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            argv=argv,
            env=env,
            config=config,
            events=events,
            last_message=last_message,
            timed_out=timed_out,
        )
