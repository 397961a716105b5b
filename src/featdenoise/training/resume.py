"""Resuming a run from its checkpoint: which file (decided once, by rank 0), whether it was
written by the same recipe, and putting weights, optimizer, schedule, position and generator
states back."""

from __future__ import annotations

import os

from torch import nn

from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import distributed as dist
from featdenoise.training.config import Config
from featdenoise.training.step import State, StepContext


def resume_decision(cfg: Config) -> str | None:
    """``run.resume`` as read on this process: ``auto`` -> ``out_dir/checkpoint.pt`` if it is a
    file, else None; ``never`` -> None; a path -> that path (FileNotFoundError if missing)."""
    r = cfg.run.resume
    if r == "never":
        return None
    if r == "auto":
        path = os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(r):
        raise FileNotFoundError(f"run.resume={r}: no such checkpoint file")
    return r


def resume_path(cfg: Config) -> str | None:
    """The checkpoint to resume from, decided by rank 0 and the same file on every process.

    Each rank asking for itself could disagree when ``run.out_dir`` is on each node's own disk
    (rank 0 resumes, the others restart at step 0, loops differ in length and the job hangs).
    Rank 0 decides (:func:`resume_decision`), every process gets its path, and a process whose
    copy is missing or differs receives rank 0's bytes, so all resume from the same step.
    """
    path = dist.decide_on_main(lambda: resume_decision(cfg))
    if path is not None:
        dist.share_file(path)
    return path


def check_compatible(saved: dict, cfg: Config, path: str) -> None:
    """Refuse to resume from checkpoint ``path`` (its config ``saved``) when its ``model``,
    ``optim`` or ``attack`` section or its batch size differ from ``cfg``'s."""
    now, defaults = cfg.to_dict(), Config().to_dict()
    for section in ("model", "optim", "attack"):
        # Keys added after the checkpoint was written take their defaults (same recipe).
        old = saved.get(section)
        if isinstance(old, dict) and section != "model":
            old = {**defaults[section], **old}
        if old != now[section]:
            raise ValueError(f"checkpoint {path} was written with a different '{section}' config; "
                             f"use a new run.out_dir or run.resume=never")
    if saved["data"]["batch_size"] != now["data"]["batch_size"]:
        raise ValueError(f"checkpoint {path} used data.batch_size={saved['data']['batch_size']}; "
                         f"resume with the same batch size")


def restore(path: str, model: nn.Module, state: State, ctx: StepContext) -> dict:
    """Load checkpoint ``path`` into ``model`` (the plain module), the optimizer and schedule of
    ``ctx`` and the position of ``state``; on one process also the generator states. Returns the
    checkpoint's ``extra`` entry (the recipe's own state)."""
    saved = ckpt.load_checkpoint(path)
    check_compatible(saved["config"], ctx.cfg, path)
    model.load_state_dict(saved["model"])
    ctx.optimizer.load_state_dict(saved["optimizer"])
    ctx.schedule.load_state_dict(saved["schedule"])
    state.epoch, state.step_in_epoch, state.step = (saved["epoch"], saved["step_in_epoch"],
                                                    saved["step"])
    if dist.world_size() == 1:
        ckpt.set_rng_state(saved["rng"])
    return saved.get("extra") or {}
