"""Contract safety: buf lint, and buf breaking against the last released contract.

The released contract is a buf image committed at proto/released/contract.binpb
(built from the release commit with `make proto-release`), so a fresh clone in
CI compares against it with no tags or history to fetch. `make proto-lint`
runs the same check; these tests also prove that it catches a breaking change.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

BUF = str(Path(sys.executable).parent / "buf")
RELEASED = REPO_ROOT / "proto" / "released" / "contract.binpb"


def buf(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_lint_passes() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_released_contract_holds_the_v1_services() -> None:
    result = buf("ls-files", str(RELEASED))
    assert result.returncode == 0, result.stderr
    assert {"llmgateway/v1/generation.proto", "llmgateway/v1/token.proto"} <= set(
        result.stdout.split()
    )


def test_the_contract_has_no_breaking_change_since_the_release() -> None:
    result = buf("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_breaking_change_is_caught(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("*.py"))
    contract = tmp_path / "proto" / "llmgateway" / "v1" / "generation.proto"
    text = contract.read_text()
    # Renumber GenerateRequest.request_id: old clients would send it as an unknown field.
    changed = re.sub(r"string request_id = 13;", "string request_id = 16;", text, count=1)
    assert changed != text
    contract.write_text(changed)
    result = buf("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode != 0
    assert "GenerateRequest" in result.stdout + result.stderr
