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
bigger than 32 MiB: larger ones go through PyTorch's fused ``scaled_dot_product_attention`` (few
channels) or a chunked, flash-attention-style softmax (:class:`_ChunkedSoftmaxAttention`) whose
backward recomputes each chunk instead of storing it. On CUDA every Gaussian non-local runs
PyTorch's fused flash or memory-efficient kernel (never its math kernel;
:func:`softmax_attention`). The median is a sort-free selection network, the bilateral filter
accumulates 9 shifted views in place. ``featdenoise bench ops`` compares every op with its
straightforward version.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

OP_NAMES = (
    "nonlocal_gaussian",
    "nonlocal_dot",
    "bilateral_gaussian",
    "bilateral_dot",
    "mean",
    "median",
    "null",
)

ATTENTION_BACKENDS = ("auto", "chunked", "sdpa", "materialise")

# Elements of one score chunk [batch, queries, keys] of the chunked backend: 2^22 floats =
# 16 MiB; bigger chunks mean fewer, better-threaded matmuls, smaller ones less memory.
CHUNK_ELEMENTS = 1 << 22
# "auto": PyTorch's fused scaled_dot_product_attention (one kernel, exp-bound) while the value
# channels are few; above, the chunked matmuls (compute-bound, no padding of q and k).
SDPA_MAX_CHANNELS = 64
# "auto": a score tensor [N, L, M] of at most this many elements (32 MiB in float32) is
# materialised at once: chunking cannot save memory that matters there, only add overhead.
MATERIALISE_MAX_ELEMENTS = 1 << 23
_LOG2E = math.log2(math.e)


