"""Feature-denoising operations and the denoising block (paper Sec. 4, Figs. 4-5, Table 1).

Every op maps NCHW features ``[N, C, H, W]`` to the same shape and is built as
``op_cls(channels, **kw)``; :func:`build_op` selects one by name (:data:`OP_NAMES`) and
:class:`DenoisingBlock` wraps one into ``y = x + BN(conv1x1(op(x)))``.

Decisions the paper leaves open, and how they follow the authors' code (``resnet_model.py``,
``non_local_op`` / ``denoising``) or are ours:

* Gaussian non-local: ``f = exp(theta(x_i)^T phi(x_j) / sqrt(d))`` with ``d = C/2``, the number
  of embedding channels (official ``tf.sqrt(theta.shape[1])``); theta, phi are bias-free 1x1 convs
  initialised N(0, 0.01); the weighted mean is over ``x_j`` itself.
* Dot-product non-local: ``f = x_i^T x_j``, ``C(x) = M``, the number of pixels ``j`` summed over
  (``H*W``; with sub-sampling the number of pooled pixels, so the output stays a mean over the
  set of ``j``). When ``C <= H*W`` the official association ``(phi g^T) theta`` is used: a
  ``C x C`` matrix instead of ``HW x HW`` (cost ``HW*C^2`` rather than ``(HW)^2*C``).
* Sub-sampling (Sec. 6.2, ``subsample=True``, the paper's "R-152 +all denoise"): the feature
  map of ``x_j`` is 2x2 max-pooled with stride 2 and queries ``x_i`` stay full size. The pooling
  comes *before* the embedding: ``x^ = maxpool(x)``, keys ``phi(x^_j)``, values ``x^_j``. This is
  the formula of the non-local networks paper the text cites (Wang et al., CVPR 2018, Sec. 3.3:
  ``y_i = 1/C(x^) sum_j f(x_i, x^_j) g(x^_j)`` with ``x^`` a pooled version of ``x``) and what
  its released code does (the block input is max-pooled, then the phi and g 1x1 convs run on
  it); that paper's sentence "a max pooling layer after phi and g" differs only in the order of
  the pooling and the linear phi, and the feature-denoising text pools "the feature map of x_j".
  Pooling is "VALID" (no padding, floor), as both codes' pooling layers do by default: an odd
  size drops its last row/column (7x7 res5 maps give 3x3 keys); a dimension of size 1 is not
  pooled (kernel 1 there) so tiny maps still have a key.
* Bilateral (Eq. 2) border rule: only in-image neighbours belong to ``Omega(i)``; the Gaussian
  version takes its softmax over those, the dot version divides by ``|Omega(i)|`` (4, 6 or 9).
* Mean: 3x3 average with stride 1 that counts in-image pixels only (``count_include_pad=False``,
  TensorFlow's "SAME" average pooling, which tensorpack ``AvgPooling`` uses).
* Median: 3x3 per channel with replicate ("nearest") padding (OpenCV ``medianBlur``'s border;
  every window has 9 real values, so the median is always one of them); the gradient goes to
  exactly one input element per output, the one whose value is the median.

Speed and memory: the Gaussian non-local never materialises an ``[N, HW, HW]`` score tensor
bigger than 32 MiB; its softmax and the autograd kernels of the other ops live in modules of
their own. :mod:`featdenoise.models.attention`: PyTorch's fused ``scaled_dot_product_attention``
or a chunked, flash-attention-style softmax whose backward recomputes each chunk (on CUDA only
the fused flash or memory-efficient kernels, :func:`softmax_attention`);
:mod:`featdenoise.models.kernels`: the median as a sort-free selection network, the bilateral
filter accumulating 9 shifted views in place. ``featdenoise bench ops`` compares every op with
its straightforward version.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.models.attention import (
    ATTENTION_BACKENDS,
    CHUNK_ELEMENTS,
    MATERIALISE_MAX_ELEMENTS,
    SDPA_MAX_CHANNELS,
    fused_kernels,
    resolve_backend,
    softmax_attention,
)
from featdenoise.models.kernels import bilateral3x3, median3x3

# The attention and kernel names stay importable from here, where the ops that use them live.
__all__ = ["ATTENTION_BACKENDS", "CHUNK_ELEMENTS", "MATERIALISE_MAX_ELEMENTS", "OP_NAMES",
           "SDPA_MAX_CHANNELS", "Bilateral", "DenoiseOptions", "DenoisingBlock", "Identity",
           "MeanFilter", "MedianFilter", "NonLocal", "bilateral3x3", "build_op", "fused_kernels",
           "median3x3", "resolve_backend", "softmax_attention", "subsample_2x2"]

OP_NAMES = (
    "nonlocal_gaussian",
    "nonlocal_dot",
    "bilateral_gaussian",
    "bilateral_dot",
    "mean",
    "median",
    "null",
)


def _embedding(channels: int) -> nn.Conv2d:
    """Bias-free 1x1 conv ``C -> C/2``, init N(0, 0.01) (official ``embedding_theta/phi``)."""
    conv = nn.Conv2d(channels, max(channels // 2, 1), 1, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return conv


def subsample_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, stride 2, "VALID" (Sec. 6.2 sub-sampling of ``x_j``).

    Shapes: ``[N, C, H, W] -> [N, C, H // 2, W // 2]``; an odd size drops its last row/column
    (as a pooling layer without padding does), a dimension of size 1 is kept as it is.
    """
    kh, kw = (2 if x.shape[-2] >= 2 else 1), (2 if x.shape[-1] >= 2 else 1)
    return F.max_pool2d(x, (kh, kw), (kh, kw))


