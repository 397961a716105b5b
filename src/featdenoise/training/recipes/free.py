"""Free-AT (``attack.mode: free``; Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019,
Alg. 1).

Every minibatch is replayed ``m = attack.replays`` times. Each replay runs one forward on
``clip(x + delta, 0, 1)`` (BatchNorm in training mode) and one backward that gives both the
weight gradient (SGD step) and the input gradient; ``delta <- clip(delta + eps sign(g), -eps,
eps)``. ``delta`` is kept across replays *and* across minibatches (one buffer per process,
:class:`FreeState`, saved in the checkpoint). Targeted: the weights still descend the loss of the
true label while ``delta`` descends the loss of a random wrong class drawn once per minibatch;
that needs a second (input-only) backward through the same graph. :func:`free_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from featdenoise.attacks.base import draw_targets
from featdenoise.models import model_num_classes
from featdenoise.runtime import distributed as dist
from featdenoise.runtime.modes import bf16_autocast
from featdenoise.training.config import Config
from featdenoise.training.parts import add_running_metrics, zero_nonfinite_grads
from featdenoise.training.recipes.base import Recipe
from featdenoise.training.step import State, StepContext, begin_step, check_finite


class FreeState:
    """The perturbation ``delta`` ``[N, C, H, W]`` that Free-AT carries from batch to batch
    (zeros at the start; the first ``len(x)`` rows serve a smaller batch)."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or len(self.delta) < len(x):
            self.delta = torch.zeros_like(x, memory_format=torch.contiguous_format)
        return self.delta[: len(x)].clone()

    def put(self, delta: torch.Tensor) -> None:
        if self.delta is None:
            raise ValueError("FreeState.put before take: no perturbation buffer yet")
        self.delta[: len(delta)] = delta.detach()

    def state_dict(self) -> list:
        """Every process's ``delta`` (CPU), in rank order (a collective: call on all ranks)."""
        mine = None if self.delta is None else self.delta.detach().cpu()
        return dist.all_gather_objects([mine])

    def load_state_dict(self, deltas: list, device) -> None:
        """This rank's buffer from :meth:`state_dict`'s list; a list written by another number
        of processes restarts from zeros."""
        if len(deltas) == dist.world_size() and deltas[dist.rank()] is not None:
            self.delta = deltas[dist.rank()].to(device)


def free_step(model: nn.Module, free: FreeState, x: torch.Tensor, y: torch.Tensor, state: State,
              ctx: StepContext, num_classes: int) -> None:
    """One minibatch of Free-AT: ``attack.replays`` SGD updates (module docstring).

    ``model``: what the update runs (DDP wrapper allowed); ``x`` ``[N, C, H, W]`` in [0, 1],
    ``y`` ``[N]``; ``num_classes``: the classes targets are drawn from. Running sums in
    ``state.sums`` count every replay.
    """
    cfg, device = ctx.cfg, ctx.device
    # Seed (targets) and learning rate of this step, as in the PGD recipe.
    begin_step(state, ctx)
    eps = cfg.attack.unit_sizes().eps
    targeted = cfg.attack.targeted
    target = draw_targets(y, num_classes) if targeted else None
    delta = free.take(x)
    model.train()
    for _ in range(cfg.attack.replays):
        # One forward on the perturbed batch, BN in training mode.
        delta.requires_grad_(True)
        with bf16_autocast(cfg.run.bf16, device):
            logits = model((x + delta).clamp(0, 1))
            loss = ctx.criterion(logits.float(), y)
        ctx.optimizer.zero_grad(set_to_none=True)
        if target is not None:
            # The perturbation walks towards the target: an input-only backward first.
            (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), target), delta,
                                       retain_graph=True)
            sign = -g.sign()
            loss.backward()
        else:
            # One backward: weight gradients and the input gradient together.
            loss.backward()
            sign = _grad(delta).sign()
        zero_nonfinite_grads(model, state, device)
        ctx.optimizer.step()
        with torch.no_grad():
            delta = (delta.detach() + eps * sign).clamp(-eps, eps)
        add_running_metrics(state.sums, loss, logits, y, target)
    free.put(delta)


def _grad(t: torch.Tensor) -> torch.Tensor:
    if t.grad is None:
        raise RuntimeError("Free-AT: the backward gave the perturbation no gradient")
    return t.grad


class FreeRecipe(Recipe):
    """``attack.mode: free``: :func:`free_step` with the carried :class:`FreeState`."""

    def __init__(self, num_classes: int):
        self.free, self.num_classes = FreeState(), num_classes

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, attack_net: nn.Module, val_set: Dataset,
              device: torch.device) -> Recipe:
        return cls(model_num_classes(model))

    def step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, state: State,
             ctx: StepContext) -> None:
        free_step(net, self.free, x, y, state, ctx, self.num_classes)
        check_finite(state, ctx.cfg)

    def state_dict(self) -> dict:
        return {"free_delta": self.free.state_dict()}  # a collective: every rank calls it

    def load_state_dict(self, extra: dict, device: torch.device) -> None:
        if "free_delta" in extra:
            self.free.load_state_dict(extra["free_delta"], device)
