"""Atomic file writes, the one way the project writes files: nothing half-written is ever left at the destination.

Write into a temp file in the destination folder (same filesystem, so the rename is atomic),
fsync it, rename it over the destination, fsync the folder. On any failure (or Ctrl-C) the temp
file is removed and the destination is untouched.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object],
                 before_rename: Callable[[], object] | None = None) -> Path:
    """`write(tmp_path)` writes the content; then fsync + rename onto `path`.

    `before_rename()` runs between the fsync and the rename (a fault-injection point for tests
    that kill the process there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its 0600 mode would stick to the file; O_EXCL with 0666 keeps the umask's mode
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
