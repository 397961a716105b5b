"""The only module that calls PyTorch's private oneDNN operators (``torch.ops.mkldnn``).

PyTorch's CPU convolution reorders each float32 weight into oneDNN's blocked layout at every call,
forward and again backward. These operators take a weight packed once instead:

- :func:`pack` / :func:`pack_transposed`: ``_reorder_convolution_weight`` and
  ``_reorder_convolution_transpose_weight`` (the weight packed for ``conv`` and for its transposed
  convolution, which computes the input gradient);
- :func:`conv` / :func:`conv_transposed`: ``_convolution_pointwise`` and
  ``_convolution_transpose_pointwise`` on those packs (they return NHWC activations).

They are private: a PyTorch build may lack them, or refuse a shape or a dtype. Every function here
raises :class:`Unsupported` for any such failure, and the caller (:mod:`featdenoise.accel.pack`)
then runs PyTorch's own convolution, which gives the same result up to float rounding.
"""

from __future__ import annotations

import torch

_OPS = ("_convolution_pointwise", "_convolution_transpose_pointwise",
        "_reorder_convolution_weight", "_reorder_convolution_transpose_weight")


class Unsupported(RuntimeError):
    """A oneDNN operator is missing or refused its arguments (use the normal path)."""


def _ops():
    return getattr(torch.ops, "mkldnn", None)


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the four packed-convolution operators."""
    try:
        ops = _ops()
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and all(hasattr(ops, name) for name in _OPS))
    except (AttributeError, RuntimeError):
        return False


def eligible(x: torch.Tensor) -> bool:
    """Whether an input can take the packed path at all: a dense 4-D float32 CPU tensor (NCHW or
    NHWC), outside autocast (bf16 and other dtypes run the normal path)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and not torch.is_autocast_enabled("cpu"))


def _call(name: str, *args):
    """``torch.ops.mkldnn.<name>(*args)``; any failure becomes :class:`Unsupported`."""
    try:
        return getattr(_ops(), name)(*args)
    except (AttributeError, RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        raise Unsupported(f"torch.ops.mkldnn.{name}: {err}") from err


def pack(weight: torch.Tensor, geo, x_shape: list[int]) -> torch.Tensor:
    """``weight`` [C_out, C_in/g, kh, kw] packed for :func:`conv` on inputs of ``x_shape``."""
    return _call("_reorder_convolution_weight", weight, geo.padding, geo.stride, geo.dilation,
                 geo.groups, list(x_shape))


def pack_transposed(weight: torch.Tensor, geo) -> torch.Tensor:
    """``weight`` packed for :func:`conv_transposed` (the input gradient of :func:`conv`)."""
    return _call("_reorder_convolution_transpose_weight", weight, geo.padding,
                 geo.output_padding, geo.stride, geo.dilation, geo.groups, geo.y_shape)


def conv(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, geo) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, ...)`` on the packed weight: ``[N, C_out, H', W']`` (NHWC)."""
    return _call("_convolution_pointwise", x, packed, bias, geo.padding, geo.stride,
                 geo.dilation, geo.groups, "none", [], "")


def conv_transposed(grad_y: torch.Tensor, packed_t: torch.Tensor, geo) -> torch.Tensor:
    """The input gradient of :func:`conv` for ``grad_y`` [N, C_out, H', W']: ``[N, C_in, H, W]``."""
    return _call("_convolution_transpose_pointwise", grad_y, packed_t, None, geo.padding,
                 geo.output_padding, geo.stride, geo.dilation, geo.groups, "none", [], "")
