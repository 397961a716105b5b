"""What every training step shares, whatever the recipe: the run's position (:class:`State`), the
parts an update uses (:class:`StepContext`), the per-step seed and learning rate
(:func:`begin_step`), and the guard that stops on a non-finite loss (:func:`check_finite`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import distributed as dist
from featdenoise.runtime.seeds import derive_seed
from featdenoise.training.config import Config
from featdenoise.training.parts import LRSchedule


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; no update with a non-finite gradient reached
    the weights or a checkpoint."""


def _zero_sums() -> dict:
    return {"loss": 0.0, "correct": 0.0, "hit": 0.0, "n": 0.0, "skipped": 0.0}


@dataclass
class State:
    """Where training stands: the next step to run is ``step`` (global), ``step_in_epoch`` of
    ``epoch``; counters for the running averages since the last log line."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=_zero_sums)
    epoch_skipped: int = 0
    tick: float = field(default_factory=time.perf_counter)
    targeted: bool = True
    # First global step whose gradients were not finite, as a tensor on the training device
    # (-1: none); read on the host only at check steps (see check_finite).
    nonfinite: torch.Tensor | None = None


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the network, the adversary, the batch and the position: the
    run's config and device, the loss, the optimizer and the per-step learning rate."""

    cfg: Config
    device: torch.device
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule


def begin_step(state: State, ctx: StepContext) -> None:
    """Seed the step's randomness and set its learning rate.

    Randomness (clean/random-start coin, targets, random starts) is a function of (seed, step,
    rank), so a resumed run, whatever its world size, draws exactly what the interrupted one
    would have; the rate is a function of the global step (warm-up and milestones).
    """
    torch.manual_seed(derive_seed(ctx.cfg.run.seed, "train-step", state.step, dist.rank()))
    ctx.schedule.apply(state.step)


def check_due(step: int, cfg: Config) -> bool:
    """True when global step ``step`` is followed by a log line, a periodic checkpoint or a stop."""
    r, after = cfg.run, step + 1
    return bool(after % r.log_every == 0 or (r.checkpoint_every and after % r.checkpoint_every == 0)
                or r.stop_after == after)


def check_finite(state: State, cfg: Config) -> None:
    """Raise :class:`NonFiniteLossError` at a check step if a step had non-finite gradients.

    Non-finite gradients (a NaN or infinite loss on any process: DDP's all-reduce spreads it to
    every process's gradients, so all processes agree without an extra collective) are zeroed on
    the device before the update (:func:`featdenoise.training.parts.zero_nonfinite_grads`), so
    they never reach the weights, and the step is remembered; the host reads that flag only on
    steps followed by a log line, a ``checkpoint_every`` checkpoint or ``stop_after``. Trade-off:
    between the bad step and that check (at most ``run.log_every - 1`` steps) updates carry no
    gradient (momentum and weight decay still act), and an end-of-epoch checkpoint in that window
    holds those finite weights.
    """
    if not check_due(state.step, cfg) or state.nonfinite is None:
        return
    bad = int(state.nonfinite)  # the one host sync, at check steps only
    if bad < 0:
        return
    path = os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT)
    saved = "no checkpoint has been written yet"
    if os.path.isfile(path):
        try:
            step = ckpt.load_checkpoint(path)["step"]
            saved = (f"{path} holds step {step} (finite weights: the non-finite update was "
                     f"not applied)")
        except (ValueError, OSError):
            saved = f"{path} exists but cannot be read"
    raise NonFiniteLossError(
        f"non-finite training loss or gradient at step {bad} (stopped at step {state.step}, "
        f"epoch {state.epoch}); {saved}: lower optim.lr or check the data")
