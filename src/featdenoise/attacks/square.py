"""Square Attack, L-infinity (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, Algorithm 1):
the score-based black-box member of AutoAttack. It uses no gradient, only the logits, so a model
that masks its gradients (Athalye et al., ICML 2018) does not stop it.

Loss: the margin ``m(x) = f_y(x) - max_{k != y} f_k(x)`` (minimised; the image is broken at
``m < 0``). Start: vertical stripes, every column of every channel set to ``x +- eps`` with a
random sign (Sec. 3.1). Each query changes one random square window of side
``s = round(sqrt(p * H * W))`` (at least 1, at most the image side): each channel of the window
goes to ``x + eps`` or ``x - eps`` (random sign per channel, clipped to [0, 1]); the change is
kept if it lowers the margin. ``p`` starts at ``p_init = 0.8`` and is halved after iterations
10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (the schedule for 10 000 queries; AutoAttack's
standard run keeps it for its 5000 queries, ``rescale_schedule=False``; ``True`` stretches it to
``n_queries``).

The window and signs are drawn per image (Sec. 3.1); every image that is still unbroken spends one
query per iteration; a broken image stops. A proposal that changes no pixel (the window already
holds those values) is counted but not sent through the model: it cannot lower the margin.
One query at the start, then ``n_queries`` iterations (as the authors' code counts them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from featdenoise.attacks.base import count_arg
from featdenoise.attacks.options import AttackOptions
from featdenoise.attacks.outcome import OutcomeAttack, margins
from featdenoise.runtime.finite import finite_float

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only

P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
              (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels ``p`` changed at iteration ``it`` (Sec. 3.1 schedule)."""
    if rescale:
        it = int(it / n_queries * 10000)
    divisor = 512
    for bound, div in P_SCHEDULE:
        if it <= bound:
            divisor = div
            break
    return p_init / divisor


class Square(OutcomeAttack):
    """Square Attack, L-infinity, untargeted, margin loss (module docstring).

    Args:
        model: classifier on [0, 1] RGB ``[N, C, H, W]`` returning logits ``[N, K]``.
        eps: L-infinity budget on the [0, 1] scale (``16 / 255`` = the paper's 16).
        n_queries: iterations per image after the start (AutoAttack standard: 5000).
        p_init: initial fraction of pixels per window (0.8).
        restarts: runs, each on the images still unbroken (standard: 1).
        rescale_schedule: stretch the p schedule to ``n_queries`` (AutoAttack: False).
        **options: seed, num_classes, bf16, channels_last, exact
            (:class:`~featdenoise.attacks.options.AttackOptions`; ``targeted`` is ignored).

    ``attack(x, y) -> x_adv``; ``last_iteration`` is the number of queries that broke the image
    (1 = the stripe start); other per-image results as in :mod:`featdenoise.attacks.outcome`.
    """

    name = "square"
    _skip_unchanged = True  # False: every proposal goes through the model (the tests' reference)

    def __init__(self, model: nn.Module, eps: float = 16 / 255, n_queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = False,
                 **options: Unpack[AttackOptions]):
        super().__init__(model, eps=eps, **options)
        self.n_queries = count_arg("n_queries", n_queries, minimum=0, hint=" (5000)")
        self.restarts = count_arg("restarts", restarts)
        p_init = finite_float("p_init", p_init, " (the paper uses 0.8)")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init={p_init} must be in (0, 1] (the paper uses 0.8)")
        self.p_init = float(p_init)
        self.rescale_schedule = bool(rescale_schedule)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, n_queries={self.n_queries}, "
                f"p_init={self.p_init}, restarts={self.restarts}, seed={self.seed})")

    @torch.no_grad()
    def _perturb(self, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Square Attack needs images [N, C, H, W], got {tuple(x.shape)}")
        clean, broken, iteration, no_target = self._clean_outcome(x, y)
        x_ret, best = x.clone(), margins(clean, y)
        for _ in range(self.restarts):
            idx = (~broken).nonzero()[:, 0]
            if len(idx) == 0:
                break
            adv, margin, queries = self._run(x[idx], y[idx], lo[idx], hi[idx])
            hit = margin < 0
            keep = hit | (margin < best[idx])
            x_ret[idx[keep]] = adv[keep]
            best[idx] = torch.minimum(best[idx], margin)
            broken[idx[hit]] = True
            iteration[idx[hit]] = queries[hit]
        return self._finish(x_ret, y, iteration, no_target)

    def _run(self, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """One run. Returns ``(x_best, margin [n], queries [n])``."""
        n, c, h, w = x.shape
        gen = self._generator(x.device)
        # Vertical stripes: one random sign per image, channel and column.
        stripes = torch.randint(0, 2, (n, c, 1, w), generator=gen, device=x.device).bool()
        x_best = torch.where(stripes, hi, lo)
        margin = self._margins(x_best, y)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        idx = (margin >= 0).nonzero()[:, 0]
        for i in range(self.n_queries):
            if len(idx) == 0:
                break
            m = len(idx)
            p = p_selection(self.p_init, i, self.n_queries, self.rescale_schedule)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
            top = torch.randint(0, h - s + 1, (m, 1), generator=gen, device=x.device)
            left = torch.randint(0, w - s + 1, (m, 1), generator=gen, device=x.device)
            signs = torch.randint(0, 2, (m, c, 1, 1), generator=gen, device=x.device).bool()
            in_rows = (rows >= top) & (rows < top + s)  # [m, h]
            in_cols = (cols >= left) & (cols < left + s)  # [m, w]
            window = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [m, 1, h, w]
            corner = torch.where(signs, hi[idx], lo[idx])  # x +- eps per channel, in [0, 1]
            current = x_best[idx]
            x_new = torch.where(window, corner, current)
            # A proposal the window already holds cannot lower the margin: no forward pass for
            # it (common on gray images and late, small windows); the query still counts.
            moved = (x_new != current).flatten(1).any(1)
            new_margin = margin[idx]  # a copy (indexing)
            if bool(moved.all()) or not self._skip_unchanged:
                new_margin = self._margins(x_new, y[idx])
            elif bool(moved.any()):
                sub = moved.nonzero()[:, 0]
                new_margin[sub] = self._margins(x_new[sub], y[idx[sub]])
            queries[idx] += 1
            better = new_margin < margin[idx]
            x_best[idx[better]] = x_new[better]
            margin[idx[better]] = new_margin[better]
            idx = idx[margin[idx] >= 0]
        return x_best, margin, queries
