"""The paper's adversarial-training recipe as small pure pieces (Sec. 5; official ``main.py``,
``adv_model.py``, ``third_party/imagenet_utils.py``), shared by every ``attack.mode`` (the modes
themselves, pgd, free and fast, are :mod:`featdenoise.training.recipes`).

- Weight decay 1e-4 on convolution and fully-connected weights only (official pattern ``.*/W``):
  :func:`param_groups`.
- SGD with Nesterov momentum 0.9: :func:`build_optimizer`.
- Learning rate 0.1 x (global batch / 256); when that exceeds 0.1, linear warm-up from 0.1 over the
  first 5 epochs (Goyal et al. 2017, Sec. 2.2); divided by 10 after epochs 35, 70 and 95; 110
  epochs. Set per step, so a resumed run follows the same curve: :func:`lr_at`, :class:`LRSchedule`.
  (The official code computes ``0.1 * (batch // 256)``, i.e. integer division; we use the exact
  ratio so batches that are not multiples of 256 still train.)
- Cross-entropy with label smoothing 0.1 (TF ``softmax_cross_entropy(label_smoothing=0.1)``: target
  ``(1 - 0.1) * onehot + 0.1 / K``): :func:`loss_fn`.
- Every minibatch is adversarial: targeted PGD (eps 16, step 1, 30 steps) towards a uniformly drawn
  wrong class; one coin per batch picks a clean start (probability 0.2) or a random start (0.8);
  BatchNorm in inference mode during the attack (the attack class switches and restores it) and in
  training mode for the update: :class:`TrainAttack`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from featdenoise.attacks import PGD

DECAY_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two SGD groups: conv/linear ``weight`` tensors with ``weight_decay``; everything else
    (BatchNorm scale/shift, biases, other parameters) with none."""
    decay_ids = {id(m.weight) for m in model.modules()
                 if isinstance(m, DECAY_TYPES) and getattr(m, "weight", None) is not None}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(lr: float, global_batch: int, base_batch: int = 256) -> float:
    """Linear scaling rule: ``lr x global_batch / base_batch``."""
    return lr * global_batch / base_batch


def lr_at(step: int, steps_per_epoch: int, *, lr: float, global_batch: int, base_batch: int,
          warmup_epochs: float, milestones: list, lr_decay: float) -> float:
    """Learning rate for global training step ``step`` (0-based) of the recipe (module docstring).

    Warm-up (only when the scaled rate exceeds ``lr``): ``lr + (peak - lr) * step / W`` for
    ``step < W = warmup_epochs * steps_per_epoch``. Each milestone ``m`` (epochs) multiplies the
    rate by ``lr_decay`` from step ``m * steps_per_epoch`` on.
    """
    peak = scaled_lr(lr, global_batch, base_batch)
    warm_steps = warmup_epochs * steps_per_epoch
    if peak > lr and step < warm_steps:
        value = lr + (peak - lr) * step / warm_steps
    else:
        value = peak
    passed = sum(1 for m in milestones if step >= round(m * steps_per_epoch))
    return value * lr_decay ** passed


def cyclic_lr_at(step: int, total_steps: int, *, peak: float, peak_at: float) -> float:
    """One-cycle rate of Wong, Rice, Kolter (ICLR 2020, Sec. 5.1): linear from 0 at step 0 to
    ``peak`` at step ``peak_at x total_steps``, then linear to 0 at ``total_steps``."""
    top = peak_at * total_steps
    if step <= top:
        return peak * step / top
    return peak * max(total_steps - step, 0) / (total_steps - top)


class LRSchedule:
    """Sets the optimizer's learning rate from the global step (state: the step).

    ``optim_cfg.schedule``: ``step`` (:func:`lr_at`) or ``cyclic`` (:func:`cyclic_lr_at` over
    ``steps_per_epoch x optim_cfg.epochs`` steps, peak the scaled ``optim_cfg.lr``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, optim_cfg,
                 global_batch: int):
        self.optimizer, self.steps_per_epoch, self.step = optimizer, steps_per_epoch, 0
        self.kw = dict(lr=optim_cfg.lr, global_batch=global_batch,
                       base_batch=optim_cfg.base_batch, warmup_epochs=optim_cfg.warmup_epochs,
                       milestones=list(optim_cfg.milestones), lr_decay=optim_cfg.lr_decay)
        self.cyclic = None
        if getattr(optim_cfg, "schedule", "step") == "cyclic":
            self.cyclic = dict(total_steps=steps_per_epoch * optim_cfg.epochs,
                               peak=scaled_lr(optim_cfg.lr, global_batch, optim_cfg.base_batch),
                               peak_at=optim_cfg.cycle_peak)

    def lr(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.cyclic is not None:
            return cyclic_lr_at(step, **self.cyclic)
        return lr_at(step, self.steps_per_epoch, **self.kw)

    def apply(self, step: int) -> float:
        """Set every group's rate for ``step`` and remember it; returns the rate."""
        self.step = step
        value = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = value
        return value

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.apply(int(state["step"]))


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.SGD:
    """SGD with Nesterov momentum over the two groups of :func:`param_groups` (lr set per step)."""
    return torch.optim.SGD(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                           momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)


