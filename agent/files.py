"""Crash-safe file writes: a reader sees the old file or the new one, never a mix.

Write a temporary file in the same directory (created with its final mode before any byte is
written), fsync it, rename it over the target, then fsync the directory so the rename itself
survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644


def sibling_name(path: Path, suffix: str = "tmp") -> Path:
    """A fresh hidden name next to `path` (same directory, so a rename is atomic)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")


def stage(path: Path, data: bytes, *, mode: int = PUBLIC) -> Path:
    """Write `data` to a fresh temporary sibling of `path`, fsynced; return its path."""
    tmp = sibling_name(path)
    write_new(tmp, data, mode=mode)
    return tmp


def write_new(tmp: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Create `tmp` (it must not exist) with exactly `data` and `mode`, fsynced."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for PUBLIC) kept it; be exact
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def atomic_write(path: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Replace `path` with `data` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        discard([tmp])
        raise
    fsync_dir(path.parent)
