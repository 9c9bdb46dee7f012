"""Run Claude Code (the `claude` CLI, npm @anthropic-ai/claude-code) offline against a local server.

Claude Code speaks the Anthropic Messages API to ANTHROPIC_BASE_URL: POST
/v1/messages?beta=true (always streaming), POST /v1/messages/count_tokens?beta=true
(only when it sizes a large tool result), and, without
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, a HEAD /api/hello reachability probe.
run_claude() starts it in print mode (`claude -p PROMPT --output-format json`)
with a fresh HOME and TMPDIR in a temporary folder, a fresh empty working
directory, stdin at /dev/null and an environment built from scratch (no
ANTHROPIC_* or CLAUDE* variable of the caller leaks in), so a run makes no
request except to base_url and needs no onboarding, trust or API-key approval.

The CLI is an npm package whose `bin/claude.exe` is a native (Bun) binary copied
from the platform package by its postinstall script; Node is needed only for
npm. Versions after 2.1.197 declare engines node>=22 but run on Node 20: npm 11
on Node 20 resolves a bare `@anthropic-ai/claude-code` to 2.1.197, so the
version is pinned (CLAUDE_CODE_VERSION) in tests/node/claude-code/package.json
and its package-lock.json. `make claude-code` (a prerequisite of `make pytest`)
runs `npm ci` there when the binary is missing: about 400 MB on disk, a few
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# The version whose traffic the front door was built against (see the module docstring).
CLAUDE_CODE_VERSION = "2.1.332"

# Where the project installs it: an npm project of its own (package.json and
# package-lock.json pin the version; node_modules is ignored by git).
NPM_DIR = REPO_ROOT / "tests" / "node" / "claude-code"

# What makes a print-mode run offline and quiet. CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC
# alone suffices (without it the CLI sends HEAD /api/hello to base_url and resolves
# api.anthropic.com); the others are what it stands for, spelled out.
OFFLINE_ENV: dict[str, str] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
}

# Variables of the caller passed through; everything else starts empty.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "SHELL")


def find_in(node_modules: Path) -> str | None:
    """The native `claude` binary installed in node_modules, if any.

    The platform package's binary (@anthropic-ai/claude-code-linux-x64/claude,
    ...) is taken directly, so an install whose postinstall did not run (npm
    --ignore-scripts, a future npm that blocks install scripts) still works;
    then .bin/claude, unless it is the few-hundred-byte placeholder script.
    """
    for native in sorted(node_modules.glob("@anthropic-ai/claude-code-*/claude")):
        if os.access(native, os.X_OK):
            return str(native)
    launcher = node_modules / ".bin" / "claude"
    if launcher.exists() and os.access(launcher, os.X_OK) and launcher.stat().st_size > 1 << 20:
        return str(launcher)
    return None


def claude_code_path() -> str | None:
    """The installed `claude` executable: $CLAUDE_CODE_BIN, else the one in NPM_DIR."""
    override = os.environ.get("CLAUDE_CODE_BIN")
    if override:
        return override if os.access(override, os.X_OK) else None
    return find_in(NPM_DIR / "node_modules")


@dataclass
class ClaudeResult:
    """One `claude -p` run."""

    returncode: int | None  # None when it was killed at the timeout
    stdout: str
    stderr: str
    duration_s: float
    argv: list[str]
    env: dict[str, str]
    json: Any = None  # the parsed stdout with output_format="json", else None
    timed_out: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # the run's ~/.claude.json, if written

    @property
    def result_text(self) -> str | None:
        """The final answer text of a json run (`result`), which holds the error text on errors."""
        return self.json.get("result") if isinstance(self.json, dict) else None

    @property
    def is_error(self) -> bool:
        """True when the run failed: killed, non-zero exit or json `is_error`."""
        if self.timed_out or self.returncode != 0:
            return True
        return bool(isinstance(self.json, dict) and self.json.get("is_error"))


def claude_env(
    base_url: str,
    api_key: str,
    home: Path,
    *,
    use_auth_token: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a run: the caller's PATH and locale, a fresh HOME/TMPDIR, offline.

    With use_auth_token the key goes in ANTHROPIC_AUTH_TOKEN (sent as
    `Authorization: Bearer KEY`), else in ANTHROPIC_API_KEY (sent as `x-api-key: KEY`);
    when extra_env sets both, the CLI sends both headers.
    """
    env = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "CLAUDE_CODE_TMPDIR": str(tmp),
            "TERM": "dumb",
            "NO_COLOR": "1",
            "ANTHROPIC_BASE_URL": base_url.rstrip("/"),
            "ANTHROPIC_AUTH_TOKEN" if use_auth_token else "ANTHROPIC_API_KEY": api_key,
            **OFFLINE_ENV,
        }
    )
    env.update(extra_env or {})
    return env


async def run_claude(
    base_url: str,
    api_key: str,
    prompt: str,
    *,
    model: str | None = None,
    use_auth_token: bool = False,
    timeout: float = 90,  # noqa: ASYNC109 (the run's deadline, enforced with a kill)
    extra_env: Mapping[str, str] | None = None,
    output_format: str | None = "json",
    args: Sequence[str] = (),
    cwd: Path | None = None,
    executable: str | None = None,
) -> ClaudeResult:
    """Run `claude -p PROMPT` against base_url and collect its output.

    base_url is the server root without /v1 (the CLI appends /v1/messages).
    args are extra CLI arguments, e.g. ["--allowedTools", "Bash(echo:*)"] or
    ["--max-turns", "2"]; extra_env adds or overrides variables, e.g.
    {"CLAUDE_CODE_MAX_RETRIES": "0"} so that a 5xx/429/401 answer fails at once
    instead of after ten retries with back-off (more than a minute).
    cwd defaults to an empty folder in the run's temporary HOME, so no
    CLAUDE.md or settings of the repo are read. On timeout the process group is
    killed and the result has timed_out=True.
    """
    binary = executable or claude_code_path()
    if binary is None:
        raise FileNotFoundError("Claude Code is not installed: run `make claude-code`")
    with tempfile.TemporaryDirectory(prefix="claude-code-run-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        workdir = cwd or Path(scratch) / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        env = claude_env(
            base_url, api_key, home, use_auth_token=use_auth_token, extra_env=extra_env
        )
        argv = [binary, "-p", prompt]
        if output_format:
            argv += ["--output-format", output_format]
        if model:
            argv += ["--model", model]
        argv += list(args)
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=workdir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,  # an open stdin costs a 3 s wait and a warning
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
        parsed: Any = None
        if output_format == "json" and stdout.strip():
            with contextlib.suppress(ValueError):
                parsed = json.loads(stdout)
        config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((home / ".claude.json").read_text())
        return ClaudeResult(
            returncode=None if timed_out else process.returncode,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration,
            argv=argv,
            env=env,
            json=parsed,
            timed_out=timed_out,
            config=config,
        )
