"""FAB-T: the targeted fast adaptive boundary attack, L-infinity (Croce & Hein, "Minimally distorted
adversarial examples with a fast adaptive boundary attack", ICML 2020, Sec. 3; its targeted
version is the one of AutoAttack, Croce & Hein ICML 2020b, Sec. 4).

For a target class t, FAB linearises the decision boundary ``g(z) = f_t(z) - f_y(z) = 0`` at the
current iterate ``x_k`` (``w = grad g(x_k)``: one backward pass, not the whole Jacobian, since only
one logit difference matters) and projects onto that hyperplane, within the box [0, 1], in the
L-infinity norm::

    d_1 = proj(x_k),  d_2 = proj(x_orig)                 (minimal |d|_inf with w.(p + d) = b)
    a   = min(|d_1| / (|d_1| + |d_2|), alpha_max)        alpha_max = 0.1
    x_k+1 = clip((x_k + eta d_1)(1 - a) + (x_orig + eta d_2) a, 0, 1)      eta = 1.05

and, when ``x_k+1`` is misclassified, records it if it is the closest such point so far and steps
back towards the original, ``x_k+1 = x_orig + beta (x_k+1 - x_orig)`` (beta = 0.9). The projection
(the paper's Sec. 3.1 problem, solved here by sorting the per-pixel room ``cap_i`` left in the box):
``|w|.min(r, cap)`` grows piecewise linearly in the radius r, so the smallest r that reaches the
hyperplane is found on the sorted breakpoints with cumulative sums.

FAB minimises the distortion; AutoAttack counts an image as broken when a misclassified point
within ``eps`` is found, so here an image leaves the batch as soon as it has one (``early_stop``).
Targets: the classes with the 2nd, 3rd, ... highest clean logit, one run of ``steps`` iterations
each (standard: 9 targets x 100 iterations, no restarts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from featdenoise.attacks.base import count_arg
from featdenoise.attacks.options import AttackOptions
from featdenoise.attacks.outcome import OutcomeAttack
from featdenoise.runtime.finite import finite_float

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only


def project_linf(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest L-infinity step onto a hyperplane, inside the box [0, 1].

    Args:
        points: ``[M, D]`` points ``p`` in [0, 1].
        w: ``[M, D]`` hyperplane normals; b: ``[M]`` offsets (hyperplane ``w . z = b``).
    Returns:
        ``d [M, D]`` with ``w . (p + d) = b``, ``0 <= p + d <= 1`` and ``|d|_inf`` minimal; where
        the box does not reach the hyperplane, the step that comes closest (every pixel moved to
        its bound on the side that helps). Zero where ``w == 0``.
    """
    need = b - (w * points).sum(1)  # change of w . z needed
    sign = torch.where(need >= 0, 1.0, -1.0).to(w.dtype)
    wp = w * sign[:, None]  # now wp . d must rise by |need|
    cap = torch.where(wp > 0, 1 - points, torch.where(wp < 0, points, torch.zeros_like(points)))
    weight = wp.abs()
    caps, order = cap.sort(1)  # ascending breakpoints of the piecewise-linear g(r)
    wsorted = weight.gather(1, order)
    area = (wsorted * caps).cumsum(1)  # sum_{j <= k} |w_j| cap_j
    mass = wsorted.cumsum(1)  # sum_{j <= k} |w_j|
    total = mass[:, -1:]
    reach = area + caps * (total - mass)  # g(cap_k) = |w| . min(cap_k, cap)
    target = need.abs()[:, None]
    k = (reach < target).sum(1, keepdim=True)  # first breakpoint at or beyond the hyperplane
    last = caps.shape[1] - 1
    kc = k.clamp(max=last)
    prev = (kc - 1).clamp(min=0)
    area_prev = torch.where(kc > 0, area.gather(1, prev), torch.zeros_like(target))
    mass_prev = torch.where(kc > 0, mass.gather(1, prev), torch.zeros_like(target))
    slope = total - mass_prev
    radius = torch.where(slope > 0, (target - area_prev) / slope.clamp_min(1e-30),
                         torch.zeros_like(target))
    radius = torch.where(k > last, caps[:, -1:], radius)  # unreachable: go all the way
    return torch.sign(wp) * torch.minimum(radius, cap)


