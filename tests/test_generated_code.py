"""The committed llmgateway/ package is exactly what proto/generate.py makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def _files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, committed = tmp_path / "llmgateway", REPO_ROOT / "llmgateway"
    fresh_files, committed_files = _files(fresh), _files(committed)
    assert fresh_files == committed_files, "run `make proto`: generated files were added or removed"
    stale = [
        f for f in sorted(fresh_files) if not filecmp.cmp(fresh / f, committed / f, shallow=False)
    ]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def test_generated_files_say_do_not_edit() -> None:
    for name in _files(REPO_ROOT / "llmgateway"):
        if name.endswith((".py", ".pyi")):
            head = (REPO_ROOT / "llmgateway" / name).read_text()[:400]
            assert "DO NOT EDIT" in head or "do not edit" in head.lower() or "@generated" in head, (
                name
            )


def test_staleness_check_notices_a_change(tmp_path: Path) -> None:
    """Guards the guard: a proto change must make the comparison fail."""
    proto_copy = tmp_path / "proto"
    subprocess.run(["cp", "-r", str(REPO_ROOT / "proto"), str(proto_copy)], check=True)
    source = proto_copy / "llmgateway" / "v1" / "generation.proto"
    source.write_text(
        source.read_text().replace(
            "message MessageStop {}", "message MessageStop {\n  int32 extra = 1;\n}"
        )
    )
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(proto_copy / "generate.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    changed = out / "llmgateway" / "v1" / "generation_pb2.py"
    assert not filecmp.cmp(
        changed, REPO_ROOT / "llmgateway" / "v1" / "generation_pb2.py", shallow=False
    )
