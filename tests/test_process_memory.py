"""The process keeps freed memory for reuse (server/process_memory.py, issue 17).

Each check runs in a fresh interpreter, since glibc's thresholds are set for
the whole process: it copies an 8 MiB request-sized buffer twice, as grpc
does with a request, ten times over, and counts the page faults. With freed
memory kept, only the first round faults its pages in; with glibc's
defaults, every round does (2 x 2,048 pages a round).
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from server.config import ServerConfig

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc only"
)

_ROUNDS = 10
_PAGES_A_ROUND = 2 * (8 * 1024 * 1024) // 4096

_SCRIPT = f"""
import resource, sys
from server.process_memory import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1]))
src = b"x" * (8 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({_ROUNDS}):
    copy = bytearray(src)
    again = bytes(copy)
    del copy, again
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep_mib: int) -> tuple[bool, int]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(keep_mib)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


def test_freed_request_buffers_are_reused_not_faulted_in_again() -> None:
    applied, faults = _faults(ServerConfig().keep_freed_memory_mib)
    assert applied
    # The first round's pages, and some slack for the interpreter's own.
    assert faults < 2 * _PAGES_A_ROUND, faults


def test_zero_leaves_the_c_librarys_defaults() -> None:
    applied, faults = _faults(0)
    assert not applied
    # Every round faults its buffers in afresh (what the setting removes).
    assert faults > (_ROUNDS // 2) * _PAGES_A_ROUND, faults
