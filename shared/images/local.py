"""Local files: regular files inside the allowed roots only, read without blocking.

`Policy.locate` already resolved `..` and symlinks. Here the file is opened with
O_NONBLOCK (a FIFO can neither block the open nor, being refused, the read) and O_NOFOLLOW,
and the opened descriptor is checked again: still a regular file, the one that was checked,
and (through /proc) still inside a root, so swapping a path component for a symlink between
the check and the open gains nothing.
"""

from __future__ import annotations

import errno
import os
import stat

from shared.images.errors import Denied, NotFound, Refused, TooLarge, Unavailable
from shared.images.policy import LocalFile, Policy

_FLAGS = (os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
          | getattr(os, "O_NOCTTY", 0))
_PROC_FD = "/proc/self/fd"


def read_file(location: LocalFile, policy: Policy, max_bytes: int) -> bytes:
    try:
        before = os.stat(location.path)
    except OSError as error:
        raise _error(error) from None
    if not stat.S_ISREG(before.st_mode):
        raise Refused
    try:
        fd = os.open(location.path, _FLAGS)
    except OSError as error:
        raise _error(error) from None
    try:
        opened = os.fstat(fd)
        if (not stat.S_ISREG(opened.st_mode)
                or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino)):
            raise Refused
        if os.path.isdir(_PROC_FD) and not policy.inside_roots(
                os.readlink(f"{_PROC_FD}/{fd}")):
            raise Refused
        if opened.st_size > max_bytes:
            raise TooLarge(max_bytes)
        return _read_bounded(fd, opened.st_size, max_bytes)
    finally:
        os.close(fd)


def _read_bounded(fd: int, size: int, max_bytes: int) -> bytes:
    # The file may grow after fstat: read at most one byte past the limit to notice.
    chunks, total = [], 0
    want = min(size, max_bytes) + 1
    while True:
        try:
            chunk = os.read(fd, max(want - total, 64 * 1024))
        except OSError as error:
            raise _error(error) from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(max_bytes)
        chunks.append(chunk)


def _error(error: OSError):
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound()
    if error.errno in (errno.EACCES, errno.EPERM):
        return Denied()
    if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EAGAIN):
        return Refused()  # a symlink swapped in, a directory, a socket or FIFO
    # EIO, ESTALE, ETIMEDOUT (a network file system having a moment): try again later.
    return Unavailable(os.strerror(error.errno) if error.errno else type(error).__name__)
