"""Freed memory kept for reuse, so large requests do not fault in fresh pages on the loop.

grpc copies a request twice as it arrives, on the event loop (C-core joins
its slices into one buffer, then Cython copies that into Python bytes), and
an HTTP body is joined and parsed the same way. glibc serves an allocation
of several MiB with fresh pages: a new mmap, or heap it trimmed back to the
system when the last request's buffers were freed. Faulting in 8 MiB costs
the loop ~4 ms, so five maximum-size requests arriving together took
~85 ms of page faults a burst and held every other call that long
(bench/stall_probe.py, issue 17); the copies themselves take ~0.3 ms.

`keep_freed_memory` raises glibc's mmap threshold above the largest request
(so such buffers come from the heap) and its trim threshold to the amount
kept: freed memory up to that size stays mapped and the next burst reuses
it. The cost is that after a burst the process keeps up to that much
memory it does not use now (it never grows past the peak the burst itself
reached). `server.keep_freed_memory_mib: 0` leaves glibc's defaults; other
C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above half its largest heap: 32 MiB on
# 64-bit. That is above the largest request buffer either edge allocates
# (`server.max_receive_message_bytes`, `http.max_body_bytes`).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def keep_freed_memory(mib: int) -> bool:
    """Keeps up to `mib` MiB of freed memory mapped for reuse (glibc only).
    Returns whether the setting took effect."""
    if mib <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = min(MMAP_THRESHOLD_BYTES, mib * 1024 * 1024)
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold) == 1)
    done = bool(mallopt(_M_TRIM_THRESHOLD, mib * 1024 * 1024) == 1) and done
    if not done:
        log.warning("could not set glibc's malloc thresholds; large requests fault in fresh memory")
    return done
