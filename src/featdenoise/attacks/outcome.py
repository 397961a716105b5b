"""What AutoAttack's attacks report per image, on top of :class:`~featdenoise.attacks.base.Attack`.

APGD, FAB-T and Square (Croce & Hein, ICML 2020; Andriushchenko et al., ECCV 2020) are
*untargeted in outcome*: an image counts as broken when the model misclassifies it, whatever class
it lands on (APGD-T and FAB-T only use target classes as a search direction). Each of them, after
``attack(x, y)``, leaves per-image results for an evaluation to store:

- :attr:`OutcomeAttack.last_broken` ``[N]`` bool: ``argmax f(x_adv) != y``;
- :attr:`OutcomeAttack.last_iteration` ``[N]`` int64: the iteration (APGD, FAB) or query (Square)
  at which the image was first broken, counted from 1 within the run that broke it; -1 if unbroken;
- :attr:`OutcomeAttack.last_target_class` ``[N]`` int64: the target class of the run that broke it
  (APGD-T, FAB-T), -1 otherwise;
- :attr:`OutcomeAttack.last_margin` ``[N]`` float: ``f_y(x_adv) - max_{k != y} f_k(x_adv)`` on the
  returned image (< 0 iff broken).

The returned image of a broken image is the adversarial point found; of an unbroken one, the point
of highest loss (APGD), of lowest margin (Square) or the clean image (FAB-T).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from featdenoise import accel
from featdenoise.accel.layer import fold_tolerance
from featdenoise.attacks.base import Attack
from featdenoise.attacks.options import AttackOptions
from featdenoise.runtime.backends import tf32_enabled

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{k != y} z_k`` per row of ``logits [N, K]`` (float32 ``[N]``); < 0 iff wrong
    (up to ties)."""
    logits = logits.float()
    rows = torch.arange(len(y), device=logits.device)
    true = logits[rows, y]
    other = logits.clone()
    other[rows, y] = -float("inf")
    return true - other.amax(1)


class OutcomeAttack(Attack):
    """An untargeted-in-outcome attack with per-image results (module docstring).

    Subclasses implement ``_perturb(x, y, lo, hi)`` (``y`` are the true labels) and end it with
    ``return self._finish(x_adv, y, iteration, target_class)``.

    Args:
        model, eps: see :class:`~featdenoise.attacks.base.Attack`.
        **options: :class:`~featdenoise.attacks.options.AttackOptions` (seed, num_classes,
            bf16, channels_last, exact), passed to the base; ``targeted`` is accepted and
            ignored.
    """

    def __init__(self, model: nn.Module, eps: float = 16 / 255,
                 **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, **options)
        self.targeted = False  # whatever was passed: the outcome is always "misclassified"
        self.last_broken: torch.Tensor | None = None
        self.last_iteration: torch.Tensor | None = None
        self.last_target_class: torch.Tensor | None = None
        self.last_margin: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps * 255:g}/255, seed={self.seed})"

    # ------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` float32 of ``x`` without a graph (checked as every pass is)."""
        return self._forward(x).float()

    def _settle(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``logits [n, K]`` of ``x``, with the rows the speed layer's rounding could decide
        recomputed by PyTorch's own forward.

        FAB lands on the decision boundary by construction (and APGD and Square can stop just
        past it), so the first point an attack sees as misclassified may be so only by float
        rounding: were that rounding the speed layer's, an evaluator's own forward would see the
        same point correctly classified, and the attack would be weaker than with
        ``exact=True``. Rows whose margin is within the folding check's bound
        (``1e-4`` of the largest logit, :func:`featdenoise.accel.layer.fold_tolerance`) are
        therefore decided by the exact forward; with ``exact=True`` nothing changes.
        """
        if self.exact or len(logits) == 0:
            return logits
        tf32 = x.device.type == "cuda" and any(tf32_enabled().values())
        tol = fold_tolerance(x.device.type, tf32) * float(logits.abs().amax()) + 1e-6
        near = (margins(logits, y).abs() <= tol).nonzero()[:, 0]
        if len(near) == 0:
            return logits
        logits = logits.clone()
        with accel.inference_grad(self.model, enabled=False):
            logits[near] = self._logits(x[near].detach())
        return logits

    def _margins(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:func:`margins` ``[n]`` of ``x`` (no graph), near-boundary rows settled exactly."""
        return margins(self._settle(x, self._logits(x), y), y)

    def _clean_outcome(self, x: torch.Tensor, y: torch.Tensor):
        """Where every run starts: ``(clean logits [N, K], broken [N] bool, iteration [N] int64,
        target_class [N] int64)``; an image misclassified clean is broken at iteration 0."""
        clean = self._settle(x, self._logits(x), y)
        broken = clean.argmax(1) != y
        return clean, broken, torch.where(broken, 0, -1).long(), torch.full_like(y, -1)

    def _finish(self, x_adv: torch.Tensor, y: torch.Tensor, iteration: torch.Tensor,
                target_class: torch.Tensor) -> torch.Tensor:
        """Record the per-image results on the returned images (one forward pass) and return
        them. ``iteration`` / ``target_class`` ``[N]`` int64 are kept only where broken."""
        logits = (self._settle(x_adv, self._logits(x_adv), y) if len(x_adv)
                  else torch.zeros(0, 2, device=x_adv.device))
        margin = margins(logits, y)
        broken = logits.argmax(1) != y
        self.last_broken = broken
        self.last_margin = margin
        self.last_iteration = torch.where(broken, iteration, torch.full_like(iteration, -1))
        self.last_target_class = torch.where(broken, target_class,
                                             torch.full_like(target_class, -1))
        return x_adv
