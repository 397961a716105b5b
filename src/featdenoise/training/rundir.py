"""Run-directory consistency: a run folder holds the files of one run, and nothing of anyone else's.

A training run owns five names in ``run.out_dir``: ``config.yaml``, ``metrics.jsonl``,
``checkpoint.pt``, ``model.safetensors`` and the ``tensorboard/`` event files, and one run at a
time holds it (:func:`lock_run_dir`). Before a run writes anything but its lock,
:func:`check_run_dir` looks at what the folder already holds and either accepts it or refuses with
one line (``ValueError``); only then does :func:`prepare_run_dir` write:

- a file of one of those names that featdenoise did not write (recognised by its content, not its
  name) is never replaced or deleted: the run is refused;
- a run that resumes (``run.resume=auto`` with a checkpoint, or a path to this folder's
  checkpoint) keeps the folder's files; its ``config.yaml`` is rewritten only after the checkpoint
  has been loaded and found compatible;
- a run that starts afresh with ``run.resume=never`` deletes the earlier run's ``checkpoint.pt``
  and ``model.safetensors`` (and its metrics and event files) once it has been accepted, so that
  no stale network is left beside the new one to be loaded later without a word; the deletion is
  reported in one line;
- a run that would start afresh without saying so (``run.resume=auto`` in a folder with exported
  weights but no checkpoint, or ``run.resume=PATH`` elsewhere into a folder holding another run)
  is refused: ask for ``run.resume=never`` or another ``run.out_dir``.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager

from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import outdir
from featdenoise.runtime.atomic import check_output, ensure_dir, file_in_the_way, remove_own
from featdenoise.training.config import Config, config_text, is_own_config, save_config

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def is_own_metrics(path: str) -> bool:
    """True if every line of ``path`` is a metrics record (a JSON object with kind and step)."""
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not (isinstance(record, dict) and "kind" in record and "step" in record):
                        return False
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return True


def _same_text(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == text
    except (OSError, UnicodeDecodeError):
        return False


def _is_event_file(path: str) -> bool:
    return os.path.basename(path).startswith("events.out.tfevents.")


_OWNED = {CONFIG: is_own_config, METRICS: is_own_metrics, ckpt.CHECKPOINT: ckpt.is_own_checkpoint,
          ckpt.WEIGHTS: ckpt.is_own_weights}


def is_own_run_dir(path: str) -> bool:
    """A folder holding nothing but what a training run writes there (the five names, each
    recognised by its content, and lock files): one that may be deleted as a whole."""
    if not os.path.isdir(path):
        return False
    for root, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), path)
            ours = _OWNED.get(rel)
            if ours is not None:
                if not ours(os.path.join(root, n)):
                    return False
            elif not (n.startswith(outdir.LOCK_FILE) or (
                    os.path.dirname(rel) == TENSORBOARD and _is_event_file(n))):
                return False
    return True


def _event_files(run_dir: str) -> list[str]:
    folder = os.path.join(run_dir, TENSORBOARD)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if _is_event_file(n) and os.path.isfile(os.path.join(folder, n)))


def check_run_dir(cfg: Config, resume: str | None) -> list[str]:
    """Accept or refuse ``cfg.run.out_dir`` for a run that resumes from ``resume`` (None: starts
    afresh); reads only. Returns the stale files the run will delete when it starts (see the
    module docstring).

    Raises:
        ValueError: one line naming the folder or file and what to do.
    """
    run_dir = cfg.run.out_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run.out_dir {run_dir} is an existing file, not a folder; give a "
                         "folder path (--out)")
    if not os.path.isdir(run_dir):
        blocker = file_in_the_way(run_dir)
        if blocker is not None:
            raise ValueError(f"run.out_dir {run_dir}: {blocker} is an existing file, not a "
                             "folder; give another path (--out)")
        return []
    for name, ours in _OWNED.items():
        path = os.path.join(run_dir, name)
        if name == CONFIG and os.path.isfile(path) and _same_text(path, config_text(cfg)):
            continue  # rewriting it would not change a byte (e.g. it is the --config read)
        if os.path.lexists(path):
            try:
                check_output(path, ours=ours, what="output")
            except ValueError as err:
                raise ValueError(f"run.out_dir {run_dir} cannot hold this run: {err}") from None
    exports = [n for n in (ckpt.CHECKPOINT, ckpt.WEIGHTS)
               if os.path.exists(os.path.join(run_dir, n))]
    if resume is not None:
        own = os.path.join(run_dir, ckpt.CHECKPOINT)
        if exports and not (os.path.exists(own) and os.path.samefile(resume, own)):
            raise ValueError(f"run.out_dir {run_dir} holds {' and '.join(exports)} of another run "
                             f"while run.resume={resume} continues a different one; give an "
                             "empty run.out_dir")
        return []
    if exports and cfg.run.resume != "never":
        raise ValueError(f"run.out_dir {run_dir} holds {ckpt.WEIGHTS} of an earlier run but no "
                         f"{ckpt.CHECKPOINT} to resume from; pass run.resume=never to start "
                         f"afresh there (its {ckpt.WEIGHTS} is then deleted) or choose another "
                         "run.out_dir")
    stale = [os.path.join(run_dir, n) for n in (*exports, METRICS)
             if os.path.exists(os.path.join(run_dir, n))]
    return stale + _event_files(run_dir)


def prepare_run_dir(cfg: Config, stale: list[str]) -> list[str]:
    """Create the run folder, delete the ``stale`` files :func:`check_run_dir` listed (only files
    featdenoise wrote) and write ``config.yaml``. Main process only. Returns what was deleted."""
    ensure_dir(cfg.run.out_dir, "run.out_dir")
    removed = []
    for path in stale:
        ours = _OWNED.get(os.path.basename(path), _is_event_file)
        if remove_own(path, ours):
            removed.append(path)
    save_config(cfg, cfg.run.out_dir)
    return removed


def lock_run_dir(cfg: Config) -> AbstractContextManager:
    """The run folder's lock, taken by the main process (rank 0 under torchrun) before anything
    is read or written there, and held to the end of the run: a second run into the same
    ``run.out_dir`` is refused in one line naming the folder and the holder's pid (the same lock
    as an evaluation folder's, :class:`featdenoise.runtime.outdir.FolderLock`; one left by a
    killed run is taken over). ``with lock_run_dir(cfg): ...``."""
    return outdir.lock_on_main(cfg.run.out_dir, "run.out_dir")
