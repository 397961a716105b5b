"""BatchNorm folded into the convolution before it, for inference-mode passes.

In eval mode (paper Sec. 5: BatchNorm uses its running statistics during an attack, as the
official ``adv_model.py`` does) ``BN(conv(x))`` is one convolution with

    W' = W * s,   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps)    (per channel)

so each forward and input-gradient pass saves a BatchNorm pass. The result is the same function up
to float rounding (about 1e-7 relative). A pair is two consecutive children of one module, a
``Conv2d`` then a ``BatchNorm2d`` of its output channels (``ConvBN``, ``Sequential(conv, bn, ..)``,
torchvision's ``conv1, bn1, ...``); because that order need not be the forward order,
:mod:`featdenoise.accel.layer` checks the wiring and the logits before it relies on a pair.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch import nn

from featdenoise.accel.unchanged import Unchanged


def plain_conv(module: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A ``Conv2d`` computing PyTorch's own convolution: its class keeps ``Conv2d``'s
    ``forward`` and ``_conv_forward`` (a subclass that overrides either may compute anything)."""
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward)


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """``(conv, bn)`` for every plain Conv2d child followed by a foldable BatchNorm2d child
    (``BatchNorm2d``'s own ``forward``, running statistics tracked, channels matching), each
    module in at most one pair."""
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:], strict=False):
            if (plain_conv(conv) and isinstance(bn, nn.BatchNorm2d)
                    and type(bn).forward is nn.BatchNorm2d.forward
                    and bn.running_mean is not None and bn.running_var is not None
                    and bn.num_features == conv.out_channels):
                pairs.append((conv, bn))
    # A module shared between places cannot be folded in one of them only.
    seen = [id(m) for pair in pairs for m in pair]
    return [(c, b) for c, b in pairs if seen.count(id(c)) == 1 and seen.count(id(b)) == 1]


def sources(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """The tensors a folded pair is computed from (entries may be None), with the BatchNorm's
    ``num_batches_tracked``: a train-mode forward updates the running statistics in the
    batch_norm kernel, which leaves their version counters alone, while ``BatchNorm2d.forward``
    counts that update in ``num_batches_tracked`` with an in-place add that bumps its own."""
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.num_batches_tracked)


@torch.no_grad()
def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded ``(weight, bias)`` of one pair, computed in float64 and rounded once."""
    f64 = torch.float64
    assert bn.running_var is not None and bn.running_mean is not None  # foldable_pairs checks
    scale = bn.running_var.to(f64).add(bn.eps).rsqrt_()  # [C_out]
    if bn.weight is not None:
        scale.mul_(bn.weight.to(f64))
    bias = -bn.running_mean.to(f64) * scale
    if conv.bias is not None:
        bias.add_(conv.bias.to(f64) * scale)
    if bn.bias is not None:
        bias.add_(bn.bias.to(f64))
    # float32 weight * float64 scale promotes to float64: one rounding below.
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class FoldCache:
    """Folded ``(weight, bias)`` per pair, served while the pair's tensors are unchanged.

    An entry is reused only while the conv's and BN's tensors are the same objects at the same
    in-place version, and equal to a snapshot taken when they were folded (compared once per
    ``epoch``, so even ``p.data`` writes between two uses refold): folding in float64 at every
    call would be a noticeable share of a short attack. Memory: two extra copies of the conv
    weights (the folded ones and the snapshot) for the cache's lifetime.
    """

    def __init__(self):
        self._entries: dict[tuple[int, int], tuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, conv: nn.Conv2d, bn: nn.BatchNorm2d,
            epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded ``(weight, bias)`` of ``(conv, bn)``, refolded if anything changed."""
        key = (id(conv), id(bn))
        hit = self._entries.get(key)
        if hit is not None and hit[0] == bn.eps and hit[1].holds(sources(conv, bn), epoch):
            return hit[2], hit[3]
        weight, bias = fold(conv, bn)
        self._entries[key] = (bn.eps, Unchanged(sources(conv, bn), epoch=epoch or 0), weight,
                              bias)
        return weight, bias
