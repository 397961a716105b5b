"""Fast-AT (``attack.mode: fast``; Wong, Rice, Kolter, "Fast is better than free", ICLR 2020,
Alg. 3).

FGSM of step ``attack.fgsm_step`` (default 1.25 eps) from a uniform random start in the eps-box,
then the update on that batch (:class:`FastAttack` in the PGD recipe's
:func:`~featdenoise.training.recipes.pgd.train_step`), the cyclic learning rate
(``optim.schedule: cyclic``), and :class:`OverfitGuard`: PGD accuracy on a fixed held-out batch
after every epoch; training stops and the best weights are kept when it falls more than
``attack.overfit_drop`` below the best (catastrophic overfitting, their Sec. 5.2). Unlike the
paper, BatchNorm runs in inference mode during the FGSM step, as in every attack of this library.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from featdenoise.attacks import PGD
from featdenoise.runtime import distributed as dist
from featdenoise.runtime.modes import bf16_autocast, eval_mode
from featdenoise.runtime.seeds import derive_seed
from featdenoise.training.config import Config
from featdenoise.training.metrics import MetricsLogger
from featdenoise.training.recipes.base import Recipe
from featdenoise.training.recipes.pgd import PGDRecipe


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


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config,
                 epoch: int) -> float:
    """Accuracy (fraction) of ``model`` under untargeted PGD-``attack.check_steps`` (step
    ``attack.step_size``, random start seeded by the run seed and ``epoch``) on ``x`` ``[N, C, H,
    W]``; averaged over processes so every process takes the same decision."""
    a, sizes = cfg.attack, cfg.attack.unit_sizes()
    torch.manual_seed(derive_seed(cfg.run.seed, "overfit-check", epoch))
    attack = PGD(model, eps=sizes.eps, step_size=sizes.step_size, steps=a.check_steps,
                 targeted=False, random_start=True, exact=cfg.run.compile, bf16=cfg.run.bf16)
    x_adv = attack(x, y)
    with eval_mode(model), torch.no_grad(), bf16_autocast(cfg.run.bf16, x.device):
        acc = (model(x_adv).argmax(1) == y).float().mean().item()
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


class FastRecipe(PGDRecipe):
    """``attack.mode: fast``: the PGD recipe's step with :class:`FastAttack`, and (when
    ``attack.overfit_drop > 0``) the :class:`OverfitGuard` check after every epoch on the first
    ``attack.check_images`` validation images."""

    def __init__(self, attack: FastAttack, cfg: Config,
                 check: tuple[torch.Tensor, torch.Tensor] | None):
        super().__init__(attack)
        self.cfg = cfg
        self.guard = OverfitGuard(cfg.attack.overfit_drop) if check is not None else None
        self.check = check  # the held-out batch (x, y) of the guard

    @classmethod
    def build(cls, cfg: Config, model: nn.Module, attack_net: nn.Module, val_set: Dataset,
              device: torch.device) -> Recipe:
        a, sizes = cfg.attack, cfg.attack.unit_sizes()
        attack = FastAttack(attack_net, sizes.eps, sizes.fgsm_step, a.targeted,
                            exact=cfg.run.compile)
        check = check_batch(val_set, a.check_images, device) if a.overfit_drop > 0 else None
        return cls(attack, cfg, check)

    @property
    def stopped(self) -> bool:
        return self.guard is not None and self.guard.stopped

    def end_epoch(self, model: nn.Module, epoch: int, logger: MetricsLogger, step: int) -> None:
        """The guard's check after epoch ``epoch``: PGD accuracy on the held-out batch; on a
        collapse the best weights go back into ``model`` and training stops (kept in the
        checkpoint)."""
        if self.guard is None or self.check is None:
            return
        guard = self.guard
        acc = pgd_accuracy(model, *self.check, self.cfg, epoch)
        stop = guard.update(acc, epoch, model)
        logger.log("overfit_check", step, epoch,
                   {"pgd_acc": acc, "best_pgd_acc": guard.best_acc,
                    "best_epoch": guard.best_epoch, "stopped": stop})
        if stop and guard.best_model is not None:
            model.load_state_dict(guard.best_model)
            if dist.is_main():
                a = self.cfg.attack
                tqdm.write(f"epoch {epoch}: PGD-{a.check_steps} accuracy {acc:.4f} on the check "
                           f"batch fell more than {a.overfit_drop:.2f} below the best "
                           f"{guard.best_acc:.4f} (epoch {guard.best_epoch}): catastrophic "
                           f"overfitting; stopped, keeping epoch {guard.best_epoch}'s weights")

    def state_dict(self) -> dict:
        return {"overfit_guard": self.guard.state_dict()} if self.guard is not None else {}

    def load_state_dict(self, extra: dict, device: torch.device) -> None:
        if self.guard is not None and "overfit_guard" in extra:
            self.guard.load_state_dict(extra["overfit_guard"])