class FAB(OutcomeAttack):
    """FAB-T, targeted, L-infinity (module docstring; ICML 2020 FAB paper, Algorithm 1).

    Args:
        model: classifier on [0, 1] RGB ``[N, C, H, W]`` returning logits ``[N, K]``.
        eps: L-infinity budget on the [0, 1] scale (``16 / 255`` = the paper's 16).
        steps: iterations per target (standard: 100).
        n_target_classes: targets tried, the most likely wrong classes first (9; capped at K-1).
        restarts: runs per target; the first starts at the clean image, later ones at a random
            point at half eps (standard: 1).
        alpha_max, eta, beta: the paper's 0.1, 1.05, 0.9.
        early_stop: drop an image once a misclassified point within eps is found.
        **options: seed, num_classes, bf16, channels_last, exact
            (:class:`~featdenoise.attacks.options.AttackOptions`; ``targeted`` is ignored).

    ``attack(x, y) -> x_adv``: the adversarial point within eps where found, else ``x``;
    per-image results as in :mod:`featdenoise.attacks.outcome`.
    """

    name = "fab-t"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, steps: int = 100,
                 n_target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, early_stop: bool = True,
                 **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, **options)
        self.steps = count_arg("steps", steps)
        self.n_target_classes = count_arg("n_target_classes", n_target_classes)
        self.restarts = count_arg("restarts", restarts)
        alpha_max, eta, beta = (finite_float(k, v, " (the paper: 0.1, 1.05, 0.9)") for k, v in
                                (("alpha_max", alpha_max), ("eta", eta), ("beta", beta)))
        if not 0.0 <= alpha_max <= 1.0 or not eta > 0 or not 0.0 < beta <= 1.0:
            raise ValueError(f"alpha_max={alpha_max}, eta={eta}, beta={beta}: need alpha_max in "
                             "[0, 1], eta > 0, beta in (0, 1] (the paper: 0.1, 1.05, 0.9)")
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.early_stop = bool(early_stop)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, steps={self.steps}, "
                f"n_target_classes={self.n_target_classes}, restarts={self.restarts}, "
                f"seed={self.seed})")

    # ------------------------------------------------------------------------------ rule
    def _perturb(self, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        clean, broken, iteration, target_class = self._clean_outcome(x, y)
        x_ret = x.clone()
        order = clean.argsort(1, descending=True)  # [N, K]
        for j in range(1, min(self.n_target_classes, clean.shape[1] - 1) + 1):
            for restart in range(self.restarts):
                idx = (~broken).nonzero()[:, 0]
                if len(idx) == 0:
                    break
                t = order[idx, j]
                adv, hit, its = self._run(x[idx], y[idx], t, random_start=restart > 0)
                sel = idx[hit]
                x_ret[sel] = torch.minimum(torch.maximum(adv[hit], lo[sel]), hi[sel])
                broken[sel] = True
                iteration[sel] = its[hit]
                target_class[sel] = t[hit]
        return self._finish(x_ret, y, iteration, target_class)

    def _diff_grad(self, x: torch.Tensor, y: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [n, K], g = f_t - f_y [n], grad g [n, C, H, W])`` at ``x``."""
        xr = x.detach().requires_grad_(True)
        logits = self._forward(xr).float()
        rows = torch.arange(len(y), device=x.device)
        diff = logits[rows, t] - logits[rows, y]
        grad = self._input_grad(diff.sum(), xr)
        return logits.detach(), diff.detach(), grad

    def _run(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
             random_start: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One FAB run towards targets ``t``. Returns ``(adv, found [n], iteration [n])``: the
        closest misclassified point (within eps where found)."""
        n = len(x0)
        flat = x0.reshape(n, -1)  # [n, D]
        x1 = self._start(x0) if random_start else x0.clone()
        _, f, g = self._diff_grad(x1, y, t)
        adv = x0.clone()
        best = torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
        found = torch.zeros(n, dtype=torch.bool, device=x0.device)
        iteration = torch.full((n,), -1, dtype=torch.long, device=x0.device)
        idx = torch.arange(n, device=x0.device)
        eager = True
        for i in range(self.steps):
            if len(idx) == 0:
                break
            m = len(idx)
            x_new = self._propose(x1[idx], f[idx], g[idx], flat[idx])
            # The next linearisation point is x_new, or the back-step point where x_new is
            # misclassified. While few are, take the gradient at x_new in the same pass that
            # classifies it and redo only the back-stepped ones; otherwise classify first (a
            # forward pass) and take every gradient after the back-step (the authors' order).
            last = i == self.steps - 1  # no gradient is needed after the last step
            if eager and not last:
                logits, f[idx], g[idx] = self._diff_grad(x_new, y[idx], t[idx])
            else:
                logits = self._logits(x_new)
            x1[idx] = x_new
            logits = self._settle(x_new, logits, y[idx])
            is_adv = logits.argmax(1) != y[idx]
            dist = (x_new - x0[idx]).reshape(m, -1).abs().amax(1)
            closer = is_adv & (dist < best[idx])
            adv[idx[closer]] = x_new[closer]
            best[idx[closer]] = dist[closer]
            done = closer & (dist <= self.eps) & ~found[idx]
            found[idx[done]] = True
            iteration[idx[done]] = i + 1
            if self.early_stop:
                keep = ~found[idx]
                idx, is_adv = idx[keep], is_adv[keep]
            # Step back towards the original from a misclassified point.
            back = idx[is_adv]
            if len(back):
                x1[back] = x0[back] + self.beta * (x1[back] - x0[back])
            if last:
                break
            if eager and len(back):
                _, f[back], g[back] = self._diff_grad(x1[back], y[back], t[back])
            elif not eager and len(idx):
                _, f[idx], g[idx] = self._diff_grad(x1[idx], y[idx], t[idx])
            eager = bool(len(idx)) and 3 * len(back) < len(idx)  # cost 3 + 3a vs 4 forwards
        return adv, found, iteration

    def _start(self, x0: torch.Tensor) -> torch.Tensor:
        """A later restart's start: ``x0 + eps/2 * u / max|u|``, ``u ~ U[-1, 1]`` per pixel,
        clipped to [0, 1]."""
        u = torch.rand(x0.shape, generator=self._generator(x0.device), dtype=x0.dtype,
                       device=x0.device).mul_(2).sub_(1)
        scale = u.reshape(len(x0), -1).abs().amax(1).clamp_min(1e-12).view(
            -1, *[1] * (x0.dim() - 1))  # [m, 1, 1, 1]
        return (x0 + 0.5 * self.eps * u / scale).clamp(0, 1)

    def _propose(self, x1: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                 origin: torch.Tensor) -> torch.Tensor:
        """The next iterate ``[m, C, H, W]`` from ``x1 [m, C, H, W]`` (module docstring): the
        boundary linearised there (``f [m]``, ``grad g [m, C, H, W]``), projected from ``x1``
        and from the original ``origin [m, D]``, the two steps mixed by ``a``."""
        m = len(x1)
        xa = x1.reshape(m, -1)  # [m, D]
        w = g.reshape(m, -1)
        b = (w * xa).sum(1) - f  # hyperplane of the linearised g = 0: w . z = b
        d = project_linf(torch.cat((xa, origin)), torch.cat((w, w)), torch.cat((b, b)))
        d1, d2 = d[:m], d[m:]
        a0 = d.abs().amax(1).clamp_min(1e-8)
        a1, a2 = a0[:m], a0[m:]
        alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
        x_new = ((xa + self.eta * d1) * (1 - alpha)
                 + (origin + self.eta * d2) * alpha).clamp(0, 1)
        return x_new.reshape(x1.shape)
