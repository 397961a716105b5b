"""Fold inference-mode BatchNorm into the preceding convolution for the duration of an attack.

During an attack the model is in eval mode (paper Sec. 5: BatchNorm uses its running statistics,
as the official ``adv_model.py`` does), where ``BN(conv(x))`` is one convolution with

    W' = W * s,   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps)    (per channel)

so each attack step saves a BatchNorm forward and backward pass. The result is the same function
up to float rounding (about 1e-7 relative). A pair is two consecutive children of one module, a
``Conv2d`` then a ``BatchNorm2d`` of its output channels (``ConvBN``, ``Sequential(conv, bn, ..)``,
torchvision's ``conv1, bn1, ...``); because that order need not be the forward order,
:func:`fold_is_exact` checks the wiring and the logits before an attack relies on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from featdenoise.attacks.unchanged import Unchanged


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, str]]:
    """``(parent, conv_name, conv, bn_name)`` for every Conv2d child followed by a foldable
    BatchNorm2d child (running statistics tracked, channels matching)."""
    pairs = []
    for parent in model.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.running_mean is not None and bn.running_var is not None
                    and bn.num_features == conv.out_channels):
                pairs.append((parent, conv_name, conv, bn_name))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded ``(weight, bias)`` of one pair, computed in float64 and rounded once."""
    f64 = torch.float64
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


def _cached_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d,
                 cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fold`, served from ``cache`` while the pair's tensors are provably unchanged."""
    if cache is None:
        return _fold(conv, bn)
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    key = (id(conv), id(bn))
    hit = cache.get(key)
    if hit is not None and hit[0] == bn.eps and hit[1].holds(sources):
        return hit[2], hit[3]
    weight, bias = _fold(conv, bn)
    cache[key] = (bn.eps, Unchanged(sources), weight, bias)
    return weight, bias


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module, cache: dict | None = None) -> Iterator[int]:
    """Inside the block, every foldable pair computes ``conv'(x)`` with BN folded in and the BN
    is an ``nn.Identity``; everything is put back on exit (also on error). Yields the number of
    folded pairs. The model must be in eval mode and must not be used concurrently elsewhere.

    ``cache``: a dict owned by the caller (an attack keeps one) that keeps each pair's folded
    tensors between calls, so an unchanged model is folded once instead of at every attack
    (folding a ResNet-50 in float64 is ~10% of a 10-step PGD on a CPU; checking the cache is
    ~1.5%). An entry is reused only while the conv's and BN's tensors are the same objects, at
    the same in-place version and equal to a snapshot taken when they were folded (so even
    ``p.data`` writes, which bypass version counters, refold). It costs two extra copies of
    the conv weights (the folded ones and the snapshot) for the cache's lifetime.
    """
    saved = []
    try:
        for parent, _, conv, bn_name in foldable_pairs(model):
            bn = parent._modules[bn_name]
            weight, bias = _cached_fold(conv, bn, cache)
            saved.append((parent, bn_name, bn, conv, conv._parameters["weight"],
                          conv._parameters.get("bias")))
            # Plain tensors in the parameter slots: the conv's own forward (padding rules
            # included) runs unchanged on the folded values.
            conv._parameters["weight"] = weight
            conv._parameters["bias"] = bias
            parent._modules[bn_name] = nn.Identity()
        yield len(saved)
    finally:
        for parent, bn_name, bn, conv, weight, bias in reversed(saved):
            conv._parameters["weight"] = weight
            conv._parameters["bias"] = bias
            parent._modules[bn_name] = bn


@torch.no_grad()
def fold_is_exact(model: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether folding is valid for ``model`` (eval mode) on inputs like ``x`` [N, ...].

    Two checks on one forward of up to 8 images: structure (each paired BatchNorm receives
    exactly its convolution's output tensor, so a BN registered after its conv but applied
    elsewhere is caught whatever its statistics) and numbers (folded logits equal the original
    ones within ``rtol`` of their largest magnitude).
    """
    pairs = foldable_pairs(model)
    if not pairs:
        return False
    x = x[:8]
    last_out: dict[int, torch.Tensor] = {}  # pair index -> its conv's latest output
    fed_by_conv: list[bool] = []
    hooks = []

    def saver(key: int):
        def save(module, inputs, output):
            last_out[key] = output
        return save

    def checker(key: int):
        def check(module, inputs):
            fed_by_conv.append(last_out.get(key) is inputs[0])
        return check

    for i, (parent, _, conv, bn_name) in enumerate(pairs):
        hooks.append(conv.register_forward_hook(saver(i)))
        hooks.append(parent._modules[bn_name].register_forward_pre_hook(checker(i)))
    try:
        ref = model(x).float()
    finally:
        for hook in hooks:
            hook.remove()
    if not fed_by_conv or not all(fed_by_conv):
        return False
    with folded_batchnorm(model):
        folded = model(x).float()
    tol = rtol * float(ref.abs().max()) + 1e-6
    return bool(((folded - ref).abs().max() <= tol).item())
