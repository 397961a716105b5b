"""One rule for the folders commands write into: where a write may land, who holds the folder, and
what a restart may delete.

Every command that writes into a folder (``eval``, ``blackbox``, ``visualize``, ``ablate``,
``demo``, ``train``) goes through this module; single files (``predict``, ``convert``) go through
:func:`featdenoise.runtime.atomic.check_output`. The rule:

- **Names derived from inputs are safe.** A sub-folder named after a model (``eval --checkpoint A
  --checkpoint B``) gets :func:`safe_name` of it: never empty, ``.``, ``..`` or holding a path
  separator, so it cannot climb out of the folder or land on the folder itself; two models whose
  names collide get ``-2``, ``-3``, ... (:func:`unique_names`).
- **Writes stay under the folder the user named.** :func:`child` resolves ``folder/name`` (links
  followed) and refuses a result outside the resolved folder, and a child that is a symbolic
  link. The named folder itself may be a link (a user's choice of disk).
- **Inputs are never outputs.** :func:`output_dir` refuses a folder that is (resolved) one of
  the command's inputs: a file or a folder named on its command line (see
  :func:`featdenoise.runtime.atomic.command_inputs`) or passed as ``inputs=``.
- **One process per folder.** :class:`FolderLock` is a lock file holding the holder's pid and
  host; a second run into the folder is refused in one line naming both; a lock left by a process
  that no longer runs (killed) is taken over.
- **Plan, check, then delete.** :func:`plan_removal` lists every path a restart would delete and
  checks each (exists as ours, no symbolic link anywhere in it, inside the folder); only when every
  check passed does :func:`remove_planned` delete, so a refused restart deletes nothing.

Everything refused raises ``ValueError`` (one line: the path, why, what to do).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from featdenoise.runtime import distributed as dist
from featdenoise.runtime.atomic import ensure_dir, file_in_the_way, input_at, input_folders

LOCK_FILE = ".featdenoise.lock"


# --------------------------------------------------------------------------- names
def safe_name(name: str, fallback: str = "model") -> str:
    """``name`` as one path component: characters other than letters, digits, ``-``, ``_`` and
    ``.`` become ``_``, leading dots are dropped; an empty result is ``fallback``.

    ``"runs/a" -> "runs_a"``, ``".." -> "model"``, ``"" -> "model"``, ``"r:pgd" -> "r_pgd"``.
    """
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).lstrip(".")
    return text if text.strip("_") else fallback


def unique_names(names: Sequence[str], fallback: str = "model") -> list[str]:
    """:func:`safe_name` of each, with ``-2``, ``-3``, ... added to the second and later of names
    that collide (case-insensitively, as on some file systems); order kept."""
    out: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = safe_name(name, fallback)
        candidate, k = base, 1
        while candidate.lower() in taken:
            k += 1
            candidate = f"{base}-{k}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def display_name(path: str) -> str:
    """The last component of the *resolved* ``path`` (``..`` run from ``runs/a/eval`` is ``a``)."""
    return os.path.basename(os.path.realpath(path)) or "model"


# --------------------------------------------------------------------------- where writes land
def is_inside(folder: str, path: str) -> bool:
    """Whether ``path`` resolved (links followed) is ``folder`` resolved or below it."""
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def child(folder: str, name: str, what: str = "output") -> str:
    """``folder/safe_name(name)``, refused (``ValueError``) if it is a symbolic link or does not
    resolve below ``folder``."""
    path = os.path.join(folder, safe_name(name))
    check_entry(folder, path, what)
    return path


def check_entry(folder: str, path: str, what: str = "output") -> None:
    """Refuse ``path`` (to be written or deleted inside ``folder``) when it is a symbolic link or
    resolves outside ``folder``."""
    if os.path.islink(path):
        raise ValueError(f"refusing to write {what} {path}: it is a symbolic link (to "
                         f"{os.readlink(path)}); featdenoise writes only real files and folders "
                         f"inside {folder}: remove the link or choose another folder")
    if not is_inside(folder, path):
        raise ValueError(f"refusing to write {what} {path}: it resolves to "
                         f"{os.path.realpath(path)}, outside {folder}; choose another folder")


def output_dir(path: str, flag: str = "--out", inputs: Iterable[str] = (), *,
               create: bool = True) -> str:
    """Accept ``path`` as a command's output folder: not an existing file (or below one), not one
    of the command's inputs (files and folders named on its command line, and ``inputs``);
    created when ``create``. Returns ``path``."""
    path = os.fspath(path)
    same = _input_folder_at(path, inputs)
    if same is not None:
        shown = "" if os.path.abspath(same) == os.path.abspath(path) else f" (the same as {same})"
        raise ValueError(f"{flag} {path} is an input of this command{shown}; inputs are never "
                         "outputs: give another output folder")
    if input_at(path, [p for p in inputs if os.path.isfile(p)]) is not None:
        raise ValueError(f"{flag} {path} is an input file of this command; give an output folder")
    if create:
        ensure_dir(path, flag)
    return path


def _input_folder_at(path: str, inputs: Iterable[str]) -> str | None:
    if not os.path.exists(path):
        return None
    for candidate in (*input_folders(), *(os.fspath(p) for p in inputs)):
        if os.path.exists(candidate) and os.path.realpath(candidate) == os.path.realpath(path):
            return candidate
    return None


# --------------------------------------------------------------------------- one process per folder
def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    now = _start_time(pid)
    return started is None or now is None or now == started


class FolderLock:
    """A lock file in ``folder`` (``.featdenoise.lock``, or ``name``) held by one process.

    ``acquire()`` creates the folder if needed and the lock file exclusively; a lock already held
    by a live process (``conflicts`` names more lock files that also block, e.g. the shards of an
    evaluation) is refused in one line naming the folder, the holder's pid and host; one left by
    a process that has exited is replaced. ``release()`` removes the lock file (and the folder
    when ``acquire`` created it and nothing else was written). Use as a context manager.
    """

    def __init__(self, folder: str, what: str = "folder", name: str = LOCK_FILE,
                 conflicts: Callable[[], Iterable[str]] | None = None) -> None:
        self.folder = os.fspath(folder)
        self.what = what
        self.path = os.path.join(self.folder, name)
        self._conflicts = conflicts
        self._held = False
        self._created = False

    def _holder(self, path: str) -> dict | None:
        """The live holder recorded in ``path``, or None (no lock, or a stale one, then removed)."""
        try:
            with open(path) as f:
                info = json.load(f)
            pid = int(info["pid"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            info, pid = None, None
        if info is not None and info.get("host") not in (None, socket.gethostname()):
            return info  # another machine's process: cannot be checked, so it holds
        if pid is not None and pid != os.getpid() and _alive(pid, info.get("started")):
            return info
        if pid == os.getpid() and path != self.path:
            return info
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # left by a process that is gone (or unreadable): stale
        return None

    def _refuse(self, path: str, info: dict) -> None:
        since = info.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" \
            if isinstance(since, (int, float)) else ""
        host = info.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        raise ValueError(f"{self.what} {self.folder} is in use by another featdenoise run (pid "
                         f"{info.get('pid')}{where}{when}, lock {path}); wait for it to finish "
                         "or choose another folder (delete the lock file only if that process "
                         "is gone)")

    def acquire(self) -> FolderLock:
        if self._held:
            return self
        check_entry(os.path.dirname(self.path) or ".", self.path, "lock file")
        blocker = file_in_the_way(self.folder)
        if blocker is not None:
            where = "" if os.path.abspath(blocker) == os.path.abspath(self.folder) else \
                f": {blocker}"
            raise ValueError(f"{self.what} {self.folder}{where} is an existing file, not a "
                             "folder; give a folder path or move the file away")
        self._created = not os.path.isdir(self.folder)
        ensure_dir(self.folder, self.what)
        try:
            for other in self._conflicts() if self._conflicts else ():
                info = self._holder(other)
                if info is not None:
                    self._refuse(other, info)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                      "started": _start_time(os.getpid())}
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    info = self._holder(self.path)
                    if info is not None:
                        self._refuse(self.path, info)
                    continue  # a stale lock was removed: try once more
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
                self._held = True
                return self
            raise ValueError(f"{self.what} {self.folder}: could not take the lock {self.path} "
                             "(another run is starting there?); try again")
        except BaseException:
            self._remove_created()
            raise

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            with open(self.path) as f:
                mine = int(json.load(f).get("pid", -1)) == os.getpid()
        except (OSError, ValueError, TypeError, AttributeError):
            mine = False
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self._remove_created()

    def _remove_created(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only when empty: nothing of the run was written
            self._created = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _NoLock:
    """What a process that does not take the lock (a rank other than 0) holds."""

    def release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def lock_on_main(folder: str, what: str = "folder", **kwargs) -> FolderLock | _NoLock:
    """A :class:`FolderLock` taken by rank 0 only (every process when there is no process group);
    a refusal on rank 0 is raised on every process, so all stop together."""
    held: dict = {}

    def take() -> None:
        held["lock"] = FolderLock(folder, what, **kwargs).acquire()

    dist.decide_on_main(take)
    return held.get("lock", _NoLock())


# --------------------------------------------------------------------------- plan, check, delete
def plan_removal(folder: str, owned: Mapping[str, Callable[[str], bool]],
                 what: str = "--restart") -> list[str]:
    """The paths among ``owned`` (name in ``folder`` -> recogniser of our file or folder there)
    that exist, each checked before anything is deleted: inside ``folder``, not a symbolic link
    and nothing below it one, recognised as ours. Refused: ``ValueError`` naming the path."""
    planned = []
    for name, ours in owned.items():
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        links = [path] if os.path.islink(path) else []
        if not links and os.path.isdir(path):
            links = [os.path.join(root, n) for root, dirs, files in os.walk(path)
                     for n in (*dirs, *files) if os.path.islink(os.path.join(root, n))]
        if links:
            inner = "" if links[0] == path else f": {links[0]}"
            raise ValueError(f"{what}: refusing to remove {path}{inner}: it is a symbolic link; "
                             "nothing was deleted (remove the link first)")
        if not is_inside(folder, path):
            raise ValueError(f"{what}: refusing to remove {path}: it resolves outside {folder}; "
                             "nothing was deleted")
        if not ours(path):
            raise ValueError(f"{what}: refusing to remove {path}: it was not written by "
                             "featdenoise; nothing was deleted (move it away or use another "
                             "folder)")
        planned.append(path)
    return planned


def remove_planned(paths: Sequence[str]) -> None:
    """Delete what :func:`plan_removal` accepted (files and folders)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def own_folder(files: Callable[[str], bool]) -> Callable[[str], bool]:
    """Recognises a folder each of whose entries is a file ``files(path)`` accepts."""

    def ours(path: str) -> bool:
        if not os.path.isdir(path):
            return False
        for root, dirs, names in os.walk(path):
            if dirs:
                return False
            if not all(files(os.path.join(root, n)) for n in names):
                return False
        return True

    return ours
