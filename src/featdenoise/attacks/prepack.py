"""Convolution weights packed once for an attack instead of at every call (CPU, float32, oneDNN).

During an attack the weights are frozen, yet PyTorch's CPU convolution reorders each weight into
oneDNN's blocked layout at every call, in the forward and again in the backward. At small
batches the deep layers are bound by reading weights, so this copy is a sizeable share of a
step. Packed weights also make oneDNN return NHWC activations, on which its kernels run faster
(ResNet-50 at 64x64, 2 CPU threads, batches 8-32: a 10-step PGD takes 14-17% less time than with
BN folding alone). Inside
:func:`prepacked_convolutions` each eligible ``nn.Conv2d`` runs

* forward: ``torch.ops.mkldnn._convolution_pointwise`` on the packed weight;
* backward (input gradient only; parameters are frozen during an attack): the transposed
  convolution ``torch.ops.mkldnn._convolution_transpose_pointwise`` on the same weight, packed
  for that direction.

The result is the same function up to float rounding (about 5e-7 relative on the input gradient
of a ResNet-50), which is why the option is off by default (like BN folding). Eligible: a CPU
float32 input, NCHW or NHWC (the packed convolutions return NHWC), outside autocast; zero
padding given as numbers; frozen weight and bias; oneDNN available. Each (conv, input shape)
is checked once against ``F.conv2d`` and ``aten.convolution_backward`` on the real input before
it is used; anything ineligible or failing that check runs the normal path.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks.unchanged import Unchanged

_SHAPES_PER_CONV = 2  # packs kept per conv (a full batch and an eval's smaller last batch)


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the packed-convolution operators."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "_convolution_pointwise")
                    and hasattr(ops, "_convolution_transpose_pointwise")
                    and hasattr(ops, "_reorder_convolution_weight")
                    and hasattr(ops, "_reorder_convolution_transpose_weight"))
    except (AttributeError, RuntimeError):
        return False


class _Geometry:
    """A conv's padding, stride, dilation and groups as the operators want them, with the
    output shape and the transposed convolution's output padding for an input shape."""

    def __init__(self, conv: nn.Conv2d, x_shape: tuple):
        self.padding = [int(p) for p in conv.padding]
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        span = [self.dilation[i] * (conv.kernel_size[i] - 1) + 1 for i in range(2)]
        out = [(x_shape[2 + i] + 2 * self.padding[i] - span[i]) // self.stride[i] + 1
               for i in range(2)]
        self.y_shape = [x_shape[0], conv.out_channels, *out]
        # The transposed convolution must give back the input's size exactly.
        self.output_padding = [
            x_shape[2 + i] - ((out[i] - 1) * self.stride[i] - 2 * self.padding[i] + span[i])
            for i in range(2)]


def _dense(t: torch.Tensor) -> bool:
    """NCHW- or NHWC-contiguous (packed convolutions return NHWC; both layouts are supported)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


class _PackedConv(torch.autograd.Function):
    """``y = conv(x)`` on a packed weight; its backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, bias, geo):  # noqa: D102
        ctx.packed_t, ctx.geo = packed_t, geo
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, geo.padding, geo.stride, geo.dilation, geo.groups, "none", [], "")

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        geo = ctx.geo
        grad_y = grad_y if _dense(grad_y) else grad_y.contiguous()
        grad_x = torch.ops.mkldnn._convolution_transpose_pointwise(
            grad_y, ctx.packed_t, None, geo.padding, geo.output_padding, geo.stride,
            geo.dilation, geo.groups, "none", [], "")
        return grad_x, None, None, None, None