class NonLocal(nn.Module):
    """Non-local means, Eq. (1): ``y_i = 1/C(x) * sum_j f(x_i, x_j) x_j`` over all pixels j.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``.

    Args:
        channels: C.
        softmax: True = Gaussian, ``f = exp(theta(x_i)^T phi(x_j) / sqrt(d))``,
            ``C(x) = sum_j f`` (a softmax over j), ``d = C/2``; False = dot product,
            ``f = x_i^T x_j``, ``C(x) = M`` (pixels j: ``H*W``, or the pooled count).
        embed: theta/phi 1x1 embeddings to ``C/2`` channels (default: ``softmax``, as the
            official ``ResNetDenoise`` / ``ResNeXtDenoiseAll``). Without embedding
            ``theta = phi = x`` and ``d = C``.
        subsample: Sec. 6.2 trick: ``x_j`` 2x2 max-pooled (:func:`subsample_2x2`) before the
            phi embedding, so keys ``phi(x^_j)`` and values ``x^_j``; ``x_i`` full size.
        backend: how the Gaussian softmax is computed (:func:`softmax_attention`).
    """

    def __init__(self, channels: int, softmax: bool = True, embed: bool | None = None,
                 subsample: bool = False, backend: str = "auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        self.softmax = softmax
        self.embed = softmax if embed is None else embed
        self.subsample = subsample
        self.backend = backend
        if self.embed:
            self.theta = _embedding(channels)
            self.phi = _embedding(channels)

    def extra_repr(self) -> str:
        return f"softmax={self.softmax}, embed={self.embed}, subsample={self.subsample}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # x_j: pooled before the embedding (Wang et al. Sec. 3.3); queries x_i keep every pixel
        xj = subsample_2x2(x) if self.subsample else x  # [N, C, H', W']
        theta, phi, g = (self.theta(x), self.phi(xj), xj) if self.embed else (x, xj, xj)
        d, m = theta.shape[1], phi.shape[2] * phi.shape[3]
        q = theta.flatten(2)  # [N, d, HW]
        k = phi.flatten(2)  # [N, d, M]
        v = g.flatten(2)  # [N, C, M]
        if self.softmax:
            y = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  1.0 / math.sqrt(d), self.backend)  # [N, HW, C]
            y = y.transpose(1, 2)  # [N, C, HW]
        elif self.backend != "materialise" and c * d * (m + h * w) <= h * w * m * (c + d):
            # (phi g^T) theta: [N, d, C] Gram matrix, cost ~HW*C^2 (official when C <= HW)
            gram = torch.bmm(k, v.transpose(1, 2))  # [N, d, C]
            y = torch.bmm(gram.transpose(1, 2), q) / m  # [N, C, HW]
        else:  # (theta^T phi) g: [N, HW, M] pairwise weights, cheaper when C > HW
            f = torch.bmm(q.transpose(1, 2), k)  # [N, HW, M]
            y = torch.bmm(v, f.transpose(1, 2)) / m  # [N, C, HW]
        return y.reshape(n, c, h, w)


class Bilateral(nn.Module):
    """Bilateral filter, Eq. (2): the non-local weighting restricted to the 3x3 window Omega(i).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``. Gaussian: ``softmax_j(theta_i^T phi_j / sqrt(d))``
    over the in-image neighbours j (embedding as in :class:`NonLocal`); dot product:
    ``x_i^T x_j / |Omega(i)|``. Out-of-image neighbours are not part of Omega(i).
    Computed by :func:`~featdenoise.models.kernels.bilateral3x3` from 9 shifted views.
    """

    def __init__(self, channels: int, softmax: bool = True, embed: bool | None = None):
        super().__init__()
        self.softmax = softmax
        self.embed = softmax if embed is None else embed
        if self.embed:
            self.theta = _embedding(channels)
            self.phi = _embedding(channels)

    def extra_repr(self) -> str:
        return f"softmax={self.softmax}, embed={self.embed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta, phi = (self.theta(x), self.phi(x)) if self.embed else (x, x)
        return bilateral3x3(theta, phi, x, self.softmax, 1.0 / math.sqrt(theta.shape[1]))


