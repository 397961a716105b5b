"""Crash-safe file writes: a file is either its old version or its complete new one.

Every file the project writes that a later run reads (checkpoints, weights, configs, evaluation
records, tables) goes through :func:`atomic_write`: the bytes go to a temporary file next to the
target, are flushed and fsynced, and only then renamed over it (``os.replace`` is atomic on
POSIX). A kill, a full disk or an exception at any point leaves the previous file untouched and no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


def fsync_dir(folder: str) -> None:
    """Persist a rename in ``folder`` (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "wb") as f: ...`` writes ``path`` all at once or not at all.

    An ``OSError`` while writing (full disk, read-only folder) is raised again as one line that
    names ``path``, the cause, and that the previous version is intact.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError):
            cause = err.strerror or str(err)
            raise OSError(err.errno, f"could not write {path}: {cause}; its previous version is "
                          "unchanged (free space or fix permissions, then run again)") from None
        raise
    fsync_dir(folder)
