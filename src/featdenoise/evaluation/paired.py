"""Paired comparisons of two attacks (or two arithmetics of one attack) on the same images.

Two attacks run on the same N images leave each image robust or broken. Counting robust images
on each side and comparing the totals throws away the pairing; here the images where the two
disagree decide:

- ``b``: robust against A, broken by B (A missed what B found);
- ``c``: broken by A, robust against B.

If A and B are equally strong, each disagreement is a fair coin, so "A is weaker than B" is
tested by the one-sided sign test ``P(Bin(b + c, 1/2) >= b)`` (:func:`sign_test`). Across
several independent runs (models, seeds, CPU kernel sets), the per-run differences
``robust_A - robust_B`` give a mean and a Student-t interval (:func:`mean_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Two-sided 95% quantiles of Student's t (0.975 one-sided) for df = 1..30, then 40, 60, 120.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_T975_TAIL = ((40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))


def discordant(robust_a, robust_b) -> tuple[int, int]:
    """``(b, c)``: images robust against A but not B, and the reverse.

    Args:
        robust_a, robust_b: per-image robust flags ``[N]`` (bool tensors or sequences), the
            same images in the same order.
    """
    a = torch.as_tensor(robust_a, dtype=torch.bool)
    b = torch.as_tensor(robust_b, dtype=torch.bool)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"robust flags must be two [N] vectors of one length, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return int((a & ~b).sum()), int((~a & b).sum())


def sign_test(b: int, c: int) -> float:
    """One-sided p-value that A is weaker than B: ``P(X >= b)``, ``X ~ Bin(b + c, 1/2)``.

    1.0 when the two never disagree. A small value (below 0.01, say) says A leaves more
    images robust than chance disagreement explains.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2.0 ** n


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df >= 1`` degrees of freedom (table; linear in
    ``1 / df`` between the tabulated 30, 40, 60, 120 and infinity)."""
    if df < 1:
        raise ValueError(f"df={df}: need at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    lo_df: float = len(_T975)
    lo_t = _T975[-1]
    for hi_df, hi_t in _T975_TAIL:
        if df <= hi_df:
            span = 1 / lo_df - (0.0 if math.isinf(hi_df) else 1 / hi_df)
            w = (1 / lo_df - 1 / df) / span
            return lo_t + w * (hi_t - lo_t)
        lo_df, lo_t = hi_df, hi_t
    return 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its two-sided 95% Student-t interval
    (the values are taken as independent draws; one value gives an infinite interval)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half
