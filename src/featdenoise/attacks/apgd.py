"""Auto-PGD (APGD; Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, Sec. 3, Algorithm 1), L-infinity.

One run of ``N_iter`` iterations from a random point of the eps-box (``x + eps * u / |u|_inf``,
``u ~ U[-1, 1]``, clipped to [0, 1]), with ``P`` the projection onto the box ``[lo, hi]``
(:class:`~featdenoise.attacks.threat.LinfBall`)::

    eta   = 2 eps                                                    (per image)
    z     = P(x_k + eta * sign(grad f(x_k)))
    x_k+1 = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_k-1))      alpha = 0.75 (1 at k = 0)

The step size is halved at checkpoints ``w_j = ceil(p_j N_iter)``, ``p_0 = 0, p_1 = 0.22,
p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)`` (22, 41, 57, 70, 80, 87, 93, 99 for 100 iterations),
when either

1. the loss went up in at most ``rho = 0.75`` of the steps since the last checkpoint
   (``sum 1[f(x_i+1) > f(x_i)] <= rho (w_j - w_j-1)``; the paper writes ``<``, the authors' code
   ``<=``, which we follow), or
2. the step was not halved at the last checkpoint and the best loss has not improved since;

and then the walk restarts from the best point found so far (``x_k = x_max``, its gradient too).

Losses f (maximised; logits ``z`` sorted ``z_pi1 >= z_pi2 >= ...``):

- ``"ce"``: cross-entropy to the label;
- ``"dlr"`` (Sec. 4): ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` (needs K >= 3);
- targeted DLR (APGD-T, Sec. 4): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (K >= 4; with
  fewer classes the targeted cross-entropy ``-CE(z, t)`` is used instead).

An image counts as broken as soon as an iterate is misclassified; broken images leave the batch
(``early_stop``: the rest of the run is unchanged, since every image has its own step size and
checkpoint state, and the model runs in eval mode). The 'rand' version of AutoAttack averages the
gradient over ``eot_iter`` forward passes (expectation over transformation, for randomised
defences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks.base import count_arg
from featdenoise.attacks.options import AttackOptions
from featdenoise.attacks.outcome import OutcomeAttack
from featdenoise.runtime.finite import finite_float

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only

LOSSES = ("ce", "dlr")


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_j = ceil(p_j * steps)`` at which APGD may halve its step (Sec. 3.2)."""
    p = [0.0, 0.22]
    while p[-1] <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = {math.ceil(pj * steps - 1e-9) for pj in p[1:]}
    return sorted(w for w in points if 1 <= w <= steps)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted difference-of-logits-ratio loss ``[N]`` (Sec. 4); logits ``[N, K]``, K >= 3."""
    z = logits.sort(1).values  # ascending
    rows = torch.arange(len(y), device=logits.device)
    zy = logits[rows, y]
    other = torch.where(logits.argmax(1) == y, z[:, -2], z[:, -1])  # max_{i != y} z_i
    return -(zy - other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss ``[N]`` (Sec. 4), maximised to push ``z_t`` above ``z_y``; K >= 4."""
    z = logits.sort(1).values
    rows = torch.arange(len(y), device=logits.device)
    return -(logits[rows, y] - logits[rows, t]) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


@dataclass
class _Walk:
    """The state of one APGD run on ``n`` images (the first axis of every tensor is the image)."""

    x_k: torch.Tensor  # current iterate [n, C, H, W]
    x_prev: torch.Tensor  # previous iterate (the momentum term)
    grad: torch.Tensor  # loss gradient at x_k
    x_best: torch.Tensor  # highest-loss point so far ...
    grad_best: torch.Tensor  # ... its gradient
    loss_best: torch.Tensor  # ... and its loss [n]
    x_ret: torch.Tensor  # first misclassified iterate (of a broken image)
    broken: torch.Tensor  # [n] bool
    iteration: torch.Tensor  # [n] int64: iterate that broke the image, -1 if none
    history: torch.Tensor  # [steps + 1, n]: loss of x_0 .. x_steps
    eta: torch.Tensor  # [n] step size
    reduced_last: torch.Tensor  # [n] bool: the step was halved at the last checkpoint
    loss_best_last: torch.Tensor  # [n] best loss at the last checkpoint


