"""Small-image ResNets (28x28 Fashion-MNIST, 32x32 CIFAR-10) with feature-denoising blocks.

A CIFAR-style ResNet of basic blocks: 3x3 stem (no max-pool), three stages of widths
``w, 2w, 4w`` at strides 1, 2, 2, global average pooling, linear classifier. The denoising ops
and placements are those of the ImageNet networks (:mod:`featdenoise.models.resnet`), scaled
down so that adversarial training runs in minutes on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.models.denoise import DenoiseOptions
from featdenoise.models.resnet import PLACEMENTS, ConvBN, denoise_block


class Scale(nn.Module):
    """[0, 1] pixels -> [-1, 1] (``x * 2 - 1``), the paper's input range; channel order kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers (second BN gamma = 0) + shortcut, ReLU; optional denoising after.

    ``[N, C_in, H, W] -> [N, C_out, ceil(H / s), ceil(W / s)]``; the shortcut is a 1x1 conv + BN
    when the channel count or the stride changes. ``non_local`` (placement "all") is applied to
    the block output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 non_local: nn.Module | None = None):
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride, tf_same=False)
        self.conv2 = ConvBN(out_channels, out_channels, 3, relu=False, zero_init=True,
                            tf_same=False)
        self.convshortcut = (ConvBN(in_channels, out_channels, 1, stride, relu=False,
                                    tf_same=False)
                             if in_channels != out_channels or stride != 1 else None)
        self.non_local = non_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.convshortcut is None else self.convshortcut(x)
        y = F.relu(self.conv2(self.conv1(x)) + shortcut)
        return y if self.non_local is None else self.non_local(y)


class SmallResNet(nn.Module):
    """ResNet for 28x28 / 32x32 images with the paper's denoising blocks.

    Input ``[N, in_channels, H, W]`` float in [0, 1] (RGB, or gray with ``in_channels=1``),
    normalised inside to [-1, 1]; output logits ``[N, num_classes]``.

    Args:
        in_channels: 1 (Fashion-MNIST) or 3 (CIFAR-10).
        num_classes: classifier outputs.
        width: channels of stage 1; stages 2 and 3 have ``2 * width`` and ``4 * width``.
        blocks: basic blocks per stage (3 counts), e.g. ``[1, 1, 1]``.
        placement: ``none``, ``stages`` (one denoising block after each stage, the paper's
            "+4" scaled to 3 stages), ``all`` (after every block), ``bottleneck`` (control: one
            extra basic block at the ``stages`` places).
        denoise: an op name or :class:`~featdenoise.models.denoise.DenoiseOptions`, as in
            :class:`~featdenoise.models.resnet.ResNet`.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 blocks: Sequence[int] = (1, 1, 1), placement: str = "none",
                 denoise: DenoiseOptions | str = "nonlocal_gaussian"):
        super().__init__()
        blocks = [int(b) for b in blocks]
        if len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"blocks must be 3 positive counts (one per stage), got {blocks}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose one of "
                             f"{', '.join(PLACEMENTS)}")
        if width < 2:
            raise ValueError(f"width must be >= 2, got {width}")
        self.num_classes = num_classes
        self.placement = placement
        options = DenoiseOptions.of(denoise)

        self.normalize = Scale()
        self.stem = ConvBN(in_channels, width, 3, tf_same=False)
        self._forward_names: list[str] = ["stem"]
        in_ch = width
        for i, count in enumerate(blocks):
            ch = width * 2 ** i
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                nl = denoise_block(ch, options) if placement == "all" else None
                layers[f"block{j}"] = BasicBlock(in_ch, ch, stride, nl)
                in_ch = ch
            name = f"stage{i + 1}"
            self.add_module(name, nn.Sequential(layers))
            self._forward_names.append(name)
            if placement == "stages":
                self.add_module(f"{name}_denoise", denoise_block(ch, options))
                self._forward_names.append(f"{name}_denoise")
            elif placement == "bottleneck":
                self.add_module(f"{name}_bottleneck", BasicBlock(ch, ch))
                self._forward_names.append(f"{name}_bottleneck")
        self.linear = nn.Linear(in_ch, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for name in self._forward_names:
            x = getattr(self, name)(x)
        return self.linear(x.mean(dim=(2, 3)))  # [N, 4w] -> [N, num_classes]

    def feature_modules(self) -> dict[str, nn.Module]:
        """Stage outputs ``stage1``..``stage3`` and every denoising block, in forward order
        (``stage{k}_denoise`` or ``stage{k}_block{j}_denoise``)."""
        out: dict[str, nn.Module] = {}
        for name, module in self.named_children():
            if not name.startswith("stage") or not isinstance(module, nn.Sequential):
                continue
            for j, block in enumerate(module):
                if isinstance(block.non_local, nn.Module):
                    out[f"{name}_block{j}_denoise"] = block.non_local
            out[name] = module
            if self.placement == "stages":
                out[f"{name}_denoise"] = getattr(self, f"{name}_denoise")
        return out
