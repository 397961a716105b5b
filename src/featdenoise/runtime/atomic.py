"""Crash-safe, input-safe file writes: a file is either its old version or its complete new one,
and no command writes over a file it did not mean to replace.

Every file the project writes that a later run reads (checkpoints, weights, configs, evaluation
records, tables) goes through :func:`atomic_write`: the bytes go to a temporary file next to the
target, are flushed and fsynced, and only then renamed over it (``os.replace`` is atomic on
POSIX). A kill, a full disk or an exception at any point leaves the previous file untouched and no
temporary file behind.

Output-path policy (one place, so every command gets it):

- **Inputs are never replaced.** A running command declares the files it reads with
  :func:`command_inputs` (the CLI does this for every existing file named on its command line) or
  passes them as ``inputs=``; a write whose target is the same file as one of them (compared with
  ``os.path.samefile``, so symlinks, hard links and other spellings of the path are caught) is
  refused with one line, unless the new bytes are identical to the old ones (then nothing is
  written and nothing is lost).
- **Read-only files are never replaced** (no write bit for anyone): a read-only file says "keep".
- **Files of other programs are never replaced.** A writer whose target name a user could also
  hold (a run folder's ``config.yaml``, a predictions CSV) passes ``ours=`` (a function that
  recognises the files featdenoise writes of that kind); an existing file it does not recognise is
  refused. A run folder is checked as a whole before a run starts
  (:mod:`featdenoise.training.rundir`).
- **A folder is a folder.** An output that is an existing folder, or a path whose folder part is an
  existing file, is refused with one line naming it (:func:`ensure_dir`, :func:`check_output`).

Everything refused raises ``ValueError`` (one line: the path, why, what to do) before a byte is
written.
"""

from __future__ import annotations

import contextlib
import contextvars
import filecmp
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import IO

_INPUTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "featdenoise_command_inputs", default=None)
_INPUT_DIRS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "featdenoise_command_input_folders", default=())


