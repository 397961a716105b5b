"""The paper's recipe (``attack.mode: pgd``, Sec. 5): every minibatch is replaced by its
adversarial version (targeted PGD-``attack.steps``, :class:`featdenoise.training.parts.
TrainAttack`) and the network is updated on those images only (:func:`train_step`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.runtime.modes import bf16_autocast
from featdenoise.training.config import Config
from featdenoise.training.parts import TrainAttack, add_running_metrics, zero_nonfinite_grads
from featdenoise.training.recipes.base import Recipe
from featdenoise.training.step import State, StepContext, begin_step, check_finite


def train_step(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, state: State,
               ctx: StepContext) -> None:
    """One synchronized SGD step on an adversarial-only minibatch.

    ``model``: what the update runs (DDP wrapper allowed); ``attack(x, y) -> (x_adv, target,
    clean_start)`` crafts the batch (``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``). No host
    synchronisation on ordinary steps: loss and accuracy sums stay on the device until the log
    step all-reduces them; non-finite gradients are zeroed on the device and stop training at the
    next check step (:func:`featdenoise.training.step.check_finite`).
    """
    cfg, device = ctx.cfg, ctx.device
    # Seed of this step's randomness and its learning rate.
    begin_step(state, ctx)
    # Craft the adversarial batch: BN in inference mode (the attack switches it).
    with bf16_autocast(cfg.run.bf16, device):
        x_adv, target, _ = attack(x, y)
    # Update on the adversarial images only, BN in training mode.
    model.train()
    with bf16_autocast(cfg.run.bf16, device):
        logits = model(x_adv)
        loss = ctx.criterion(logits.float(), y)
    # Backward (DDP averages gradients across processes).
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Non-finite gradients are zeroed on the device and their step remembered (no host sync).
    zero_nonfinite_grads(model, state, device)
    # SGD step.
    ctx.optimizer.step()
    # Running metrics, summed on the device (read at log steps).
    add_running_metrics(state.sums, loss, logits, y, target)
    check_finite(state, cfg)


class PGDRecipe(Recipe):
    """``attack.mode: pgd``: :func:`train_step` with the paper's adversary (``attack.steps=0``:
    clean training, Table 3)."""

    def __init__(self, attack):
        self.attack = attack  # (x, y) -> (x_adv, target, clean_start)

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, attack_net: nn.Module, val_set: Dataset,
              device: torch.device) -> Recipe:
        a, sizes = cfg.attack, cfg.attack.unit_sizes()
        return cls(TrainAttack(attack_net, a.steps, sizes.eps, sizes.step_size,
                               a.clean_start_prob, a.targeted, exact=cfg.run.compile))

    def step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, state: State,
             ctx: StepContext) -> None:
        train_step(net, self.attack, x, y, state, ctx)
