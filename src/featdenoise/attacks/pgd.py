"""Projected gradient descent, the paper's white-box attacker and adversarial-training attacker.

Paper Sec. 5 (training: eps 16, step 1, 30 iterations, 20% of batches start from the clean image
and 80% from a random point of the eps-box) and Sec. 6.1 (evaluation: targeted, random start,
step 1 except 1.6 = eps/10 for 10 iterations, 10 to 2000 iterations). The official rule
(``adv_model.py`` ``PGDAttacker``), which this reproduces on the [0, 1] RGB scale::

    step  = max(step_size, eps / steps)                    # step_rule="paper"
    x_0   = x + U[-eps, eps)  (or x, see clean_start_prob)
    x_k+1 = clip(x_k - step * sign(grad CE(f(x_k), t)), lo, hi)   # targeted: descend to t
    x_k+1 = clip(x_k + step * sign(grad CE(f(x_k), y)), lo, hi)   # untargeted: ascend from y

with ``lo = max(x - eps, 0)``, ``hi = min(x + eps, 1)``
(:class:`~featdenoise.attacks.threat.LinfBall`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from featdenoise.attacks.base import Attack, count_arg
from featdenoise.attacks.options import AttackOptions
from featdenoise.runtime.finite import finite_float

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only

STEP_RULES = ("paper", "fixed")


class PGD(Attack):
    """L-infinity PGD (Madry et al.) with the paper's targeted setting (Sec. 5, 6.1).

    Args:
        model: classifier on [0, 1] RGB ``[N, C, H, W]`` returning logits ``[N, K]``.
        eps: budget on the [0, 1] scale; ``16 / 255`` is the paper's 16.
        step_size: on the [0, 1] scale; ``1 / 255`` is the paper's 1.
        steps: number of iterations (>= 0; 0 returns the start point).
        targeted: True (paper): random wrong-class target, descend its cross-entropy.
        random_start: start from a uniform point of the eps-box (paper Sec. 6.1, evaluation);
            False starts from the clean image.
        clean_start_prob: with ``random_start``, the probability that a whole batch starts from the
            clean image instead (one coin per batch and restart; training uses 0.2, Sec. 5).
        restarts: number of runs; per image the worst case is kept (untargeted: misclassified,
            else highest label loss; targeted: target hit, else lowest target loss).
        step_rule: ``"paper"`` uses ``max(step_size, eps / steps)`` like the official code (so 10
            steps of eps 16 use 1.6); ``"fixed"`` uses ``step_size`` as given.
        targeted, seed, num_classes, bf16, channels_last, exact (keywords,
            :class:`~featdenoise.attacks.options.AttackOptions`): see
            :class:`~featdenoise.attacks.base.Attack`.

    ``attack(x, y, target=None) -> x_adv``; :attr:`last_target` holds the targets used and
    :attr:`last_clean_starts` which restarts began at the clean image.
    """

    name = "pgd"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, step_size: float = 1 / 255,
                 steps: int = 10, *, random_start: bool = True, clean_start_prob: float = 0.0,
                 restarts: int = 1, step_rule: str = "paper", **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, **options)
        count_arg("steps", steps, minimum=0)
        step_size = finite_float("step_size", step_size, " (on the [0, 1] scale: 1/255)")
        clean_start_prob = finite_float("clean_start_prob", clean_start_prob, " (in [0, 1])")
        if not step_size > 0:
            raise ValueError(f"step_size={step_size} must be > 0 (on the [0, 1] scale: 1/255)")
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule={step_rule!r} is unknown; use one of {STEP_RULES}")
        if not 0.0 <= clean_start_prob <= 1.0:
            raise ValueError(f"clean_start_prob={clean_start_prob} must be in [0, 1]")
        count_arg("restarts", restarts)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.clean_start_prob = float(clean_start_prob)
        self.restarts = int(restarts)
        self.step_rule = step_rule
        self.last_clean_starts: list[bool] = []

    @property
    def step(self) -> float:
        """The step actually taken, on the [0, 1] scale (``step_rule`` applied)."""
        if self.step_rule == "paper" and self.steps > 0:
            return max(self.step_size, self.eps / self.steps)
        return self.step_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, step={self.step * 255:g}/255, "
                f"steps={self.steps}, targeted={self.targeted}, random_start={self.random_start}, "
                f"clean_start_prob={self.clean_start_prob}, restarts={self.restarts}, "
                f"seed={self.seed})")

    # ------------------------------------------------------------------------------ rule
    def _perturb(self, x: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        self.last_clean_starts = []
        best = self._iterate(self._start(x, lo, hi), labels, lo, hi)
        if self.restarts == 1:
            return best
        best_success, best_objective = self._score(best, labels)
        for _ in range(self.restarts - 1):
            x_adv = self._iterate(self._start(x, lo, hi), labels, lo, hi)
            success, objective = self._score(x_adv, labels)
            # Lexicographic (success, objective): a restart can only make an image worse for
            # the defender, never better.
            better = (success & ~best_success) | ((success == best_success)
                                                  & (objective > best_objective))
            mask = better.view(-1, *([1] * (x.dim() - 1)))  # [N, 1, 1, 1]
            best = torch.where(mask, x_adv, best)
            best_success = best_success | success
            best_objective = torch.where(better, objective, best_objective)
        return best

    def _start(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Start point: a random point of the box, or (coin with ``clean_start_prob``) ``x``."""
        clean = not self.random_start
        if self.random_start and self.clean_start_prob > 0:
            gen = self._generator(x.device)
            coin = torch.rand((), generator=gen, device=x.device)
            clean = bool(coin < self.clean_start_prob)
        self.last_clean_starts.append(clean)
        if clean:
            return x.clone()
        return self.threat.random_start(x, lo, hi, self._generator(x.device))

    def _iterate(self, x_adv: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        """``steps`` signed-gradient steps from ``x_adv`` (attack-owned, updated in place)."""
        step = self.step
        for _ in range(self.steps):
            grad = self._objective_grad(x_adv, labels)
            x_adv = x_adv.detach()
            x_adv.add_(self._direction(grad), alpha=step)
            self.threat.project_(x_adv, lo, hi)
        return x_adv

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Ascent direction from the objective's gradient: its sign (L-infinity steepest ascent)."""
        return grad.sign()  # not in place: autograd may hand back an expanded view