class APGD(OutcomeAttack):
    """Untargeted APGD with the CE or DLR loss (Croce & Hein 2020, Algorithm 1; module docstring).

    Args:
        model: classifier on [0, 1] RGB ``[N, C, H, W]`` returning logits ``[N, K]``.
        eps: L-infinity budget on the [0, 1] scale (``16 / 255`` = the paper's 16; RobustBench
            ImageNet uses 4/255).
        steps: iterations per run (AutoAttack standard: 100).
        loss: ``"ce"`` or ``"dlr"``.
        restarts: runs from new random starts, each on the images still unbroken (standard: 1).
        rho: threshold of checkpoint condition 1 (0.75).
        eot_iter: forward/backward passes averaged per gradient (1; the 'rand' version: 20).
        early_stop: drop an image from the batch once it is broken (same result, less work).
        **options: seed, num_classes, bf16, channels_last, exact
            (:class:`~featdenoise.attacks.options.AttackOptions`; ``targeted`` is ignored).

    ``attack(x, y) -> x_adv`` ``[N, C, H, W]``; per-image results in ``last_broken``,
    ``last_iteration`` (0 = broken at the clean image or the random start), ``last_margin``
    (:mod:`featdenoise.attacks.outcome`).
    """

    name = "apgd"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, steps: int = 100,
                 loss: str = "ce", restarts: int = 1, rho: float = 0.75, eot_iter: int = 1,
                 early_stop: bool = True, **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, **options)
        self.steps = count_arg("steps", steps, hint=" (AutoAttack uses 100)")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; use one of {LOSSES}")
        self.restarts = count_arg("restarts", restarts)
        self.eot_iter = count_arg("eot_iter", eot_iter, hint=" (1, or 20 for 'rand')")
        rho = finite_float("rho", rho, " (the paper uses 0.75)")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho={rho} must be in (0, 1] (the paper uses 0.75)")
        self.loss = loss
        self.rho = float(rho)
        self.early_stop = bool(early_stop)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, steps={self.steps}, "
                f"loss={self.loss!r}, restarts={self.restarts}, eot_iter={self.eot_iter}, "
                f"seed={self.seed})")

    # ------------------------------------------------------------------------------ rule
    def _perturb(self, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        clean, broken, iteration, target_class = self._clean_outcome(x, y)
        n = len(x)
        x_ret, best_loss = x.clone(), torch.full((n,), -math.inf, device=x.device)
        for targets in self._target_runs(clean, y):
            for _ in range(self.restarts):
                idx = (~broken).nonzero()[:, 0]
                if len(idx) == 0:
                    break
                t = None if targets is None else targets[idx]
                adv, hit, its, loss = self._run(x[idx], y[idx], t, lo[idx], hi[idx])
                # Broken images take the adversarial point; unbroken ones the highest loss seen.
                keep = hit | (loss > best_loss[idx])
                x_ret[idx[keep]] = adv[keep]
                best_loss[idx] = torch.maximum(best_loss[idx], loss)
                broken[idx[hit]] = True
                iteration[idx[hit]] = its[hit]
                if t is not None:
                    target_class[idx[hit]] = t[hit]
        return self._finish(x_ret, y, iteration, target_class)

    def _target_runs(self, clean: torch.Tensor, y: torch.Tensor):
        """Targets of each run: ``[None]`` for the untargeted attack."""
        return [None]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor,
              t: torch.Tensor | None) -> torch.Tensor:
        """Per-image loss ``[N]`` the attack maximises."""
        if t is not None:
            if logits.shape[1] >= 4:
                return dlr_targeted_loss(logits, y, t)
            return -F.cross_entropy(logits, t, reduction="none")
        if self.loss == "dlr" and logits.shape[1] >= 3:
            return dlr_loss(logits, y)
        return F.cross_entropy(logits, y, reduction="none")

    def _loss_grad(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                   need_grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits [N, K], loss [N], grad [N, C, H, W])`` at ``x``; loss and gradient averaged
        over ``eot_iter`` passes (logits of the last). ``need_grad=False``: forward passes only,
        grad None."""
        logits, loss_sum, grad = self._one_pass(x, y, t, need_grad)
        for _ in range(self.eot_iter - 1):
            logits, loss, g = self._one_pass(x, y, t, need_grad)
            loss_sum = loss_sum + loss
            if grad is not None and g is not None:
                grad = grad + g
        if self.eot_iter > 1:
            loss_sum = loss_sum / self.eot_iter
            grad = None if grad is None else grad / self.eot_iter
        return logits, loss_sum, grad

    def _one_pass(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One pass of :meth:`_loss_grad`: ``(logits, loss, grad or None)``, all detached."""
        if not need_grad:
            logits = self._logits(x)
            return logits.detach(), self._loss(logits, y, t).detach(), None
        xr = x.detach().requires_grad_(True)
        logits = self._forward(xr).float()
        loss = self._loss(logits, y, t)
        grad = self._input_grad(loss.sum(), xr)
        return logits.detach(), loss.detach(), grad

    def _start(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``x + eps * u / max|u|`` with ``u ~ U[-1, 1]`` per pixel, projected onto ``[lo, hi]``."""
        u = torch.rand(x.shape, generator=self._generator(x.device), dtype=x.dtype,
                       device=x.device).mul_(2).sub_(1)
        scale = u.abs().reshape(len(x), -1).amax(1).clamp_min(1e-12)
        start = x + self.eps * u / scale.view(-1, *([1] * (x.dim() - 1)))
        return torch.minimum(torch.maximum(start, lo), hi)

    def _run(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, lo: torch.Tensor,
             hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run. Returns ``(x_ret, broken [n], iteration [n], best loss [n])``: x_ret is
        the first misclassified iterate of a broken image, else the highest-loss iterate."""
        n, steps = len(x), self.steps
        walk = self._begin(x, y, t, lo, hi)
        marks = checkpoints(steps)
        previous_mark = {w: p for w, p in zip(marks, [0, *marks[:-1]], strict=True)}
        idx = ((~walk.broken).nonzero()[:, 0] if self.early_stop
               else torch.arange(n, device=x.device))
        for i in range(steps):
            if len(idx) == 0:
                break
            x_new = self._step(walk, idx, i, lo, hi)
            # The gradient at the last iterate would never be used: forward passes only.
            logits, loss, g = self._loss_grad(x_new, y[idx], None if t is None else t[idx],
                                              need_grad=i < steps - 1)
            if g is not None:
                walk.grad[idx] = g
            walk.history[i + 1, idx] = loss
            wrong = self._settle(x_new, logits, y[idx]).argmax(1) != y[idx]
            self._note_broken(walk, idx, x_new, wrong, i + 1)
            self._note_best(walk, idx, x_new, loss, g)
            if i + 1 in previous_mark:
                self._checkpoint(walk, idx, i + 1, previous_mark[i + 1])
            if self.early_stop:
                idx = idx[~walk.broken[idx]]
        view = (-1, *([1] * (x.dim() - 1)))  # [n] -> [n, 1, 1, 1]
        x_ret = torch.where(walk.broken.view(view), walk.x_ret, walk.x_best)
        return x_ret, walk.broken, walk.iteration, walk.loss_best

    def _begin(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
               lo: torch.Tensor, hi: torch.Tensor) -> _Walk:
        """The walk at its random start ``x_0`` (its loss and gradient; step ``eta = 2 eps``)."""
        n = len(x)
        x_k = self._start(x, lo, hi)
        logits, loss, grad = self._loss_grad(x_k, y, t)
        assert grad is not None  # need_grad=True
        x_prev = x_k.clone()
        x_best, grad_best, loss_best = x_k.clone(), grad.clone(), loss.clone()
        x_ret = x_k.clone()
        broken = self._settle(x_k, logits, y).argmax(1) != y
        iteration = torch.where(broken, 0, -1).long()
        history = torch.zeros(self.steps + 1, n, device=x.device)  # loss of x_0 .. x_steps
        history[0] = loss
        eta = torch.full((n,), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        return _Walk(x_k=x_k, x_prev=x_prev, grad=grad, x_best=x_best, grad_best=grad_best,
                     loss_best=loss_best, x_ret=x_ret, broken=broken, iteration=iteration,
                     history=history, eta=eta, reduced_last=reduced_last,
                     loss_best_last=loss_best.clone())

    @staticmethod
    def _step(walk: _Walk, idx: torch.Tensor, i: int, lo: torch.Tensor,
              hi: torch.Tensor) -> torch.Tensor:
        """Iteration ``i`` on the images ``idx`` (module docstring): ``x_k+1 [m, C, H, W]``,
        also written into the walk (``x_prev`` takes ``x_k``)."""
        view = (-1, *([1] * (walk.x_k.dim() - 1)))  # [m] -> [m, 1, 1, 1]
        xa, ga = walk.x_k[idx], walk.grad[idx]
        la, ha = lo[idx], hi[idx]
        alpha = 0.75 if i > 0 else 1.0
        z = torch.minimum(torch.maximum(xa + walk.eta[idx].view(view) * ga.sign(), la), ha)
        x_new = xa + alpha * (z - xa) + (1 - alpha) * (xa - walk.x_prev[idx])
        x_new = torch.minimum(torch.maximum(x_new, la), ha)
        walk.x_prev[idx] = xa
        walk.x_k[idx] = x_new
        return x_new

    @staticmethod
    def _note_broken(walk: _Walk, idx: torch.Tensor, x_new: torch.Tensor, wrong: torch.Tensor,
                     iteration: int) -> None:
        """The first misclassified iterate (``wrong [m]``) breaks an image."""
        newly = wrong & ~walk.broken[idx]
        if newly.any():
            walk.x_ret[idx[newly]] = x_new[newly]
            walk.broken[idx[newly]] = True
            walk.iteration[idx[newly]] = iteration

    @staticmethod
    def _note_best(walk: _Walk, idx: torch.Tensor, x_new: torch.Tensor, loss: torch.Tensor,
                   grad: torch.Tensor | None) -> None:
        """Keep the highest-loss point so far (its gradient too, unless this was the last)."""
        better = loss > walk.loss_best[idx]
        if better.any():
            walk.x_best[idx[better]] = x_new[better]
            if grad is not None:
                walk.grad_best[idx[better]] = grad[better]
            walk.loss_best[idx[better]] = loss[better]

    def _checkpoint(self, walk: _Walk, idx: torch.Tensor, w: int, w_prev: int) -> None:
        """Checkpoint ``w`` (the last one ``w_prev``): halve the step where the loss stalls and
        go back to the best point (module docstring, conditions 1 and 2)."""
        h = walk.history[w_prev:w + 1, idx]  # [w - w_prev + 1, m]
        increases = (h[1:] > h[:-1]).sum(0)
        oscillating = increases <= self.rho * (w - w_prev)
        stalled = ~walk.reduced_last[idx] & (walk.loss_best_last[idx] >= walk.loss_best[idx])
        halve = oscillating | stalled
        walk.reduced_last[idx] = halve
        walk.loss_best_last[idx] = walk.loss_best[idx]
        if halve.any():
            sel = idx[halve]
            walk.eta[sel] /= 2
            walk.x_k[sel] = walk.x_best[sel]
            walk.grad[sel] = walk.grad_best[sel]


class APGDTOptions(AttackOptions, total=False):
    """:class:`APGDT`'s keywords besides its own: :class:`AttackOptions` and ``loss``
    (accepted and ignored: APGD-T's loss is the targeted DLR)."""

    loss: str


class APGDT(APGD):
    """APGD-T: targeted APGD on the targeted DLR loss, one run per target class (Sec. 4).

    The targets are the ``n_target_classes`` classes with the highest clean logits after the top
    one (for a correctly classified image: the most likely wrong classes), tried in that order,
    each on the images still unbroken. Success is misclassification (any class), as in AutoAttack.
    With fewer than 4 classes the targeted cross-entropy replaces the targeted DLR loss.

    Args:
        n_target_classes: 9 in AutoAttack's standard version; capped at ``K - 1``.
        Others: as :class:`APGD` (``loss`` is fixed: targeted DLR). ``last_target_class`` holds
            the target of the run that broke each image.
    """

    name = "apgd-t"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, steps: int = 100,
                 n_target_classes: int = 9, restarts: int = 1, rho: float = 0.75,
                 eot_iter: int = 1, early_stop: bool = True, **options: Unpack[APGDTOptions]):
        options["loss"] = "dlr"  # fixed: the targeted DLR loss (a ``loss`` given is ignored)
        super().__init__(model, eps=eps, steps=steps, restarts=restarts, rho=rho,
                         eot_iter=eot_iter, early_stop=early_stop, **options)
        self.n_target_classes = count_arg("n_target_classes", n_target_classes)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, steps={self.steps}, "
                f"n_target_classes={self.n_target_classes}, restarts={self.restarts}, "
                f"seed={self.seed})")

    def _target_runs(self, clean: torch.Tensor, y: torch.Tensor):
        order = clean.argsort(1, descending=True)  # [N, K]
        n_targets = min(self.n_target_classes, clean.shape[1] - 1)
        return [order[:, j] for j in range(1, n_targets + 1)]
