"""Cheaper adversarial-training recipes: Free-AT and Fast-AT (``attack.mode: free | fast``).

- ``free`` (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019, Alg. 1): every
  minibatch is replayed ``m = attack.replays`` times. Each replay runs one forward on
  ``clip(x + delta, 0, 1)`` (BatchNorm in training mode) and one backward that gives both the
  weight gradient (SGD step) and the input gradient; ``delta <- clip(delta + eps sign(g), -eps,
  eps)``. ``delta`` is kept across replays *and* across minibatches (one buffer per process, saved
  in the checkpoint). Targeted: the weights still descend the loss of the true label while
  ``delta`` descends the loss of a random wrong class drawn once per minibatch; that needs a
  second (input-only) backward through the same graph. :func:`free_step`.
- ``fast`` (Wong, Rice, Kolter, "Fast is better than free", ICLR 2020, Alg. 3): FGSM of step
  ``attack.fgsm_step`` (default 1.25 eps) from a uniform random start in the eps-box, then the
  update on that batch (:class:`FastAttack`, used by the ordinary training step), the cyclic
  learning rate (``optim.schedule: cyclic``), and :class:`OverfitGuard`: PGD accuracy on a fixed
  held-out batch after every epoch; training stops and the best weights are kept when it falls
  more than ``attack.overfit_drop`` below the best (catastrophic overfitting, their Sec. 5.2).
  Unlike the paper, BatchNorm runs in inference mode during the FGSM step, as in every attack of
  this library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks import PGD
from featdenoise.attacks.base import draw_targets
from featdenoise.runtime import distributed as dist
from featdenoise.runtime.seeds import derive_seed
from featdenoise.training.recipe import add_running_metrics, autocast, zero_nonfinite_grads


class FastAttack:
    """FGSM from a uniform random start in the eps-box (Wong et al. 2020, Alg. 3).

    ``__call__(x, y) -> (x_adv, target, False)`` with ``x`` ``[N, C, H, W]`` in [0, 1]; ``eps`` and
    ``step`` on the [0, 1] scale (the paper's CIFAR-10 setting: 8/255 and 10/255). One PGD step
    with a random start and a fixed step (no ``max(step, eps / steps)`` rule).
    """

    def __init__(self, model: nn.Module, eps: float, step: float, targeted: bool = False,
                 exact: bool = False):
        self.pgd = PGD(model, eps=eps, step_size=step, steps=1, targeted=targeted,
                       random_start=True, step_rule="fixed", exact=exact)

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        x_adv = self.pgd(x, y).detach()
        return x_adv, self.pgd.last_target, False


class FreeState:
    """The perturbation ``delta`` ``[N, C, H, W]`` that Free-AT carries from batch to batch
    (zeros at the start; the first ``len(x)`` rows serve a smaller batch)."""

    def __init__(self):
        self.delta: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or len(self.delta) < len(x):
            self.delta = torch.zeros_like(x, memory_format=torch.contiguous_format)
        return self.delta[: len(x)].clone()

    def put(self, delta: torch.Tensor) -> None:
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


def free_step(model: nn.Module, free: FreeState, criterion, optimizer, schedule, x, y, state,
              cfg, device, num_classes: int) -> None:
    """One minibatch of Free-AT: ``cfg.attack.replays`` SGD updates (module docstring).

    ``model``: what the update runs (DDP wrapper allowed); ``x`` ``[N, C, H, W]`` in [0, 1],
    ``y`` ``[N]``. Running sums in ``state.sums`` count every replay.
    """
    # Randomness (targets) is a function of (seed, step, rank), as in the PGD recipe.
    torch.manual_seed(derive_seed(cfg.run.seed, "train-step", state.step, dist.rank()))
    schedule.apply(state.step)
    eps = cfg.attack.eps / 255
    targeted = cfg.attack.targeted
    target = draw_targets(y, num_classes) if targeted else None
    delta = free.take(x)
    model.train()
    for _ in range(cfg.attack.replays):
        # One forward on the perturbed batch, BN in training mode.
        delta.requires_grad_(True)
        with _autocast(cfg, device):
            logits = model((x + delta).clamp(0, 1))
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if targeted:
            # The perturbation walks towards the target: an input-only backward first.
            (g,) = torch.autograd.grad(F.cross_entropy(logits.float(), target), delta,
                                       retain_graph=True)
            step = -g.sign()
            loss.backward()
        else:
            # One backward: weight gradients and the input gradient together.
            loss.backward()
            step = delta.grad.sign()
        zero_nonfinite_grads(model, state, device)
        optimizer.step()
        with torch.no_grad():
            delta = (delta.detach() + eps * step).clamp(-eps, eps)
        add_running_metrics(state.sums, loss, logits, y, target)
    free.put(delta)


def _autocast(cfg, device):
    return autocast(cfg.run.bf16, device)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, epoch: int) -> float:
    """Accuracy (fraction) of ``model`` under untargeted PGD-``attack.check_steps`` (step
    ``attack.step_size``, random start seeded by the run seed and ``epoch``) on ``x`` ``[N, C, H,
    W]``; averaged over processes so every process takes the same decision."""
    a = cfg.attack
    torch.manual_seed(derive_seed(cfg.run.seed, "overfit-check", epoch))
    attack = PGD(model, eps=a.eps / 255, step_size=a.step_size / 255, steps=a.check_steps,
                 targeted=False, random_start=True, exact=cfg.run.compile, bf16=cfg.run.bf16)
    x_adv = attack(x, y)
    was = model.training
    model.eval()
    with torch.no_grad(), _autocast(cfg, x.device):
        acc = (model(x_adv).argmax(1) == y).float().mean().item()
    model.train(was)
    return dist.all_reduce_mean([acc], x.device)[0]


def check_batch(dataset, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images ``[n, C, H, W]`` and labels ``[n]`` of ``dataset`` (held out)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    x = torch.stack([torch.as_tensor(a) for a, _ in items]).to(device)
    y = torch.as_tensor([int(b) for _, b in items], dtype=torch.long, device=device)
    return x, y


class OverfitGuard:
    """Early stopping on catastrophic overfitting (Wong et al. 2020, Sec. 5.2).

    :meth:`update` takes the PGD accuracy after an epoch; it keeps a CPU copy of the weights with
    the best accuracy and returns True (stop) when the accuracy falls more than ``drop`` (a
    fraction, e.g. 0.2 = 20 points) below the best. State round-trips through the checkpoint.
    """

    def __init__(self, drop: float):
        self.drop = drop
        self.best_acc: float | None = None
        self.best_epoch = 0
        self.best_model: dict | None = None
        self.stopped = False

    def update(self, acc: float, epoch: int, model: nn.Module) -> bool:
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return False
        self.stopped = acc < self.best_acc - self.drop
        return self.stopped

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "best_model": self.best_model, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        self.best_model, self.stopped = state["best_model"], state["stopped"]