def _embedding(channels: int) -> nn.Conv2d:
    """Bias-free 1x1 conv ``C -> C/2``, init N(0, 0.01) (official ``embedding_theta/phi``)."""
    conv = nn.Conv2d(channels, max(channels // 2, 1), 1, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return conv


# ---------------------------------------------------------------------------------------------
# Softmax attention without the full score matrix
# ---------------------------------------------------------------------------------------------


def _chunks(n: int, length: int, keys: int, budget: int) -> list[tuple[slice, slice]]:
    """(batch slice, query slice) pairs so that each [nb, nq, keys] chunk has ~budget elements."""
    per_image = length * keys
    if per_image <= budget:  # several whole images per chunk
        nb = max(1, budget // per_image)
        return [(slice(b, min(b + nb, n)), slice(0, length)) for b in range(0, n, nb)]
    nq = max(1, budget // keys)
    return [(slice(b, b + 1), slice(s, min(s + nq, length)))
            for b in range(n) for s in range(0, length, nq)]


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """``softmax(scale * q k^T) v`` over chunks of (batch, queries); backward recomputes.

    Shapes: q ``[N, L, d]``, k ``[N, M, d]``, v ``[N, M, C]`` -> ``[N, L, C]``. Saves only the
    inputs, the output and the per-query log-sum-exp ``[N, L]`` (flash-attention bookkeeping), so
    the extra memory is a few chunks of ``budget`` scores, never ``N x L x M``. Scores are kept
    in base 2 (``log2(e)`` folded into q) because ``exp2`` is about twice as fast as ``exp`` on
    CPU; the result is the same softmax.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, budget: int):
        n, length, _ = q.shape
        qs = (q * (scale * _LOG2E)).contiguous()  # [N, L, d], scores in log2 units
        k, v = k.contiguous(), v.contiguous()  # [N, M, d], [N, M, C]
        kt = k.transpose(1, 2)  # [N, d, M]
        out = v.new_empty(n, length, v.shape[2])  # [N, L, C]
        lse = q.new_empty(n, length)  # [N, L] base-2 log-sum-exp
        for b, s in _chunks(n, length, k.shape[1], budget):
            a = torch.bmm(qs[b, s], kt[b])  # [nb, nq, M] scores
            m = a.amax(-1, keepdim=True)  # [nb, nq, 1]
            a.sub_(m).exp2_()
            z = a.sum(-1, keepdim=True)  # [nb, nq, 1]
            torch.bmm(a, v[b], out=out[b, s]).div_(z)
            lse[b, s] = (m + z.log2()).squeeze(-1)
        ctx.save_for_backward(qs, k, v, out, lse)
        ctx.scale, ctx.budget = scale, budget
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # Autocast (if the backward runs inside it) must not lower the recomputed scores.
        with _autocast_off(grad_out.device.type):
            return _ChunkedSoftmaxAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        qs, k, v, out, lse = ctx.saved_tensors
        n, length, _ = qs.shape
        grad_out = grad_out.to(v.dtype).contiguous()  # [N, L, C]
        delta = (grad_out * out).sum(-1)  # [N, L]: rowsum(dO * O)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [N, d, M], [N, C, M]
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for b, s in _chunks(n, length, k.shape[1], ctx.budget):
            p = torch.baddbmm(-lse[b, s].unsqueeze(-1), qs[b, s], kt[b]).exp2_()  # [nb, nq, M]
            dv[b].baddbmm_(p.transpose(1, 2), grad_out[b, s])
            # dS = P * (dO V^T - delta): gradient w.r.t. the natural-unit scores
            ds = torch.baddbmm(-delta[b, s].unsqueeze(-1), grad_out[b, s], vt[b]).mul_(p)
            torch.bmm(ds, k[b], out=dq[b, s])
            dk[b].baddbmm_(ds.transpose(1, 2), qs[b, s])
        return dq.mul_(ctx.scale), dk.mul_(1.0 / _LOG2E), dv, None, None


def resolve_backend(backend: str, n: int, length: int, keys: int, channels: int,
                    device_type: str = "cpu") -> str:
    """The backend ``auto`` stands for with ``[N, L, d]`` queries, ``[N, M, C]`` values.

    On a CPU: ``materialise`` for small score tensors, ``sdpa`` for few value channels, else
    ``chunked``. On CUDA: always ``sdpa``, which there runs a fused flash or memory-efficient
    kernel (:func:`softmax_attention`).
    """
    if backend != "auto":
        return backend
    if device_type == "cuda":
        return "sdpa"
    if n * length * keys <= MATERIALISE_MAX_ELEMENTS:
        return "materialise"
    return "sdpa" if channels <= SDPA_MAX_CHANNELS else "chunked"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          pad: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on ``[N, L, d]``, ``[N, M, d]``, ``[N, M, C]`` as one
    head; ``pad``: zero-pad q and k to C channels (q k^T unchanged) for kernels that want equal
    head dims."""
    d, c = q.shape[-1], v.shape[-1]
    if pad and d < c:
        q, k = F.pad(q, (0, c - d)), F.pad(k, (0, c - d))
    # fused kernels want unit stride in the channel dim
    q, k, v = (t.contiguous().unsqueeze(1) for t in (q, k, v))  # [N, 1, L or M, *]
    return F.scaled_dot_product_attention(q, k, v, scale=scale).squeeze(1)  # [N, L, C]


# CUDA: which way of calling the fused kernels works, per (device, dtypes, head dims, grad):
# "as_is" (memory-efficient accepts d != C), "pad" (q, k zero-padded to C: flash), "chunked".
_CUDA_PLANS: dict[tuple, str] = {}


def fused_kernels():
    """Context allowing only the fused flash and memory-efficient SDPA kernels: inside it a
    shape they refuse raises instead of silently running the ``[N, L, M]`` math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def _sdpa_cuda(q, k, v, scale: float, budget: int) -> torch.Tensor:
    """Fused SDPA on CUDA, never its math kernel: q/k unpadded when a kernel accepts that (the
    memory-efficient one does; flash wants equal head dims <= 256), else padded, else the chunked
    function with a one-time warning."""
    autocast = _autocast_on("cuda")
    key = (q.device, q.dtype, v.dtype, autocast and torch.get_autocast_dtype("cuda"),
           q.shape[-1], v.shape[-1], torch.is_grad_enabled())
    plan = _CUDA_PLANS.get(key)
    for choice in [plan] if plan else ["as_is", "pad"]:
        if choice == "chunked":
            break
        try:
            with fused_kernels():
                out = _sdpa(q, k, v, scale, pad=choice == "pad")
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            # Only "no fused kernel accepts these inputs" moves on; anything else is real.
            refused = ("no available kernel", "no viable backend")
            if plan is not None or not any(r in str(err).lower() for r in refused):
                raise
            last = err
            continue
        _CUDA_PLANS[key] = choice
        return out
    if plan is None:
        import warnings

        warnings.warn(f"no fused attention kernel accepts head dims q/k {q.shape[-1]}, v "
                      f"{v.shape[-1]} in {q.dtype} on {q.device} ({str(last).splitlines()[0]}); "
                      f"using the chunked attention function", RuntimeWarning, stacklevel=3)
        _CUDA_PLANS[key] = "chunked"
    return _chunked(q, k, v, scale, budget)


def _chunked(q, k, v, scale: float, budget: int) -> torch.Tensor:
    """:class:`_ChunkedSoftmaxAttention` with float32 statistics under autocast.

    Fused kernels keep scores, softmax and log-sum-exp in float32 whatever the input dtype; done
    in bf16, the chunked function's dq/dv would be off by ~10%. So under autocast the inputs go
    in as float32 and autocast is off inside (forward here, backward in the Function), the
    custom_fwd(cast_inputs=float32)/custom_bwd pattern for any device type.
    """
    if _autocast_on(q.device.type):
        with _autocast_off(q.device.type):
            return _ChunkedSoftmaxAttention.apply(q.float(), k.float(), v.float(), scale, budget)
    return _ChunkedSoftmaxAttention.apply(q, k, v, scale, budget)


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` (a no-op context where it is not on)."""
    if _autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      backend: str = "auto", budget: int | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T, dim=-1) v`` (the Gaussian weighting of Eq. 1, ``C = sum_j f``).

    Args:
        q: ``[N, L, d]`` queries (embedded ``x_i``); k: ``[N, M, d]`` keys (embedded ``x_j``);
        v: ``[N, M, C]`` values (``x_j``). Returns ``[N, L, C]``.
        backend: ``auto`` (default, :func:`resolve_backend`): on a CPU ``materialise`` when
            ``N*L*M <= MATERIALISE_MAX_ELEMENTS``, else ``sdpa`` when ``C <= SDPA_MAX_CHANNELS``,
            else ``chunked``; on CUDA ``sdpa``. ``chunked``: exact, memory ``O(budget)`` beyond
            in/outputs, float32 statistics under autocast; ``sdpa``
            (``torch.nn.functional.scaled_dot_product_attention``): on a CPU q and k are
            zero-padded to C channels so its fused kernel applies; on CUDA only the fused flash
            and memory-efficient kernels are allowed (never the math kernel), without padding
            where the kernel accepts it, and the chunked function (one warning) when neither
            accepts the shapes; ``materialise`` (the straightforward ``[N, L, M]`` softmax;
            reference and benchmark baseline).
    """
    backend = resolve_backend(backend, q.shape[0], q.shape[1], k.shape[1], v.shape[2],
                              q.device.type)
    if backend == "chunked":
        return _chunked(q, k, v, scale, budget or CHUNK_ELEMENTS)
    if backend == "sdpa":
        if q.device.type == "cuda":
            return _sdpa_cuda(q, k, v, scale, budget or CHUNK_ELEMENTS)
        return _sdpa(q, k, v, scale, pad=True)
    if backend == "materialise":
        return torch.softmax(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1).bmm(v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                     f"{', '.join(ATTENTION_BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------


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


class Bilateral(nn.Module):
    """Bilateral filter, Eq. (2): the non-local weighting restricted to the 3x3 window Omega(i).

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``. Gaussian: ``softmax_j(theta_i^T phi_j / sqrt(d))``
    over the in-image neighbours j (embedding as in :class:`NonLocal`); dot product:
    ``x_i^T x_j / |Omega(i)|``. Out-of-image neighbours are not part of Omega(i).
    Computed by :class:`_Bilateral3x3` from 9 shifted views (no ``9x`` unfold copy).
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
        return _Bilateral3x3.apply(theta, phi, x, self.softmax, 1.0 / math.sqrt(theta.shape[1]))


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
    one); ``backend`` picks how the
    Gaussian non-local softmax is computed (:func:`softmax_attention`).
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
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 1, bias=False)
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv = nn.Identity()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        if residual:
            nn.init.zeros_(self.bn.weight)

    def extra_repr(self) -> str:
        return f"op={self.op_name!r}, residual={self.residual}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.op(x)))
        return x + y if self.residual else y
