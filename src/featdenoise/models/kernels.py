"""Autograd kernels of the 3x3 window ops (paper Sec. 4.2): the bilateral filter (Eq. 2) and
the median filter (Eq. 3), each a ``torch.autograd.Function`` with a hand-written backward.

Both work on shifted views of a padded tensor instead of a ``9x`` unfold copy: the bilateral
filter accumulates its 9 neighbours in place (:func:`bilateral3x3`), the median is a sort-free
min/max selection network (:func:`median3x3`). :mod:`featdenoise.models.denoise` builds the ops
on them; ``featdenoise bench ops`` compares each with its straightforward version.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_OFFSETS = [(dy, dx) for dy in range(3) for dx in range(3)]  # 3x3 window, row-major


class _Bilateral3x3(torch.autograd.Function):
    """Eq. (2) over the in-image 3x3 neighbours, from 9 shifted views of padded tensors.

    Shapes: theta, phi ``[N, d, H, W]``, x ``[N, C, H, W]`` -> ``[N, C, H, W]``. Forward and
    backward accumulate in place over the 9 offsets (no ``9x`` unfold copy, no autograd zero
    buffers per slice); saves the zero-padded phi and x and the ``[N, 9, H, W]`` weights.
    """

    @staticmethod
    def forward(ctx, theta, phi, x, softmax: bool, scale: float):
        n, _, h, w = x.shape
        phi_p, x_p = F.pad(phi, (1, 1, 1, 1)), F.pad(x, (1, 1, 1, 1))  # [N, *, H+2, W+2]
        views = [(slice(dy, dy + h), slice(dx, dx + w)) for dy, dx in _OFFSETS]
        valid = F.pad(x.new_ones(1, 1, h, w), (1, 1, 1, 1))
        valid = torch.cat([valid[..., r, c] for r, c in views], 1)  # [1, 9, H, W] in-image
        f = torch.stack([(theta * phi_p[..., r, c]).sum(1) for r, c in views], 1)  # [N, 9, H, W]
        if softmax:
            wts = (f * scale).masked_fill_(valid == 0, float("-inf")).softmax(1)
        else:  # out-of-image f is 0 (zero padding); divide by |Omega(i)|
            wts = f.div_(valid.sum(1, keepdim=True))
        y = x_p[..., views[0][0], views[0][1]] * wts[:, 0:1]  # [N, C, H, W]
        for i, (r, c) in enumerate(views[1:], 1):
            y.addcmul_(x_p[..., r, c], wts[:, i:i + 1])
        ctx.save_for_backward(theta, phi_p, x_p, wts)
        ctx.softmax, ctx.scale, ctx.views = softmax, scale, views
        ctx.count = valid.sum(1, keepdim=True)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        theta, phi_p, x_p, wts = ctx.saved_tensors
        views = ctx.views
        h, w = gy.shape[-2:]
        dx_p = torch.zeros_like(x_p) if ctx.needs_input_grad[2] else None
        dw = torch.stack([(gy * x_p[..., r, c]).sum(1) for r, c in views], 1)  # [N, 9, H, W]
        if dx_p is not None:
            for i, (r, c) in enumerate(views):
                dx_p[..., r, c].addcmul_(gy, wts[:, i:i + 1])
        if ctx.softmax:  # softmax backward, then the 1/sqrt(d) scale
            df = wts * (dw - (wts * dw).sum(1, keepdim=True)) * ctx.scale
        else:
            df = dw.div_(ctx.count)
        dtheta = torch.zeros_like(theta) if ctx.needs_input_grad[0] else None
        dphi_p = torch.zeros_like(phi_p) if ctx.needs_input_grad[1] else None
        for i, (r, c) in enumerate(views):
            if dtheta is not None:
                dtheta.addcmul_(phi_p[..., r, c], df[:, i:i + 1])
            if dphi_p is not None:
                dphi_p[..., r, c].addcmul_(theta, df[:, i:i + 1])
        inner = (slice(1, h + 1), slice(1, w + 1))
        return (dtheta, None if dphi_p is None else dphi_p[..., inner[0], inner[1]],
                None if dx_p is None else dx_p[..., inner[0], inner[1]], None, None)


def bilateral3x3(theta: torch.Tensor, phi: torch.Tensor, x: torch.Tensor, softmax: bool,
                 scale: float) -> torch.Tensor:
    """Eq. (2) over the in-image 3x3 neighbours ``Omega(i)`` of each pixel, differentiable.

    Shapes: theta, phi ``[N, d, H, W]``, x ``[N, C, H, W]`` -> ``[N, C, H, W]``. Weights
    ``softmax_j(scale * theta_i^T phi_j)`` over ``Omega(i)`` when ``softmax``, else
    ``theta_i^T phi_j / |Omega(i)|`` (4, 6 or 9 neighbours); out-of-image pixels are not in it.
    """
    return _Bilateral3x3.apply(theta, phi, x, softmax, scale)


def _median9(p: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """3x3 medians of a padded ``[..., H+2, W+2]`` tensor -> ``[..., H, W]``, sort-free.

    Sort each vertical triple (3 compare-exchanges), then the median of the 9 values is
    ``med3(max of the 3 lows, med3 of the 3 middles, min of the 3 highs)`` over the 3 columns
    (exact: 18 ``torch.minimum`` / ``torch.maximum`` calls, no sort, no 9x copy).
    """
    a, b, c = p[..., 0:h, :], p[..., 1:h + 1, :], p[..., 2:h + 2, :]  # [..., H, W+2]
    mn, mx = torch.minimum, torch.maximum  # out= reuses buffers: few live temporaries
    lo, hi = mn(a, b), mx(a, b)
    mid = mn(hi, c)
    mx(hi, c, out=hi)
    t = mn(lo, mid)
    mx(lo, mid, out=mid)
    lo = t
    c0, c1, c2 = slice(0, w), slice(1, w + 1), slice(2, w + 2)
    max_lo = mx(lo[..., c0], lo[..., c1])
    mx(max_lo, lo[..., c2], out=max_lo)
    del lo, t
    min_hi = mn(hi[..., c0], hi[..., c1])
    mn(min_hi, hi[..., c2], out=min_hi)
    del hi
    m0, m1, m2 = mid[..., c0], mid[..., c1], mid[..., c2]
    med_mid = mn(mx(m0, m1), m2)
    mx(med_mid, mn(m0, m1), out=med_mid)
    del mid, m0, m1, m2
    out = mn(mx(max_lo, med_mid), min_hi)
    return mx(out, mn(max_lo, med_mid), out=out)


class _Median3x3(torch.autograd.Function):
    """3x3 median of a padded ``[N, C, H+2, W+2]`` tensor; the gradient goes to one element.

    Backward finds, for every output, the first window element (row-major) equal to the median
    and scatters the output gradient to it: exactly one element per output, also with ties.
    Saves the padded input and the output only (no 9x unfold, no int64 indices in forward).
    """

    @staticmethod
    def forward(ctx, p):
        h, w = p.shape[-2] - 2, p.shape[-1] - 2
        out = _median9(p, h, w)
        ctx.save_for_backward(p, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        p, out = ctx.saved_tensors
        h, w = out.shape[-2:]
        wp = w + 2
        # which: index 0..8 (row-major in the window) of the first element equal to the median
        which = torch.full(out.shape, 8, dtype=torch.uint8, device=out.device)
        for i in range(7, -1, -1):
            dy, dx = divmod(i, 3)
            which.masked_fill_(p[..., dy:dy + h, dx:dx + w] == out, i)
        if torch.are_deterministic_algorithms_enabled():
            # index_add_ accumulates with atomics on GPUs (order-dependent sums); instead add
            # the 9 window positions one after the other: the same sums in a fixed order.
            grad_p = torch.zeros(p.shape, dtype=grad_out.dtype, device=grad_out.device)
            for i in range(9):
                dy, dx = divmod(i, 3)
                grad_p[..., dy:dy + h, dx:dx + w].add_(grad_out.masked_fill(which != i, 0))
            return grad_p
        lut = torch.tensor([dy * wp + dx for dy in range(3) for dx in range(3)],
                           dtype=torch.int32 if p.numel() < 2**31 else torch.int64,
                           device=out.device)
        # flat index into p of each output's median element, built in place: [N*C, H, W]
        index = lut[which.long()].view(-1, h, w)
        ar = partial(torch.arange, dtype=lut.dtype, device=out.device)
        index.add_(ar(index.shape[0]).view(-1, 1, 1) * ((h + 2) * wp))
        index.add_(ar(h).view(1, -1, 1) * wp).add_(ar(w).view(1, 1, -1))
        grad_p = torch.zeros(p.numel(), dtype=grad_out.dtype, device=grad_out.device)
        grad_p.index_add_(0, index.flatten(), grad_out.flatten())
        return grad_p.view(p.shape)


def median3x3(x: torch.Tensor) -> torch.Tensor:
    """Exact 3x3 median per channel of ``[N, C, H, W]`` (replicate padding), same shape.

    A sort-free min/max selection network (:func:`_median9`); differentiable, the whole gradient
    of each output goes to exactly one input element whose value is the median (with ties: the
    first in row-major window order), like ``torch.median``'s gradient.
    """
    return _Median3x3.apply(F.pad(x, (1, 1, 1, 1), mode="replicate"))