class MeanFilter(nn.Module):
    """3x3 mean filter (Sec. 4.2): average pooling, stride 1, same size.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``. Border: the mean of the in-image pixels of the
    window (``count_include_pad=False``, TensorFlow "SAME" average pooling).
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the size, got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)


class MedianFilter(nn.Module):
    """3x3 median filter per channel, Eq. (3), same size (:func:`median3x3`).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``; replicate padding at the border; differentiable,
    the gradient of each output flows to the single input element that is the median.
    """

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median3x3(x)


class Identity(nn.Module):
    """``null`` (Fig. 7): no operation; the block is ``x + BN(conv1x1(x))``."""

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_op(name: str, channels: int, subsample: bool = False, embed: bool | None = None,
             backend: str = "auto") -> nn.Module:
    """Build the denoising operation ``name`` (one of :data:`OP_NAMES`) for C = ``channels``.

    ``subsample`` (Sec. 6.2) applies to the two non-local ops only; ``embed`` overrides the
    default theta/phi embedding (Gaussian: yes, dot product: no; ignored by the ops without
    one); ``backend`` picks how the Gaussian non-local softmax is computed
    (:func:`softmax_attention`).
    """
    if name not in OP_NAMES:
        raise ValueError(f"unknown denoising op {name!r}; choose one of {', '.join(OP_NAMES)}")
    if subsample and not name.startswith("nonlocal"):
        raise ValueError(f"subsample applies to the non-local ops only, not {name!r}")
    if name.startswith("nonlocal"):
        return NonLocal(channels, softmax=name.endswith("gaussian"), embed=embed,
                        subsample=subsample, backend=backend)
    if name.startswith("bilateral"):
        return Bilateral(channels, softmax=name.endswith("gaussian"), embed=embed)
    return {"mean": MeanFilter, "median": MedianFilter, "null": Identity}[name](channels)


class DenoisingBlock(nn.Module):
    """Denoising block of Fig. 4 (official ``denoising``): ``y = x + BN(conv1x1(op(x)))``.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``. The 1x1 conv has no bias; BN gamma starts at 0,
    so a fresh block is the identity. Submodules ``op`` (with ``op.theta``, ``op.phi`` for the
    embedded ops), ``conv`` and ``bn`` correspond to the official variables
    ``embedding_theta/W``, ``embedding_phi/W``, ``conv/W`` and ``conv/bn/*``.

    Args:
        channels: C.
        op: a name from :data:`OP_NAMES` (default ``nonlocal_gaussian``, the paper's best).
        use_conv: False drops the 1x1 conv, ``y = x + BN(op(x))`` (Table 1, "without 1x1";
            ``conv`` is then an ``nn.Identity``).
        residual: False drops the identity path, ``y = BN(conv1x1(op(x)))`` (Table 1, "without
            residual"). BN gamma then starts at 1: with 0 the block would output zeros and cut
            the signal to every later layer.
        subsample: 2x2 max-pool keys/values of the non-local ops (Sec. 6.2).
        embed: override the op's default theta/phi embedding (see :func:`build_op`).
        backend: Gaussian non-local softmax implementation (:func:`softmax_attention`).
    """

    def __init__(self, channels: int, op: str = "nonlocal_gaussian", use_conv: bool = True,
                 residual: bool = True, subsample: bool = False, embed: bool | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.op_name = op
        self.residual = residual
        self.op = build_op(op, channels, subsample=subsample, embed=embed, backend=backend)
        self.conv: nn.Module = nn.Identity()
        if use_conv:
            conv = nn.Conv2d(channels, channels, 1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.conv = conv
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        if residual:
            nn.init.zeros_(self.bn.weight)

    def extra_repr(self) -> str:
        return f"op={self.op_name!r}, residual={self.residual}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.op(x)))
        return x + y if self.residual else y


@dataclasses.dataclass(frozen=True)
class DenoiseOptions:
    """How every denoising block of a network is built: the arguments of
    :class:`DenoisingBlock` but ``channels`` (defaults: the paper's block, Fig. 4)."""

    op: str = "nonlocal_gaussian"
    use_conv: bool = True
    residual: bool = True
    subsample: bool = False
    embed: bool | None = None
    backend: str = "auto"

    @classmethod
    def of(cls, denoise: DenoiseOptions | str) -> DenoiseOptions:
        """A network's ``denoise`` argument as options: an op name means that op, the other
        options at their defaults."""
        return denoise if isinstance(denoise, DenoiseOptions) else cls(op=denoise)

    def block(self, channels: int) -> DenoisingBlock:
        """A fresh :class:`DenoisingBlock` for ``[N, channels, H, W]`` features."""
        return DenoisingBlock(channels, **dataclasses.asdict(self))
