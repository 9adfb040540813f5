"""A full disk as one line: what was being written, how many bytes it needed, how many were free.

    with space.writing(path, nbytes):      # ENOSPC / EDQUOT inside -> DiskFull naming path and bytes
        ...
    space.ensure_free(folder, nbytes, "a checkpoint")   # DiskFull before a write that cannot fit

Writers clean up their own temporary files when a write fails (store/writer.py, store/manifest.py,
sae/io.py); the CLI prints a DiskFull as one line with exit code 2.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space left for a write; the message names the path and the bytes."""

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def _gib(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def ensure_free(path: str, nbytes: int, what: str) -> None:
    """DiskFull unless the filesystem of ``path`` has ``nbytes`` free for ``what``."""
    free = free_bytes(path)
    if free < nbytes:
        raise DiskFull(errno.ENOSPC, f"{path}: disk full: {what} needs {_gib(nbytes)}, {_gib(free)} free")


@contextlib.contextmanager
def writing(path: str, nbytes: int):
    """Turn a full disk while writing ``path`` (about ``nbytes``) into a one-line DiskFull."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as e:
        if e.errno not in FULL:
            raise
        raise DiskFull(e.errno, f"{path}: disk full while writing it: it needs about {_gib(nbytes)}, "
                                f"{_gib(free_bytes(path))} free") from None
