"""Softmax attention without the full score matrix: the Gaussian non-local's weighting (paper
Sec. 4.2, Eq. 1 with ``f = exp(theta^T phi / sqrt(d))``, ``C(x) = sum_j f``).

:func:`softmax_attention` computes ``softmax(scale * q k^T) v`` for ``[N, L, d]`` queries,
``[N, M, d]`` keys and ``[N, M, C]`` values by one of :data:`ATTENTION_BACKENDS`; ``auto``
(:func:`resolve_backend`) picks per shape and device. This module owns those backends: the
straightforward ``[N, L, M]`` softmax, PyTorch's fused ``scaled_dot_product_attention`` (on CUDA
only its flash and memory-efficient kernels, :func:`fused_kernels`, never the math kernel), and
a chunked, flash-attention-style autograd function (:class:`_ChunkedSoftmaxAttention`) whose
backward recomputes each chunk instead of storing it. :mod:`featdenoise.models.denoise` builds
the op on it.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

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
        warnings.warn(f"no fused attention kernel accepts head dims q/k {q.shape[-1]}, v "
                      f"{v.shape[-1]} in {q.dtype} on {q.device} ({str(last).splitlines()[0]}); "
                      f"using the chunked attention function", RuntimeWarning, stacklevel=3)
        _CUDA_PLANS[key] = "chunked"
    return _chunked(q, k, v, scale, budget)


def _chunked(q, k, v, scale: float, budget: int) -> torch.Tensor:
    """:class:`_ChunkedSoftmaxAttention` with float32 statistics under autocast.

    Fused kernels keep scores, softmax and log-sum-exp in float32 whatever the input dtype; done
    in bf16, the chunked function's dq/dv would be far less accurate. So under autocast the
    inputs go in as float32 and autocast is off inside (forward here, backward in the
    Function), the custom_fwd(cast_inputs=float32)/custom_bwd pattern for any device type.
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