@contextlib.contextmanager
def command_inputs(paths: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """Within the block, ``paths`` (and anything :func:`register_input` adds) are the running
    command's inputs: :func:`atomic_write` refuses to replace the files among them, and
    :func:`featdenoise.runtime.outdir.output_dir` refuses the folders among them as output
    folders. Paths that do not exist are ignored (a name that is created later is not an input)."""
    names: list[str] = [os.fspath(p) for p in paths]
    token = _INPUTS.set(tuple(p for p in names if os.path.isfile(p)))
    dirs = _INPUT_DIRS.set(tuple(p for p in names if os.path.isdir(p)))
    try:
        yield
    finally:
        _INPUTS.reset(token)
        _INPUT_DIRS.reset(dirs)


def input_folders() -> tuple[str, ...]:
    """The folders among the running command's inputs (see :func:`command_inputs`)."""
    return _INPUT_DIRS.get()


def register_input(path: str | os.PathLike) -> None:
    """Add one file to the running command's inputs (no-op outside :func:`command_inputs`)."""
    current = _INPUTS.get()
    if current is not None and os.path.isfile(path):
        _INPUTS.set((*current, os.fspath(path)))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def input_at(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> str | None:
    """The input (registered or in ``inputs``) that ``path`` is the same file as, else None."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    for candidate in (*(_INPUTS.get() or ()), *(os.fspath(p) for p in inputs)):
        if os.path.exists(candidate) and _same_file(path, candidate):
            return candidate
    return None


def file_in_the_way(folder: str) -> str | None:
    """The first existing non-folder among ``folder`` and its parents, else None."""
    probe = os.path.abspath(folder)
    while True:
        if os.path.exists(probe):
            return None if os.path.isdir(probe) else probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def ensure_dir(folder: str | os.PathLike, what: str = "output folder") -> str:
    """``os.makedirs(folder, exist_ok=True)``, with an existing *file* in the way reported as one
    line naming it (instead of ``[Errno 17] File exists``). Returns ``folder``."""
    folder = os.fspath(folder)
    blocker = file_in_the_way(folder)
    if blocker is not None:
        where = "" if os.path.abspath(blocker) == os.path.abspath(folder) else \
            f" (its parent {blocker} is one)"
        raise ValueError(f"{what} {folder} is an existing file, not a folder{where}; give a "
                         "folder path or move the file away")
    os.makedirs(folder, exist_ok=True)
    return folder


def _read_only(path: str) -> bool:
    mode = os.stat(path).st_mode
    return stat.S_ISREG(mode) and not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def check_output(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                 ours: Callable[[str], bool] | None = None, what: str = "output",
                 refuse_inputs: bool = True) -> None:
    """Refuse (``ValueError``, one line) to write ``path`` when it would destroy something.

    Refused: an existing folder; a path below an existing file; one of the command's inputs (see
    :func:`command_inputs`; skipped with ``refuse_inputs=False``, for writers that compare the
    bytes first); a read-only file; an existing file that ``ours`` does not recognise.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is an existing folder; give a file path")
    blocker = file_in_the_way(os.path.dirname(os.path.abspath(path)))
    if blocker is not None:
        raise ValueError(f"{what} {path}: {blocker} is an existing file, not a folder; give "
                         "another path")
    if not os.path.lexists(path):
        return
    if refuse_inputs:
        source = input_at(path, inputs)
        if source is not None:
            same = "" if source == path else f" (the same file as {source})"
            raise ValueError(f"refusing to write {what} {path}: it is an input of this "
                             f"command{same}; choose another output path")
    if os.path.exists(path) and _read_only(path):
        raise ValueError(f"refusing to replace {path}: it is read-only; choose another output "
                         "path (or make it writable if it really should be replaced)")
    if ours is not None and os.path.exists(path) and not ours(path):
        raise ValueError(f"refusing to replace {path}: it exists and was not written by "
                         "featdenoise; move it away or choose another output path")


def remove_own(path: str | os.PathLike, ours: Callable[[str], bool]) -> bool:
    """Delete ``path`` if it is a file featdenoise wrote (``ours(path)``); refuse otherwise.

    Returns True if a file was removed, False if there was none. The same refusals as
    :func:`check_output` apply (an input, a read-only file, a file not recognised).
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return False
    check_output(path, ours=ours)
    os.remove(path)
    return True


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
def atomic_write(path: str | os.PathLike, mode: str = "w", *,
                 inputs: Iterable[str | os.PathLike] = (),
                 ours: Callable[[str], bool] | None = None, **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "wb") as f: ...`` writes ``path`` all at once or not at all.

    Args:
        path: the file to write; its folder is created.
        mode: ``"w"`` or ``"wb"`` (plus ``open`` keyword arguments such as ``newline``).
        inputs: files this write must never replace (in addition to the running command's inputs,
            :func:`command_inputs`). If ``path`` is one of them, the write is refused unless the
            new bytes equal the old ones, in which case the file is left as it is.
        ours: recognises files featdenoise wrote at ``path``; an existing file it rejects is
            refused before anything is written (see the module docstring).

    Raises:
        ValueError: a refused target (one line naming it).
        OSError: while writing (full disk, read-only folder), raised again as one line that names
            ``path``, the cause, and that the previous version is intact.
    """
    path = os.fspath(path)
    inputs = tuple(inputs)
    check_output(path, ours=ours, refuse_inputs=False)
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        source = input_at(path, inputs)
        if source is not None:
            if filecmp.cmp(tmp, path, shallow=False):  # nothing would change: keep the input
                os.remove(tmp)
                return
            check_output(path, inputs=inputs)  # raises: an input of this command
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


# --------------------------------------------------------------------------- recognisers for ours=
PNG_STAMP = "featdenoise"  # the PNG "Software" text chunk of every picture the library draws


def own_png(path: str) -> bool:
    """A PNG that featdenoise drew (its ``Software`` text names :data:`PNG_STAMP`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and PNG_STAMP.encode() in head


def own_text(first_line: str) -> Callable[[str], bool]:
    """Recognises a text file whose first line starts with ``first_line`` (a report of ours)."""

    def ours(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().startswith(first_line)
        except (OSError, UnicodeDecodeError):
            return False

    return ours


def own_json(*keys: str) -> Callable[[str], bool]:
    """Recognises a JSON object holding every one of ``keys`` (a record file of ours)."""

    def ours(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(obj, (dict, list)) and (
            isinstance(obj, list) or all(k in obj for k in keys))

    return ours