def loss_fn(label_smoothing: float = 0.1) -> nn.Module:
    """Mean cross-entropy with label smoothing (target ``(1-s) onehot + s/K``)."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def zero_nonfinite_grads(model: nn.Module, state, device) -> None:
    """Zero non-finite gradients on the device and remember the first bad step in
    ``state.nonfinite`` (a 0-d int64 tensor, -1: none), with no host synchronisation: one fused
    norm over every gradient decides, so a NaN never reaches the weights."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if state.nonfinite is None:
        state.nonfinite = torch.full((), -1, dtype=torch.int64, device=device)
    if grads:
        bad = ~torch.nn.utils.get_total_norm(grads).isfinite()  # one fused reduction
        for g in grads:
            g.masked_fill_(bad, 0.0)
        state.nonfinite.masked_fill_(bad & (state.nonfinite < 0), state.step)


@torch.no_grad()
def add_running_metrics(sums: dict, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                        target: torch.Tensor | None) -> None:
    """Add a step's loss, correct count and target hits to the running ``sums`` on the device
    (read on the host only at log steps)."""
    pred = logits.argmax(1)
    sums["loss"] += loss.detach().float() * len(y)
    sums["correct"] += (pred == y).sum()
    sums["hit"] += (pred == target).sum() if target is not None else 0.0
    sums["n"] += len(y)


def draw_clean_start(prob: float, generator: torch.Generator | None = None) -> bool:
    """One coin per batch: True (start PGD at the clean image) with probability ``prob``."""
    return bool(torch.rand((), generator=generator) < prob)


def steps_per_epoch_for(num_samples: int, batch_size: int) -> int:
    """Full batches per process per epoch (remainder dropped, as DistributedSampler + drop_last)."""
    return math.floor(num_samples / batch_size)


class TrainAttack:
    """The training-time adversary: targeted PGD with one clean/random-start coin per batch.

    ``__call__(x, y) -> (x_adv, target, clean_start)`` with ``x`` ``[N, C, H, W]`` in [0, 1];
    ``steps == 0`` returns the clean batch (clean training, Table 3) and ``target`` None.
    ``eps`` and ``step_size`` are given in [0, 1] pixel units (16/255, 1/255 in the paper).
    The attacks run accelerated (:func:`featdenoise.accel.inference_grad`: BatchNorm folded, CPU
    convolutions packed; the same function up to float rounding; a ``torch.compile``d model runs
    the normal path) unless ``exact``. The two attacks (random and clean start) share the
    model's caches.
    """

    def __init__(self, model: nn.Module, steps: int, eps: float, step_size: float,
                 clean_start_prob: float = 0.2, targeted: bool = True, exact: bool = False):
        self.steps, self.clean_start_prob = steps, clean_start_prob
        self.random_start: PGD | None = None
        self.clean_start: PGD | None = None
        if steps > 0:
            common: dict[str, Any] = dict(eps=eps, step_size=step_size, steps=steps,
                                          targeted=targeted, exact=exact)
            self.random_start = PGD(model, random_start=True, **common)
            self.clean_start = PGD(model, random_start=False, **common)
            # Training's own guard (zero_nonfinite_grads, then NonFiniteLossError at a check
            # step) stops every process at the same step; an attack raising on one process
            # would leave the others waiting in the gradient all-reduce.
            self.random_start.check_finite = self.clean_start.check_finite = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.random_start is None or self.clean_start is None:  # steps == 0
            return x, None, True
        clean = draw_clean_start(self.clean_start_prob)
        attack = self.clean_start if clean else self.random_start
        x_adv = attack(x, y).detach()
        return x_adv, getattr(attack, "last_target", None), clean
