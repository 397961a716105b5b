"""FGSM, iterative FGSM (BIM) and momentum iterative FGSM: the other attackers of footnote 4.

The paper (footnote 4) also evaluates FGSM [Goodfellow et al.], iterative FGSM [Kurakin et al.]
and its momentum variant [Dong et al.] and finds PGD the strongest. All three share PGD's
conventions: [0, 1] RGB pixels, ``eps = 16 / 255`` is the paper's 16, targeted by default with
random wrong-class targets, eval mode during the attack, input-only gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from featdenoise.attacks.base import Attack
from featdenoise.attacks.options import AttackOptions
from featdenoise.attacks.pgd import PGD
from featdenoise.runtime.finite import finite_float

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only


class FGSM(Attack):
    """Fast gradient sign method: one step of size ``eps`` from the clean image.

    ``x_adv = clip(x + eps * sign(grad J(x)), [0, 1])`` with J the cross-entropy to the label
    (untargeted) or minus the cross-entropy to the target (targeted, the default).

    Args: see :class:`~featdenoise.attacks.base.Attack` (model, eps, targeted, seed, num_classes,
    bf16, channels_last, exact). ``attack(x, y, target=None) -> x_adv`` [N, C, H, W].
    """

    name = "fgsm"

    def _perturb(self, x: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        grad = self._objective_grad(x, labels)
        x_adv = x.clone().add_(grad.sign(), alpha=self.eps)
        return self.threat.project_(x_adv, lo, hi)


class IFGSM(PGD):
    """Iterative FGSM / basic iterative method (Kurakin et al.): PGD from the clean image.

    ``steps`` signed-gradient steps projected onto the eps-box after each, no random start, one
    run. The step follows ``step_rule`` as in :class:`~featdenoise.attacks.pgd.PGD` (``"paper"``:
    ``max(step_size, eps / steps)``, i.e. 1.6/255 for 10 steps of eps 16).

    Args: model, eps (default 16/255), step_size (1/255), steps (10), step_rule ("paper"), and
    the keywords of :class:`~featdenoise.attacks.options.AttackOptions` (targeted (True), seed,
    num_classes, bf16, channels_last, exact).
    """

    name = "ifgsm"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, step_size: float = 1 / 255,
                 steps: int = 10, *, step_rule: str = "paper", **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, step_size=step_size, steps=steps, random_start=False,
                         restarts=1, step_rule=step_rule, **options)


class MIFGSM(IFGSM):
    """Momentum iterative FGSM (Dong et al., CVPR 2018), from the clean image.

    ``g_k+1 = decay * g_k + grad_k / ||grad_k||_1`` (L1 norm per image), then
    ``x_k+1 = clip(x_k + step * sign(g_k+1), lo, hi)``; ``decay = 1.0`` as in Dong et al. The step
    follows ``step_rule`` (``"paper"`` gives Dong et al.'s ``eps / steps`` for the defaults).

    Args: as :class:`IFGSM`, plus ``decay`` (momentum factor mu, default 1.0).
    """

    name = "mifgsm"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, step_size: float = 1 / 255,
                 steps: int = 10, *, decay: float = 1.0, step_rule: str = "paper",
                 **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, step_size=step_size, steps=steps, step_rule=step_rule,
                         **options)
        decay = finite_float("decay", decay, " (Dong et al. use 1.0)")
        if decay < 0:
            raise ValueError(f"decay={decay} must be >= 0 (Dong et al. use 1.0)")
        self.decay = float(decay)

    def _iterate(self, x_adv: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        step = self.step
        momentum = torch.zeros_like(x_adv)
        for _ in range(self.steps):
            grad = self._objective_grad(x_adv, labels)
            l1 = grad.abs().flatten(1).sum(1).clamp_(min=1e-12)  # [N]
            grad = grad / l1.view(-1, *([1] * (grad.dim() - 1)))  # [N, 1, 1, 1] broadcast
            momentum.mul_(self.decay).add_(grad)
            x_adv = x_adv.detach()
            x_adv.add_(momentum.sign(), alpha=step)
            self.threat.project_(x_adv, lo, hi)
        return x_adv
