"""Convolutions on weights packed once for oneDNN instead of at every call (CPU, float32).

While only input gradients are computed the weights are frozen, yet PyTorch's CPU convolution
reorders each weight into oneDNN's blocked layout at every call, in the forward and again in the
backward. At small batches the deep layers are bound by reading weights, so this copy is a
sizeable share of a step. Packed weights also make oneDNN return NHWC activations, on which its
kernels run faster (``featdenoise bench attacks`` measures the gain). :meth:`ConvPacker.resolve`
finds (or packs and verifies) the packs of a conv for an input kind, and :meth:`ConvPacker.run`
runs

* forward: the convolution on the packed weight (:func:`featdenoise.accel.onednn.conv`);
* backward (input gradient only; the weights are frozen): the transposed convolution on the same
  weight, packed for that direction (:func:`featdenoise.accel.onednn.conv_transposed`).

The result is the same function up to float rounding. Eligible: a dense float32 CPU input
(NCHW or NHWC) outside autocast; zero padding given as numbers; frozen weight and bias; the
operators present. Each (conv, input kind) is checked once against ``F.conv2d`` and
``aten.convolution_backward`` on the real input before it is used; anything ineligible, refused
by an operator or failing that check runs the normal path.

An input kind is the input's shape without the batch size, and its layout: packs and checks are
shared by every batch size, since attacks that drop broken images from the batch (APGD, FAB,
Square) see a new batch size at almost every image they break. The packed weight's layout does
not depend on the batch size (oneDNN reorders it itself at a call where it would), and a batch
size an operator refuses runs the normal path for that call.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.accel import onednn
from featdenoise.accel.unchanged import Unchanged

_KINDS_PER_CONV = 2  # packs kept per conv (input sizes; the batch size is not part of a kind)


class _Geometry:
    """A conv's padding, stride, dilation and groups as the operators want them, with the
    output shape (packing only) and the transposed convolution's output padding for an input
    shape; all but the output shape hold for any batch size."""

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


def _input_grad(grad_y: torch.Tensor, x_shape, weight: torch.Tensor, geo: _Geometry):
    """PyTorch's own input gradient of a convolution (the reference and the fallback)."""
    return torch.ops.aten.convolution_backward(
        grad_y, torch.empty(x_shape, dtype=grad_y.dtype), weight, None, geo.stride, geo.padding,
        geo.dilation, False, [0, 0], geo.groups, [True, False, False])[0]


class _PackedConv(torch.autograd.Function):
    """``y = conv(x)`` on a packed weight; its backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, packed, packed_t, bias, geo):  # noqa: D102
        ctx.weight, ctx.packed_t, ctx.geo, ctx.x_shape = weight, packed_t, geo, x.shape
        return onednn.conv(x, packed, bias, geo)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        if not (grad_y.is_contiguous() or grad_y.is_contiguous(memory_format=torch.channels_last)):
            grad_y = grad_y.contiguous()
        try:
            grad_x = onednn.conv_transposed(grad_y, ctx.packed_t, ctx.geo)
        except onednn.Unsupported:
            grad_x = _input_grad(grad_y, ctx.x_shape, ctx.weight, ctx.geo)
        return grad_x, None, None, None, None, None


class ConvPacker:
    """Packed weights of one model (shared by every use of it), kept while they are unchanged.

    A pack is keyed on the conv and the input kind (shape without the batch size) and is reused
    only while the weight and bias are the same tensors at the same in-place version; a
    ``nn.Parameter`` must also still equal a snapshot taken at packing (``p.data`` writes bypass
    version counters). Weights that BN folding produced are the folding cache's own tensors,
    which change identity when refolded.
    Memory: two packed copies of each weight (forward and transposed), plus the snapshot of
    parameters that were not folded.
    """

    def __init__(self):
        self._packs: dict[int, dict] = {}  # id(conv) -> {input kind (C, H, W): entry}
        self._checked: dict[tuple, bool] = {}  # (conv, kind, layout, geometry) -> verified
        self.epoch: int | None = None  # snapshots are compared once per epoch (None: always)

    def resolve(self, conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> dict | None:
        """The verified, current pack of ``conv`` for inputs like ``x`` (packed and verified
        on ``x`` if new), or None: run the normal path."""
        if not self._eligible(conv, x, weight, bias):
            return None
        check_key = (id(conv), tuple(x.shape[1:]), x.is_contiguous(), tuple(weight.shape),
                     conv.stride, conv.padding, conv.dilation, conv.groups)
        verified = self._checked.get(check_key)
        if verified is False:
            return None
        try:
            entry = self._entry(conv, tuple(x.shape), weight, bias)
            if verified is None:
                verified = self._checked[check_key] = self._verify(conv, x, weight, bias, entry)
        except onednn.Unsupported:  # missing, or refused this kind: never try again
            self._checked[check_key] = False
            return None
        return entry if verified else None

    @staticmethod
    def run(entry: dict, conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution on ``entry``'s packs (:meth:`resolve`); a batch size an operator
        refuses runs the normal path."""
        try:
            if torch.is_grad_enabled() and x.requires_grad:
                return _PackedConv.apply(x, weight, entry["packed"], entry["packed_t"], bias,
                                         entry["geo"])
            return onednn.conv(x, entry["packed"], bias, entry["geo"])  # no graph needed
        except onednn.Unsupported:
            return nn.Conv2d._conv_forward(conv, x, weight, bias)

    # -------------------------------------------------------------------------- internals
    @staticmethod
    def _eligible(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> bool:
        return (onednn.eligible(x) and weight.dtype == torch.float32
                and weight.device.type == "cpu"
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and not weight.requires_grad and (bias is None or not bias.requires_grad))

    def _entry(self, conv: nn.Conv2d, shape: tuple, weight: torch.Tensor,
               bias: torch.Tensor | None) -> dict:
        """The packs of ``conv`` for inputs of ``shape``'s kind (packed at ``shape`` if new)."""
        packs = self._packs.setdefault(id(conv), {})
        kind = shape[1:]
        entry = packs.get(kind)
        if entry is not None and entry["conv"]() is conv and entry["sources"].holds((weight, bias),
                                                                              self.epoch):
            return entry
        if kind not in packs and len(packs) >= _KINDS_PER_CONV:
            packs.clear()
        geo = _Geometry(conv, shape)
        with torch.no_grad():
            packed = onednn.pack(weight, geo, list(shape))
            packed_t = onednn.pack_transposed(weight, geo)
        # Folded weights are the folding cache's own tensors (replaced, never written, when the
        # model changes): only parameters need a snapshot.
        sources = Unchanged((weight, bias), snapshot=lambda t: isinstance(t, nn.Parameter),
                            epoch=self.epoch or 0)
        entry = dict(conv=weakref.ref(conv), sources=sources, packed=packed, packed_t=packed_t,
                     geo=geo)
        packs[kind] = entry
        return entry

    @staticmethod
    @torch.no_grad()
    def _verify(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, entry: dict, rtol: float = 1e-4) -> bool:
        """Packed forward and input gradient against PyTorch's own, on the real input."""
        geo = entry["geo"]
        x = x.detach()
        ref = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        out = onednn.conv(x, entry["packed"], bias, geo)
        grad_y = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
        ref_gx = _input_grad(grad_y, x.shape, weight, geo)
        gx = onednn.conv_transposed(grad_y, entry["packed_t"], geo)
        return all(a.shape == b.shape and bool(
            ((a - b).abs().max() <= rtol * b.abs().max() + 1e-6).item())
            for a, b in ((out, ref), (gx, ref_gx)))
