"""The L-infinity threat model of the paper (Sec. 6): where an attack may walk, not how it walks.

Pixels are float RGB in ``[0, 1]``, so ``eps = 16 / 255`` is the paper's epsilon 16 ("relative to
the pixel intensity scale of 256", Sec. 6). The feasible set around a clean image ``x`` is the
eps-box intersected with the valid pixel range::

    lo = max(x - eps, 0),  hi = min(x + eps, 1),  lo <= x_adv <= hi   (elementwise)

which is exactly the official ``adv_model.py`` rule (there on the [-1, 1] scale: bounds clipped to
[-1, 1] once, every step clipped to the bounds).
"""

from __future__ import annotations

import torch

from featdenoise.runtime.finite import finite_float


class LinfBall:
    """The eps-box around ``x`` intersected with ``[0, 1]`` (paper Sec. 5 and 6).

    Args:
        eps: L-infinity radius on the [0, 1] scale (``16 / 255`` is the paper's 16); 0 <= eps <= 1.
    """

    def __init__(self, eps: float):
        eps = finite_float("eps", eps, " (on the [0, 1] scale: 16/255 is the paper's 16)")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(
                f"eps={eps} is outside [0, 1]; pixels are on the [0, 1] scale, so pass e.g. 16/255"
            )
        self.eps = eps

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds ``(lo, hi)`` of the feasible set, each shaped like ``x`` [N, C, H, W]."""
        lo = (x - self.eps).clamp_(min=0.0)
        hi = (x + self.eps).clamp_(max=1.0)
        return lo, hi

    @staticmethod
    def project_(x_adv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto ``[lo, hi]`` IN PLACE (only called on attack-owned tensors)."""
        return x_adv.clamp_(lo, hi)

    def random_start(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniform random point of the eps-box, projected onto ``[0, 1]`` (Madry et al., Sec. 5).

        The noise is ``U[-eps, eps)`` per pixel, as in the official ``PGDAttacker``; unlike it, the
        start is clipped to [0, 1] before the first gradient (as torchattacks does), so every
        gradient is taken at a valid image. Returns a new tensor shaped (and laid out) like ``x``.
        """
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        start = x.clone().add_(noise.mul_(2.0 * self.eps).sub_(self.eps))
        return self.project_(start, lo, hi)
