"""Feature-denoising operations and the denoising block (paper Sec. 4, Fig. 4).

Every op maps NCHW features ``[N, C, H, W]`` to the same shape and is built as
``op_cls(channels, **kw)``; :func:`build_op` selects one by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OP_NAMES = (
    "nonlocal_gaussian",
    "nonlocal_dot",
    "bilateral_gaussian",
    "bilateral_dot",
    "mean",
    "median",
    "null",
)


class NonLocal(nn.Module):
    """Non-local means, Eq. (1): ``y_i = 1/C(x) * sum_j f(x_i, x_j) * x_j`` over all pixels j.

    ``softmax=True`` (Gaussian): ``f = exp(theta(x_i)^T phi(x_j) / sqrt(d))``, ``C = sum_j f``;
    with ``embed=True`` theta, phi are bias-free 1x1 convs to ``C/2`` channels, init N(0, 0.01).
    ``softmax=False`` (dot product): ``f = x_i^T x_j``, ``C = N`` (number of pixels j).
    ``subsample=True`` (Sec. 6.2): keys and values x_j are 2x2 max-pooled; queries x_i full size.
    """

    def __init__(self, channels: int, softmax: bool = True, embed: bool | None = None,
                 subsample: bool = False):
        super().__init__()
        self.softmax = softmax
        self.embed = softmax if embed is None else embed
        self.subsample = subsample
        if self.embed:
            self.theta = nn.Conv2d(channels, channels // 2, 1, bias=False)
            self.phi = nn.Conv2d(channels, channels // 2, 1, bias=False)
            nn.init.normal_(self.theta.weight, std=0.01)
            nn.init.normal_(self.phi.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta, phi, g = (self.theta(x), self.phi(x), x) if self.embed else (x, x, x)
        if self.subsample:
            phi, g = F.max_pool2d(phi, 2), F.max_pool2d(g, 2)
        q = theta.flatten(2)  # [N, d, HW]
        k = phi.flatten(2)  # [N, d, M]
        v = g.flatten(2)  # [N, C, M]
        f = torch.bmm(q.transpose(1, 2), k)  # [N, HW, M]
        if self.softmax:
            f = torch.softmax(f / math.sqrt(q.shape[1]), dim=-1)
        else:
            f = f / k.shape[2]
        y = torch.bmm(v, f.transpose(1, 2))  # [N, C, HW]
        return y.view(n, c, h, w)


class Bilateral(nn.Module):
    """Bilateral filter, Eq. (2): the non-local weighting restricted to a 3x3 neighbourhood."""

    def __init__(self, channels: int, softmax: bool = True, embed: bool | None = None):
        super().__init__()
        self.softmax = softmax
        self.embed = softmax if embed is None else embed
        if self.embed:
            self.theta = nn.Conv2d(channels, channels // 2, 1, bias=False)
            self.phi = nn.Conv2d(channels, channels // 2, 1, bias=False)
            nn.init.normal_(self.theta.weight, std=0.01)
            nn.init.normal_(self.phi.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta, phi = (self.theta(x), self.phi(x)) if self.embed else (x, x)
        d = theta.shape[1]
        # Border rule: only in-image neighbours count (zero padding is masked out).
        ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        valid = F.unfold(ones, 3, padding=1).view(1, 9, h * w)  # [1, 9, HW]
        k = F.unfold(phi, 3, padding=1).view(n, d, 9, h * w)  # [N, d, 9, HW]
        v = F.unfold(x, 3, padding=1).view(n, c, 9, h * w)  # [N, C, 9, HW]
        f = (theta.flatten(2).unsqueeze(2) * k).sum(1)  # [N, 9, HW]
        if self.softmax:
            f = (f / math.sqrt(d)).masked_fill(valid == 0, float("-inf")).softmax(1)
        else:
            f = f * valid / valid.sum(1, keepdim=True)
        y = (v * f.unsqueeze(1)).sum(2)  # [N, C, HW]
        return y.view(n, c, h, w)


class MeanFilter(nn.Module):
    """3x3 mean filter (average pooling, stride 1, same size)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, 1, self.kernel_size // 2,
                            count_include_pad=False)


class MedianFilter(nn.Module):
    """3x3 median per channel, same size; the gradient flows to the median element."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.kernel_size
        p = F.pad(x, [k // 2] * 4, mode="reflect")
        patches = p.unfold(2, k, 1).unfold(3, k, 1).reshape(n, c, h, w, k * k)
        return patches.median(dim=-1).values


class Identity(nn.Module):
    """``null``: no operation (Fig. 7)."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_op(name: str, channels: int, subsample: bool = False, embed: bool | None = None
             ) -> nn.Module:
    """Build the denoising operation called ``name`` (one of :data:`OP_NAMES`)."""
    if name == "nonlocal_gaussian":
        return NonLocal(channels, softmax=True, embed=embed, subsample=subsample)
    if name == "nonlocal_dot":
        return NonLocal(channels, softmax=False, embed=embed, subsample=subsample)
    if name == "bilateral_gaussian":
        return Bilateral(channels, softmax=True, embed=embed)
    if name == "bilateral_dot":
        return Bilateral(channels, softmax=False, embed=embed)
    if name == "mean":
        return MeanFilter(channels)
    if name == "median":
        return MedianFilter(channels)
    if name == "null":
        return Identity(channels)
    raise ValueError(f"unknown denoising op {name!r}; choose one of {', '.join(OP_NAMES)}")


class DenoisingBlock(nn.Module):
    """Denoising block of Fig. 4: ``y = x + BN(conv1x1(op(x)))``, BN gamma initialised to 0.

    Args:
        channels: C of the ``[N, C, H, W]`` input; the output has the same shape.
        op: a name from :data:`OP_NAMES`.
        use_conv: False drops the 1x1 conv (Table 1 ablation "without 1x1").
        residual: False drops the identity path (Table 1 ablation "without residual").
        subsample: 2x2 max-pool keys/values of non-local ops (Sec. 6.2).
    """

    def __init__(self, channels: int, op: str = "nonlocal_gaussian", use_conv: bool = True,
                 residual: bool = True, subsample: bool = False, embed: bool | None = None):
        super().__init__()
        self.op = build_op(op, channels, subsample=subsample, embed=embed)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False) if use_conv else nn.Identity()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        nn.init.zeros_(self.bn.weight)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.op(x)))
        return x + y if self.residual else y
