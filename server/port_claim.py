"""One gateway per port: a lock that every process serving a fixed port holds.

`server.workers > 1` turns SO_REUSEPORT on, and with it the kernel lets any
other process of the same user bind the same port and then splits new
connections between the two, however unrelated they are. Without it the
bind fails, but only for the address that clashes: `localhost` resolves to
127.0.0.1 and ::1, and grpc serves on whichever of the two it could bind.
So before it binds a fixed port a gateway claims it, by port alone (not
host: 0.0.0.0, 127.0.0.1 and ::1 overlap):

- a gateway takes an exclusive lock on the port's lock file, or refuses to
  start, naming the process that holds it;
- the parent of `--workers` then turns its lock into a shared one (POSIX
  record locks convert atomically, flock does not) and each worker takes a
  shared lock too, so the port stays claimed while any worker still serves
  it, even if the parent was killed.

The kernel drops a process's locks when it exits, however it exits, so no
lock goes stale. The lock files live in /tmp/llm-gateway-<uid>, one place
for every process of the user whatever its environment; other users cannot
share our port anyway (SO_REUSEPORT needs the same user). Port 0 (a port
picked by the kernel, as in tests) needs no claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from server.config import ConfigError

LOCK_ROOT = Path("/tmp")


class PortInUseError(ConfigError):
    """Another gateway serves the port (or claims it): this one must not start."""


def lock_dir() -> Path:
    """Where the port lock files are: private to this user, checked before use."""
    path = LOCK_ROOT / f"llm-gateway-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as err:
        raise ConfigError(
            f"cannot create the port lock directory {path}: {err.strerror}"
            " (it must be writable to serve a fixed server.port)"
        ) from None
    # In a shared /tmp someone else could have made it first.
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise ConfigError(
            f"the port lock directory {path} is not a directory private to this user;"
            " remove it and start again"
        )
    return path


def _open(port: int) -> tuple[int, Path]:
    path = lock_dir() / f"port-{port}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot open the port lock file {path}: {err.strerror}") from None
    return fd, path


@contextlib.contextmanager
def claim_port(port: int, *, workers: int = 1) -> Iterator[None]:
    """Holds `port` for this gateway while the block runs; PortInUseError if it is taken.

    With `workers > 1` the claim is shared with the workers, which each call
    `join_port_claim` before they bind.
    """
    if port == 0:
        yield
        return
    fd, path = _open(port)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PortInUseError(
                f"port {port} is already served by another llm-gateway ({holder});"
                f" stop it or choose another server.port (lock file: {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {workers} worker(s)\n".encode(), 0)
        if workers > 1:
            fcntl.lockf(fd, fcntl.LOCK_SH)  # atomic: no other gateway slips in between
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: unlinking it would race)


@contextlib.contextmanager
def join_port_claim(port: int) -> Iterator[None]:
    """A worker's share of its parent's claim on `port`, held while the block runs."""
    if port == 0:
        yield
        return
    fd, path = _open(port)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise PortInUseError(
                f"port {port} is being claimed by another llm-gateway (lock file: {path})"
            ) from None
        yield
    finally:
        os.close(fd)
