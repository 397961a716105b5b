"""A normalisation layer in front of a model, so every model takes pixels in [0, 1].

The library's convention (attacks, eps 16/255 = the paper's 16, Sec. 6) is float RGB in [0, 1].
Models trained elsewhere usually expect ``(x - mean) / std``; :class:`Normalized` puts that step
inside the model, so the attack's budget stays on the pixel scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
"""Named ``(mean, std)`` per RGB channel on the [0, 1] scale."""


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``imagenet``, ``cifar10``, ``none`` (None) or ``M1,M2,M3/S1,S2,S3`` -> ``(mean, std)``.

    Raises:
        ValueError: one line naming the text, for anything else, a non-finite value, a std <= 0,
            or mean and std of different lengths.
    """
    key = text.strip().lower()
    if key == "none":
        return None
    if key in STATS:
        return STATS[key]
    mean_text, sep, std_text = text.partition("/")
    try:
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        sep = ""
    if not sep or len(mean) != len(std) or not all(map(math.isfinite, mean + std)) \
            or min(std) <= 0:
        raise ValueError(f"--normalize {text!r}: expected imagenet, cifar10, none or "
                         "M1,M2,M3/S1,S2,S3 (means and positive stds per channel, [0, 1] scale)")
    return mean, std


class Normalized(nn.Module):
    """``inner((x - mean) / std)``: a model that expects normalised input, taking [0, 1] pixels.

    Args:
        inner: the model; its logits ``[N, K]`` are returned unchanged.
        mean, std: per channel, on the [0, 1] scale (stored as buffers, so they are part of the
            state dict and of an evaluation's weights digest).

    ``x``: ``[N, C, H, W]`` float in [0, 1] with ``C == len(mean)``. ``num_classes`` and
    ``in_channels`` of ``inner`` are visible on the wrapper.
    """

    mean: torch.Tensor  # buffers [1, C, 1, 1]
    std: torch.Tensor

    def __init__(self, inner: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.inner = inner
        param = next(inner.parameters(), None)
        device = param.device if param is not None else None  # where the model already is
        for name, values in (("mean", mean), ("std", std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32,
                                                    device=device).view(1, -1, 1, 1))
        for key in ("num_classes", "in_channels"):
            if getattr(inner, key, None) is not None:
                setattr(self, key, getattr(inner, key))
        if getattr(self, "in_channels", None) is None:
            self.in_channels = len(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