class ConvPacker:
    """Packed weights of one model (shared by the attacks on it), kept while they are unchanged.

    A pack is keyed on the conv and the input shape and is reused only while the weight and bias
    are the same tensors at the same in-place version; a ``nn.Parameter`` must also still equal
    a snapshot taken at packing (``p.data`` writes bypass version counters). Weights that BN
    folding produced are the folding cache's own tensors, which change identity when refolded.
    Memory: two packed copies of each weight (forward and transposed), plus the snapshot of
    parameters that were not folded.
    """

    def __init__(self):
        self._packs: dict[int, dict] = {}  # id(conv) -> {shape: entry}
        self._checked: dict[tuple, bool] = {}  # (conv, shape, layout, geometry) -> verified

    def conv_forward(self, conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """``conv._conv_forward`` replacement: packed when eligible, else the normal path."""
        if not self._eligible(conv, x, weight, bias):
            return nn.Conv2d._conv_forward(conv, x, weight, bias)
        shape = tuple(x.shape)
        check_key = (id(conv), shape, x.is_contiguous(), tuple(weight.shape), conv.stride,
                     conv.padding, conv.dilation, conv.groups)
        if self._checked.get(check_key) is False:
            return nn.Conv2d._conv_forward(conv, x, weight, bias)
        try:
            entry = self._entry(conv, shape, weight, bias)
        except (RuntimeError, TypeError):  # an operator this build does not support as called
            self._checked[check_key] = False
            return nn.Conv2d._conv_forward(conv, x, weight, bias)
        if check_key not in self._checked:
            self._checked[check_key] = self._verify(conv, x, weight, bias, entry)
        if not self._checked[check_key]:
            return nn.Conv2d._conv_forward(conv, x, weight, bias)
        return _PackedConv.apply(x, entry["packed"], entry["packed_t"], bias, entry["geo"])

    # -------------------------------------------------------------------------- internals
    @staticmethod
    def _eligible(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> bool:
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
                and weight.dtype == torch.float32 and _dense(x)
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and not weight.requires_grad and (bias is None or not bias.requires_grad)
                and not torch.is_autocast_enabled("cpu"))

    def _entry(self, conv: nn.Conv2d, shape: tuple, weight: torch.Tensor,
               bias: torch.Tensor | None) -> dict:
        packs = self._packs.setdefault(id(conv), {})
        entry = packs.get(shape)
        if entry is not None and entry["conv"]() is conv and entry["sources"].holds((weight, bias)):
            return entry
        if shape not in packs and len(packs) >= _SHAPES_PER_CONV:
            packs.clear()
        geo = _Geometry(conv, shape)
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, geo.padding, geo.stride, geo.dilation, geo.groups, list(shape))
            packed_t = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                weight, geo.padding, geo.output_padding, geo.stride, geo.dilation, geo.groups,
                geo.y_shape)
        # Folded weights are the folding cache's own tensors (replaced, never written, when the
        # model changes): only parameters need a snapshot.
        sources = Unchanged((weight, bias), snapshot=lambda t: isinstance(t, nn.Parameter))
        entry = dict(conv=weakref.ref(conv), sources=sources, packed=packed, packed_t=packed_t,
                     geo=geo)
        packs[shape] = entry
        return entry

    @staticmethod
    @torch.no_grad()
    def _verify(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, entry: dict, rtol: float = 1e-4) -> bool:
        """Packed forward and input gradient against PyTorch's own, on the real input."""
        geo = entry["geo"]
        x = x.detach()
        try:
            ref = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            out = torch.ops.mkldnn._convolution_pointwise(
                x, entry["packed"], bias, geo.padding, geo.stride, geo.dilation, geo.groups,
                "none", [], "")
            grad_y = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
            ref_gx = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, conv.stride, geo.padding, conv.dilation, False,
                [0, 0], conv.groups, [True, False, False])[0]
            gx = torch.ops.mkldnn._convolution_transpose_pointwise(
                grad_y, entry["packed_t"], None, geo.padding, geo.output_padding, geo.stride,
                geo.dilation, geo.groups, "none", [], "")
        except (RuntimeError, TypeError):
            return False
        return all(a.shape == b.shape and bool(
            ((a - b).abs().max() <= rtol * b.abs().max() + 1e-6).item())
            for a, b in ((out, ref), (gx, ref_gx)))


@contextlib.contextmanager
def prepacked_convolutions(model: nn.Module, packer: ConvPacker) -> Iterator[int]:
    """Inside the block every ``nn.Conv2d`` of ``model`` runs through ``packer`` (packed when
    eligible); everything is put back on exit. Yields the number of convolutions routed. A no-op
    (yields 0) when :func:`available` is false."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)] if available() else []
    try:
        for conv in convs:
            conv.__dict__["_conv_forward"] = functools.partial(packer.conv_forward, conv)
        yield len(convs)
    finally:
        for conv in convs:
            conv.__dict__.pop("_conv_forward", None)
