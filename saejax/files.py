"""Writing files: atomically, and a full disk as one line (what was being written, how many bytes
it needed, how many were free).

    with files.atomic(path, nbytes) as f:   # a temp file, fsynced and renamed to ``path`` at the end;
        f.write(...)                        # removed if anything fails (ENOSPC -> DiskFull)
    with files.writing(path, nbytes):       # ENOSPC / EDQUOT inside -> DiskFull naming path and bytes
        ...
    files.ensure_free(folder, nbytes, "a checkpoint")   # DiskFull before a write that cannot fit
    with files.atomic_dir(path) as tmp:     # a folder built beside ``path`` and renamed over it
        ...
    files.json_safe(doc)                    # non-finite floats as None, numpy scalars as Python's

The CLI prints a DiskFull as one line with exit code 2.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil

import numpy as np

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
def atomic(path: str, nbytes: int, mode: str = "wb"):
    """A file object writing ``<path>.tmp-<pid>``, renamed to ``path`` (after an fsync) when the block
    ends; on any failure the temp file is removed and nothing lands under ``path``. ``nbytes``: about
    what the write needs, for a DiskFull message."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with writing(path, nbytes), open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


@contextlib.contextmanager
def atomic_dir(path: str):
    """A folder built as ``<path>.tmp-<pid>`` (yielded) and renamed to ``path`` when the block ends,
    replacing what was there; removed if the block fails."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def json_safe(obj):
    """A JSON-safe copy: non-finite floats (a frozen SAE's metrics) become None, numpy scalars Python's."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
