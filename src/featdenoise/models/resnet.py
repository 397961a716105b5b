"""ImageNet ResNet / ResNeXt with feature-denoising blocks, built as the official tensorpack code.

This is a layer-for-layer port of the authors' ``resnet_model.py`` + ``nets.py``
(facebookresearch/ImageNet-Adversarial-Training), so the released TensorFlow checkpoints load by
a pure name translation (:mod:`featdenoise.hub.tensorpack`). Details that matter for parity:

* input: float RGB in [0, 1], ``[N, 3, H, W]``; :class:`OfficialNormalize` turns it into the
  official input (BGR, ``x * 2 - 1`` in [-1, 1]);
* TensorFlow "SAME" padding, computed from the input size at run time (:class:`SameConv2d`,
  :class:`SameMaxPool2d`): on stride-2 layers with even sizes it pads one pixel more at the
  bottom/right than at the top/left (conv0 7x7/2, the 3x3/2 max-pool, the strided 3x3 convs);
* bottleneck with the stride on the 3x3 conv ("ImageNet in 1 Hour", Sec. 5.1), projection
  shortcut (1x1 conv + BN) when the channel count or the stride changes;
* the last BN of each residual branch has gamma initialised to 0, convs use TF's
  ``variance_scaling(scale=2, mode="fan_out")`` (truncated normal), the classifier N(0, 0.01);
  BN epsilon 1e-5 and momentum 0.9 in TF's convention (0.1 in PyTorch's, the default).

Module names mirror the TF variable scopes: ``conv0``, ``group{i}.block{j}.conv{1,2,3}``,
``group{i}.block{j}.convshortcut``, ``group{i}_denoise`` (paper's "+4 denoise", after the last
block of res2..res5), ``group{i}.block{j}.non_local`` (denoising after every residual block, as
the CAAD-winning ResNeXt101-32x8d "DenoiseAll"), ``linear``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.models.denoise import DenoiseOptions, DenoisingBlock

PLACEMENTS = ("none", "stages", "all", "bottleneck")
"""Where denoising blocks go: nowhere, after the last block of each stage (paper Sec. 6, "+4"),
after every residual block (Sec. 6.2, "DenoiseAll"), or "+4 bottleneck" control (Fig. 7)."""

NUM_BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
"""Residual blocks per group for the official ``-d`` depths."""

STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck width of res2..res5 (output is 4x)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one spatial dimension.

    TF makes the output ``ceil(size / stride)`` long and pads
    ``max((out - 1) * stride + k_eff - size, 0)`` in total, the odd pixel going *after*.
    """
    k_eff = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size at run time.

    Stride-1 convs with odd kernels pad symmetrically (``k // 2``) with PyTorch's own padding;
    every other case pads explicitly with zeros before the convolution, possibly asymmetrically.
    Shapes: ``[N, C_in, H, W] -> [N, C_out, ceil(H / s), ceil(W / s)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=kernel_size // 2 if static else 0, groups=groups, bias=bias)
        self.static_padding = static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static_padding:
            top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
            left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class SameMaxPool2d(nn.Module):
    """Max-pooling with TensorFlow "SAME" padding (padded cells never win: they hold -inf)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class OfficialNormalize(nn.Module):
    """[0, 1] RGB -> the official network input: BGR channel order, scaled to [-1, 1].

    The official code feeds ``bgr_uint8 * 2 / 255 - 1`` (adv_model.py ``image_preprocess``);
    for ``rgb = bgr[..., ::-1] / 255`` this is ``flip(rgb) * 2 - 1``. ``[N, 3, H, W]`` both ways.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) * 2.0 - 1.0


def tf_variance_scaling_(weight: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """TF1 ``variance_scaling_initializer(scale, mode="fan_out")``: truncated normal (2 std).

    fan_out = ``out_channels * kh * kw``; TF divides the std by 0.8796 so the *truncated*
    distribution has variance ``scale / fan_out``.
    """
    fan_out = weight.shape[0] * weight[0, 0].numel()
    std = math.sqrt(scale / fan_out) / 0.87962566103423978
    with torch.no_grad():  # redraw the ~5% beyond 2 std (much faster than inverse-CDF)
        flat = weight.view(-1).normal_()
        redraw = (flat.abs() > 2).nonzero().squeeze(1)
        while redraw.numel():
            fresh = torch.randn(redraw.numel(), dtype=flat.dtype, device=flat.device)
            flat[redraw] = fresh
            redraw = redraw[fresh.abs() > 2]
        weight.mul_(std)
    return weight


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU): tensorpack ``Conv2D(..., activation=BNReLU / BN)``.

    Submodules ``conv`` and ``bn`` map to the TF variables ``<scope>/W`` and ``<scope>/bn/*``.
    ``zero_init`` sets BN gamma to 0 (last BN of a residual branch, official ``get_bn``).
    ``tf_same`` chooses TF "SAME" padding (:class:`SameConv2d`); otherwise symmetric ``k // 2``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, relu: bool = True, zero_init: bool = False,
                 tf_same: bool = True):
        super().__init__()
        self.conv: nn.Conv2d
        if tf_same:
            self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, groups)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                  padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        self.relu = relu
        tf_variance_scaling_(self.conv.weight)
        if zero_init:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


def denoise_block(channels: int, options: DenoiseOptions) -> DenoisingBlock:
    """``options.block(channels)`` with its 1x1 conv drawn as inside the official argscope (TF
    variance scaling, fan-out), as every network of the package builds its blocks."""
    block = options.block(channels)
    if isinstance(block.conv, nn.Conv2d):
        tf_variance_scaling_(block.conv.weight)
    return block


class Bottleneck(nn.Module):
    """Official ``resnet_bottleneck``: 1x1 -> 3x3 (stride, groups) -> 1x1 (x4), + shortcut, ReLU.

    Bottleneck width is ``ch_out * res2_bottleneck * groups / 64`` (ResNet: ``ch_out``;
    ResNeXt 32x8d: ``4 * ch_out``). Shapes: ``[N, C_in, H, W] -> [N, 4 ch_out, H/s, W/s]``
    (TF "SAME" rounding up). ``non_local`` is an optional :class:`DenoisingBlock` applied to the
    block output (placement "all", official ``ResNeXtDenoiseAllModel``).
    """

    def __init__(self, in_channels: int, ch_out: int, stride: int = 1, groups: int = 1,
                 res2_bottleneck: int = 64, non_local: nn.Module | None = None):
        super().__init__()
        width = ch_out * (res2_bottleneck * groups // 64)
        out = ch_out * 4
        self.conv1 = ConvBN(in_channels, width, 1)
        self.conv2 = ConvBN(width, width, 3, stride, groups)
        self.conv3 = ConvBN(width, out, 1, relu=False, zero_init=True)
        self.convshortcut = (ConvBN(in_channels, out, 1, stride, relu=False)
                             if in_channels != out or stride != 1 else None)
        self.non_local = non_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.convshortcut is None else self.convshortcut(x)
        y = F.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)
        return y if self.non_local is None else self.non_local(y)


class ResNet(nn.Module):
    """ImageNet ResNet / ResNeXt of the official code, with optional feature-denoising blocks.

    Input ``[N, 3, H, W]`` float RGB in [0, 1] (any H, W; 224 for ImageNet); output logits
    ``[N, num_classes]``. Stages res2..res5 are ``group0``..``group3`` with strides 1, 2, 2, 2.

    Args:
        blocks: residual blocks per group, any counts (official depths: :data:`NUM_BLOCKS`).
        num_classes: classifier outputs (1000 for ImageNet).
        groups: groups of the 3x3 conv (32 for ResNeXt 32x8d, 1 for ResNet).
        res2_bottleneck: channels per group of the res2 bottleneck (8 for 32x8d, 64 for ResNet).
        placement: one of :data:`PLACEMENTS` (paper Sec. 6 "+4", Sec. 6.2 "all", Fig. 7 control).
        denoise: how each denoising block is built: an op name
            (:data:`featdenoise.models.denoise.OP_NAMES`, the other options default) or
            :class:`~featdenoise.models.denoise.DenoiseOptions`: ``op``, ``use_conv``,
            ``residual`` (Table 1 ablations), ``subsample`` (Sec. 6.2), ``embed`` (theta/phi
            embedding; ``None`` = op default) and ``backend``, the Gaussian non-local softmax
            implementation: ``auto`` (default: chosen per shape by
            :func:`featdenoise.models.attention.resolve_backend`), ``chunked``, ``sdpa`` or
            ``materialise`` (see :func:`featdenoise.models.attention.softmax_attention`).
            :func:`~featdenoise.models.registry.create_model` takes these options as keywords
            of their own (``denoise="mean", use_conv=False``).
    """

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000,
                 groups: int = 1, res2_bottleneck: int = 64, placement: str = "none",
                 denoise: DenoiseOptions | str = "nonlocal_gaussian"):
        super().__init__()
        blocks = [int(b) for b in blocks]
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts (res2..res5), got {blocks}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose one of "
                             f"{', '.join(PLACEMENTS)}")
        self.num_classes = num_classes
        self.placement = placement
        options = DenoiseOptions.of(denoise)

        self.normalize = OfficialNormalize()
        self.conv0 = ConvBN(3, 64, 7, 2)
        self.pool0 = SameMaxPool2d(3, 2)
        self._forward_names: list[list[str]] = []
        in_ch = 64
        for i, (count, ch) in enumerate(zip(blocks, STAGE_WIDTHS, strict=True)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(count):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                nl = denoise_block(ch * 4, options) if placement == "all" else None
                layers[f"block{j}"] = Bottleneck(in_ch, ch, stride, groups, res2_bottleneck, nl)
                in_ch = ch * 4
            self.add_module(f"group{i}", nn.Sequential(layers))
            names = [f"group{i}"]
            if placement == "stages":
                names.append(f"group{i}_denoise")
                self.add_module(names[-1], denoise_block(in_ch, options))
            elif placement == "bottleneck":
                names.append(f"group{i}_bottleneck")
                self.add_module(names[-1], Bottleneck(in_ch, ch, 1, groups, res2_bottleneck))
            self._forward_names.append(names)
        self.linear = nn.Linear(in_ch, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.conv0(self.normalize(x)))  # [N, 64, H/4, W/4]
        for names in self._forward_names:
            for name in names:  # group{i}, then group{i}_denoise / group{i}_bottleneck
                x = getattr(self, name)(x)
        x = x.mean(dim=(2, 3))  # global average pooling: [N, 2048]
        return self.linear(x)

    def feature_modules(self) -> dict[str, nn.Module]:
        """Stage outputs ``res2``..``res5`` and every denoising block, in forward order.

        Denoising blocks are ``res{k}_denoise`` (placement "stages") or
        ``res{k}_block{j}_denoise`` (placement "all"); a block's ``.op`` input/output are the
        feature maps right before/after the denoising operation (paper Fig. 2, 3).
        """
        out: dict[str, nn.Module] = {}
        for i in range(4):
            stage = f"res{i + 2}"
            group = getattr(self, f"group{i}")
            for j, block in enumerate(group):
                if block.non_local is not None:
                    out[f"{stage}_block{j}_denoise"] = block.non_local
            out[stage] = group
            if self.placement == "stages":
                out[f"{stage}_denoise"] = getattr(self, f"group{i}_denoise")
        return out
