"""What an evaluation folder is the evaluation of: the identity checked before a run resumes.

``settings.json`` holds everything that decides the numbers: attack settings, the images (a digest
of their ids) and the model (class, registry name and kwargs where known, SHA-256 of its weights).
A run into a folder holding another evaluation, finished or half-done, is refused with one line
naming the first differing keys; ``restart=True`` removes the engine's own files there first, each
checked before any is deleted (recognised as ours, no symbolic link, inside the folder), so a
refused restart deletes nothing. One process at a time holds the folder (:func:`prepare`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from featdenoise.evaluation.records import (
    OUTCOMES_FILE,
    OWN_FILES,
    PARTS_DIR,
    SETTINGS_FILE,
    write_json,
)
from featdenoise.runtime import distributed as dist
from featdenoise.runtime import outdir


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and values), hex."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model: nn.Module) -> dict:
    """What a resumed evaluation must find unchanged about the model: class, registry name and
    kwargs where known, and :func:`weights_digest`."""
    out = {"class": type(model).__name__, "weights_sha256": weights_digest(model)}
    for key in ("model_name", "model_kwargs"):
        if getattr(model, key, None) is not None:
            out[key] = getattr(model, key)
    return out



# Settings that describe a run without changing its numbers: they may differ on resume.
FREE_KEYS = ("name", "exact", "source", "title")


def check_identity(out_dir: str, identity: dict, *, restart: bool = False,
                   write: bool = True) -> None:
    """Refuse to mix two evaluations in one folder; write ``settings.json`` for a new one.

    ``identity`` is everything that determines the numbers (attack settings, images, model
    weights). A folder whose ``settings.json`` differs is refused with one line naming the
    differing keys, unless ``restart``: then the engine's own files there are removed first.
    A folder holding records but no settings is refused too (not ours, or damaged).
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is an existing file; give a folder")
    path = os.path.join(out_dir, SETTINGS_FILE)
    old = None
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is unreadable ({err}); remove it or use a new --out "
                             "folder") from None
    elif os.path.isdir(os.path.join(out_dir, PARTS_DIR)) or \
            os.path.isfile(os.path.join(out_dir, OUTCOMES_FILE)):
        old = {}
    if old is not None and not restart:
        was = _flat({k: v for k, v in old.items() if k not in FREE_KEYS})
        now = _flat({k: v for k, v in identity.items() if k not in FREE_KEYS})
        diff = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {_short(was.get(k))} -> {_short(now.get(k))}"
                              for k in diff[:4])
            raise ValueError(
                f"{out_dir} holds another evaluation ({shown}"
                f"{', ...' if len(diff) > 4 else ''}); use a new --out folder, or --restart to "
                "discard it")
        return
    if not write:
        return
    if old is not None and restart:
        # Every deletion planned and checked first (ours, no link, inside the folder): a refused
        # restart deletes nothing.
        outdir.remove_planned(outdir.plan_removal(out_dir, OWN_FILES, "--restart"))
    outdir.output_dir(out_dir)
    write_json(path, identity)


def prepare(out_dir: str, identity: dict, *, restart: bool = False, rank: int | None = None,
            world_size: int | None = None) -> outdir.FolderLock | outdir._NoLock:
    """Take the folder's lock, then :func:`check_identity` once per evaluation: by every hand-run
    shard, or by rank 0 under torchrun with its verdict shared, so every rank refuses (or goes on)
    together.

    Returns the lock (``with prepare(...):`` holds it while the evaluation runs): one process per
    evaluation folder, or per shard of it (shards run by hand hold one lock each, and wait for no
    one but a run of the whole folder); see :class:`featdenoise.runtime.outdir.FolderLock`.
    """
    rank, world, collective = dist.rank_world(rank, world_size)
    lock: outdir.FolderLock | outdir._NoLock
    if not collective:
        lock = folder_lock(out_dir, rank if world > 1 else None, restart)
        with _released_on_error(lock.acquire()):
            check_identity(out_dir, identity, restart=restart)
        return lock
    error: str | None = None
    lock = outdir._NoLock()  # ranks other than 0 hold nothing
    if rank == 0:
        try:
            with _released_on_error(folder_lock(out_dir, None, restart).acquire()) as lock:
                check_identity(out_dir, identity, restart=restart)
        except ValueError as err:
            error = str(err)
    error = dist.all_gather_objects([error])[0]
    if error:
        raise ValueError(error)
    return lock


def folder_lock(out_dir: str, shard: int | None, restart: bool = False) -> outdir.FolderLock:
    """The lock of an evaluation folder (``shard`` None) or of one hand-run shard of it.

    A run of the whole folder waits for no shard to be running there and the reverse; a shard
    that restarts the folder waits for every other shard too."""
    name = outdir.LOCK_FILE if shard is None else f"{outdir.LOCK_FILE}.shard{shard}"

    def conflicts() -> list[str]:
        if not os.path.isdir(out_dir):
            return []
        found = [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir))
                 if n.startswith(outdir.LOCK_FILE) and n != name]
        return found if shard is None or restart else \
            [p for p in found if os.path.basename(p) == outdir.LOCK_FILE]

    return outdir.FolderLock(out_dir, "evaluation folder", name, conflicts)


@contextlib.contextmanager
def _released_on_error(lock: outdir.FolderLock) -> Iterator[outdir.FolderLock]:
    try:
        yield lock
    except BaseException:
        lock.release()
        raise


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"model": {"weights_sha256": h}}`` -> ``{"model.weights_sha256": h}`` (dicts only)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


