"""Denoising ops (paper Sec. 4.2) against slow, obviously-correct references written here.

Non-local and bilateral: explicit Python loops over pixels; mean and median: scipy.ndimage with
the matching border mode. Forward values and gradients are compared (float64, tiny inputs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from featdenoise.models.denoise import (
    OP_NAMES,
    DenoisingBlock,
    build_op,
    median3x3,
    softmax_attention,
    subsample_2x2,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _embed(x, weight):
    """1x1 conv by loops: [N, C, H, W] with weight [d, C, 1, 1] -> [N, d, H, W]."""
    n, _, h, w = x.shape
    pix = [weight[:, :, 0, 0] @ x[b, :, i, j] for b in range(n) for i in range(h)
           for j in range(w)]
    return torch.stack(pix).view(n, h, w, -1).permute(0, 3, 1, 2)


def _pool_keys(t):
    """2x2 max-pool, stride 2, no padding (an odd last row/column dropped; a size-1 dimension
    kept), by loops."""
    _, _, h, w = t.shape
    kh, kw = min(h, 2), min(w, 2)
    rows = []
    for i in range(0, h - kh + 1, kh):
        cols = []
        for j in range(0, w - kw + 1, kw):
            win = t[:, :, i:i + kh, j:j + kw].flatten(2)
            cols.append(win.max(-1).values)
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _nonlocal_ref(x, softmax, theta_w=None, phi_w=None, subsample=False):
    """Eq. (1) by explicit loops over pixels i and j; sub-sampling pools x_j before phi."""
    n, c, h, w = x.shape
    xj = _pool_keys(x) if subsample else x
    theta = _embed(x, theta_w) if theta_w is not None else x
    phi = _embed(xj, phi_w) if phi_w is not None else xj
    g = xj
    keys = [(a, b) for a in range(phi.shape[2]) for b in range(phi.shape[3])]
    d = theta.shape[1]
    rows = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                f = torch.stack([theta[b, :, i, j] @ phi[b, :, p, q] for p, q in keys])
                if softmax:
                    wts = torch.exp(f / math.sqrt(d))
                    wts = wts / wts.sum()
                else:
                    wts = f / len(keys)
                rows.append(sum(wts[t] * g[b, :, p, q] for t, (p, q) in enumerate(keys)))
    return torch.stack(rows).view(n, h, w, c).permute(0, 3, 1, 2)


def _bilateral_ref(x, softmax, theta_w=None, phi_w=None):
    """Eq. (2) by loops: Omega(i) = the in-image pixels of the 3x3 window around i."""
    n, c, h, w = x.shape
    theta = _embed(x, theta_w) if theta_w is not None else x
    phi = _embed(x, phi_w) if phi_w is not None else x
    d = theta.shape[1]
    rows = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                nb = [(p, q) for p in range(i - 1, i + 2) for q in range(j - 1, j + 2)
                      if 0 <= p < h and 0 <= q < w]
                f = torch.stack([theta[b, :, i, j] @ phi[b, :, p, q] for p, q in nb])
                wts = torch.softmax(f / math.sqrt(d), 0) if softmax else f / len(nb)
                rows.append(sum(wts[t] * x[b, :, p, q] for t, (p, q) in enumerate(nb)))
    return torch.stack(rows).view(n, h, w, c).permute(0, 3, 1, 2)


def _grads(fn, x, params):
    out = fn(x)
    upstream = _x(*out.shape, seed=7)
    return out, torch.autograd.grad(out, [x, *params], upstream)


def _check(ours, ref, x, params):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, g1 = _grads(ours, x1, params)
    y2, g2 = _grads(ref, x2, params)
    torch.testing.assert_close(y1, y2, rtol=1e-9, atol=1e-10)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- non-local means (Eq. 1)

@pytest.mark.parametrize("subsample", [False, True])
@pytest.mark.parametrize("backend", ["chunked", "sdpa", "materialise"])
def test_nonlocal_gaussian_matches_loops(subsample, backend):
    op = build_op("nonlocal_gaussian", 6, subsample=subsample, backend=backend)
    assert op.theta.weight.shape == (3, 6, 1, 1) and op.theta.bias is None
    with torch.no_grad():  # larger than the N(0, 0.01) init so the softmax is not uniform
        op.theta.weight.normal_(0, 0.7)
        op.phi.weight.normal_(0, 0.7)
    params = [op.theta.weight, op.phi.weight]
    x = _x(2, 6, 3, 5)
    _check(op, lambda t: _nonlocal_ref(t, True, op.theta.weight, op.phi.weight, subsample),
           x, params)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 40, 3, 3)])  # C <= HW and C > HW
@pytest.mark.parametrize("subsample", [False, True])
def test_nonlocal_dot_matches_loops(shape, subsample):
    op = build_op("nonlocal_dot", shape[1], subsample=subsample)
    assert not list(op.parameters())  # no embedding (Sec. 4.2: "no extra parameters")
    _check(op, lambda t: _nonlocal_ref(t, False, subsample=subsample), _x(*shape), [])


def test_nonlocal_dot_with_embedding_matches_loops():
    op = build_op("nonlocal_dot", 4, embed=True)
    params = [op.theta.weight, op.phi.weight]
    _check(op, lambda t: _nonlocal_ref(t, False, op.theta.weight, op.phi.weight),
           _x(1, 4, 3, 3), params)


def test_gaussian_scale_is_sqrt_of_embedding_channels():
    # d = C/2 (official tf.sqrt(theta.shape[1])): with theta = phi = identity-like embeddings
    # the weights must be softmax(x_i^T x_j / sqrt(C/2)), not / sqrt(C).
    c = 8
    op = build_op("nonlocal_gaussian", c)
    with torch.no_grad():
        op.theta.weight.zero_()
        op.phi.weight.zero_()
        for i in range(c // 2):
            op.theta.weight[i, i] = 1.0
            op.phi.weight[i, i] = 1.0
    x = _x(1, c, 2, 3)
    q = x[0, : c // 2].flatten(1).T  # [HW, d]
    wts = torch.softmax(q @ q.T / math.sqrt(c // 2), -1)
    expected = (wts @ x[0].flatten(1).T).T.reshape(1, c, 2, 3)
    torch.testing.assert_close(op(x), expected)


def test_chunked_attention_gradcheck_across_chunks():
    q, k, v = _x(2, 7, 3, seed=1), _x(2, 5, 3, seed=2), _x(2, 5, 4, seed=3)
    for budget in (4, 12, 35, 1000):  # one query per chunk ... several images per chunk
        args = [t.clone().requires_grad_() for t in (q, k, v)]
        assert torch.autograd.gradcheck(
            lambda a, b, c, n=budget: softmax_attention(a, b, c, 0.4, "chunked", n), args)


def test_chunked_attention_is_stable_for_large_scores():
    q, k, v = _x(1, 6, 4) * 300, _x(1, 6, 4) * 300, _x(1, 6, 3)
    out = softmax_attention(q, k, v, 1.0, "chunked", 8)
    torch.testing.assert_close(out, torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="chunked, sdpa, materialise"):
        build_op("nonlocal_gaussian", 4, backend="fast")


# ---------------------------------------------------------------- sub-sampling (Sec. 6.2)

def _np_pool(x):
    """2x2 max pooling, stride 2, no padding, of [N, C, H, W] (size-1 dimensions kept)."""
    n, c, h, w = x.shape
    kh, kw = min(h, 2), min(w, 2)
    x = x[:, :, : h - h % kh, : w - w % kw]
    return x.reshape(n, c, h // kh, kh, w // kw, kw).max(axis=(3, 5))


def _np_nonlocal(x, softmax, theta_w=None, phi_w=None):
    """Eq. (1) with the x_j side pooled, as array algebra: x^ = pool(x), keys phi(x^),
    values x^, queries theta(x) at full size."""
    n, c, h, w = x.shape
    xj = _np_pool(x)
    q = x.reshape(n, c, h * w) if theta_w is None else np.einsum(
        "dc,nci->ndi", theta_w, x.reshape(n, c, h * w))
    v = xj.reshape(n, c, -1)  # [N, C, M]
    k = v if phi_w is None else np.einsum("dc,ncj->ndj", phi_w, v)
    f = np.einsum("ndi,ndj->nij", q, k)  # [N, HW, M]
    if softmax:
        f = np.exp(f / np.sqrt(q.shape[1]) - (f / np.sqrt(q.shape[1])).max(-1, keepdims=True))
        f = f / f.sum(-1, keepdims=True)
    else:
        f = f / k.shape[2]
    return np.einsum("nij,ncj->nci", f, v).reshape(n, c, h, w)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7), (7, 4), (1, 5)])
@pytest.mark.parametrize("name", ["nonlocal_gaussian", "nonlocal_dot"])
def test_subsampled_nonlocal_matches_numpy_formula(name, hw):
    """Forward against the NumPy formula, input gradient against its finite differences."""
    softmax = name.endswith("gaussian")
    op = build_op(name, 4, subsample=True)
    if softmax:
        with torch.no_grad():
            op.theta.weight.normal_(0, 0.7)
            op.phi.weight.normal_(0, 0.7)
    tw = op.theta.weight[:, :, 0, 0].detach().numpy() if softmax else None
    pw = op.phi.weight[:, :, 0, 0].detach().numpy() if softmax else None
    x = _x(1, 4, *hw).requires_grad_()
    y = op(x)
    assert y.shape == x.shape
    ref = _np_nonlocal(x.detach().numpy(), softmax, tw, pw)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    up = _x(*y.shape, seed=3).numpy()
    (grad,) = torch.autograd.grad(y, x, torch.from_numpy(up))
    x0, eps = x.detach().numpy(), 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):  # central differences of <up, y(x)>
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd[idx] = ((_np_nonlocal(xp, softmax, tw, pw) - _np_nonlocal(xm, softmax, tw, pw))
                   * up).sum() / (2 * eps)
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-5, atol=1e-7)


def test_subsampling_keeps_full_size_queries_and_drops_odd_edges():
    x = _x(1, 2, 5, 7)
    pooled = torch.nn.functional.max_pool2d(x, 2)  # [1, 2, 2, 3]: row 4 and column 6 dropped
    torch.testing.assert_close(subsample_2x2(x), pooled)
    assert subsample_2x2(_x(1, 2, 1, 4)).shape == (1, 2, 1, 2)


# ---------------------------------------------------------------- bilateral (Eq. 2)

@pytest.mark.parametrize("softmax", [True, False])
def test_bilateral_matches_loops(softmax):
    name = "bilateral_gaussian" if softmax else "bilateral_dot"
    op = build_op(name, 4)
    params = []
    if softmax:
        with torch.no_grad():
            op.theta.weight.normal_(0, 0.7)
            op.phi.weight.normal_(0, 0.7)
        params = [op.theta.weight, op.phi.weight]
    ref = (lambda t: _bilateral_ref(t, True, op.theta.weight, op.phi.weight)) if softmax \
        else (lambda t: _bilateral_ref(t, False))
    _check(op, ref, _x(2, 4, 4, 5), params)


def test_bilateral_dot_border_divides_by_in_image_count():
    x = torch.ones(1, 1, 3, 3)
    y = build_op("bilateral_dot", 1)(x)  # f = 1 for every neighbour: sum f / |Omega| = 1
    torch.testing.assert_close(y, torch.ones(1, 1, 3, 3))


# ---------------------------------------------------------------- mean and median

def test_mean_matches_scipy_excluding_padding():
    x = _x(2, 3, 5, 6)
    op = build_op("mean", 3)
    a = x.numpy()
    size = (1, 1, 3, 3)
    num = ndimage.uniform_filter(a, size=size, mode="constant", cval=0.0)
    den = ndimage.uniform_filter(np.ones_like(a), size=size, mode="constant", cval=0.0)
    np.testing.assert_allclose(op(x).numpy(), num / den, rtol=1e-12, atol=1e-12)
    xg = x[:1, :1, :3, :4].clone().requires_grad_()
    assert torch.autograd.gradcheck(op, (xg,))


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 2, 1, 1), (1, 1, 2, 5), (1, 1, 9, 3)])
def test_median_matches_scipy_nearest(shape):
    x = _x(*shape)
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_array_equal(build_op("median", shape[1])(x).numpy(), ref)


def test_median_matches_scipy_with_many_ties():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (2, 2, 7, 8), generator=g).double()
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_array_equal(median3x3(x).numpy(), ref)


@pytest.mark.parametrize("ties", [False, True])
def test_median_gradient_goes_to_exactly_one_median_element(ties):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (1, 1, 4, 5), generator=g).double() if ties else _x(1, 1, 4, 5)
    jac = torch.autograd.functional.jacobian(median3x3, x).reshape(20, 20)  # [out, in]
    y = median3x3(x).flatten()
    for o in range(20):
        nz = jac[o].nonzero().flatten()
        assert len(nz) == 1 and jac[o, nz[0]] == 1.0
        assert x.flatten()[nz[0]] == y[o]
        i, j = divmod(o, 5)
        p, q = divmod(int(nz[0]), 5)
        assert abs(p - i) <= 1 and abs(q - j) <= 1  # inside the 3x3 window


def test_median_gradient_matches_unfold_median_without_ties():
    x = _x(2, 3, 5, 4)
    up = _x(2, 3, 5, 4, seed=9)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (median3x3(x1) * up).sum().backward()
    p = torch.nn.functional.pad(x2, (1, 1, 1, 1), mode="replicate")
    ref = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(2, 3, 5, 4, 9).median(-1).values
    (ref * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------- all ops, the block

@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 7)])
def test_ops_keep_shape_for_odd_sizes(name, hw):
    x = _x(2, 4, *hw)
    kw = {"subsample": True} if name.startswith("nonlocal") else {}
    y = build_op(name, 4, **kw)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", OP_NAMES)
def test_block_is_identity_at_init_and_every_parameter_gets_a_gradient(name):
    block = DenoisingBlock(8, op=name)
    x = _x(2, 8, 5, 5).requires_grad_()
    y = block(x)
    torch.testing.assert_close(y, x)
    with torch.no_grad():
        block.bn.weight.fill_(1.0)  # past init every parameter takes part
        for p in block.op.parameters():
            p.normal_(0, 0.5)
    block(x).square().sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_block_parameter_names_match_the_official_variables():
    keys = set(DenoisingBlock(8).state_dict())
    assert {"op.theta.weight", "op.phi.weight", "conv.weight", "bn.weight", "bn.bias",
            "bn.running_mean", "bn.running_var"} <= keys
    assert DenoisingBlock(8).conv.bias is None
    assert set(DenoisingBlock(8, op="nonlocal_dot").state_dict()) == keys - {
        "op.theta.weight", "op.phi.weight"}


def test_block_without_conv():
    block = DenoisingBlock(4, op="mean", use_conv=False).eval()
    assert not any(n.startswith("conv") for n, _ in block.named_parameters())
    with torch.no_grad():
        block.bn.weight.fill_(2.0)
        block.bn.bias.fill_(0.5)
    x = _x(1, 4, 3, 3)
    expected = x + 2.0 * build_op("mean", 4)(x) / math.sqrt(1 + 1e-5) + 0.5
    torch.testing.assert_close(block(x), expected)


def test_block_without_residual_starts_as_plain_layer():
    block = DenoisingBlock(4, op="null", residual=False).eval()
    assert torch.equal(block.bn.weight, torch.ones(4))  # gamma 0 would output zeros
    x = _x(1, 4, 3, 3)
    expected = torch.nn.functional.conv2d(x, block.conv.weight) / math.sqrt(1 + 1e-5)
    torch.testing.assert_close(block(x), expected)


def test_unknown_op_names_the_valid_ones():
    with pytest.raises(ValueError, match="nonlocal_gaussian.*median.*null"):
        DenoisingBlock(4, op="gaussian_blur")


def test_subsample_only_for_nonlocal():
    with pytest.raises(ValueError, match="non-local"):
        build_op("median", 4, subsample=True)


@pytest.mark.parametrize("softmax", [True, False])
def test_bilateral_gradcheck_without_embedding(softmax):
    op = build_op("bilateral_gaussian" if softmax else "bilateral_dot", 2, embed=False)
    assert torch.autograd.gradcheck(op, (_x(1, 2, 3, 4).requires_grad_(),))


def test_auto_backend_never_materialises_large_score_tensors():
    from featdenoise.models.denoise import MATERIALISE_MAX_ELEMENTS, resolve_backend

    assert resolve_backend("auto", 8, 3136, 3136, 256) == "chunked"  # res2 of a ResNet
    assert resolve_backend("auto", 128, 784, 784, 16) == "sdpa"  # 28 px small net
    assert resolve_backend("auto", 8, 49, 49, 2048) == "materialise"  # 7 px: 19k scores
    assert 8 * 784 * 784 > MATERIALISE_MAX_ELEMENTS // 2  # the threshold stays modest
    assert resolve_backend("chunked", 1, 4, 4, 4) == "chunked"


def test_median_float32_gradient_sums_to_one_per_output():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float32, requires_grad=True)
    y = median3x3(x)
    ref = ndimage.median_filter(x.detach().numpy(), size=(1, 1, 3, 3), mode="nearest")
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    y.transpose(2, 3).sum().backward()  # a non-contiguous upstream gradient
    assert x.grad.sum().item() == y.numel()  # each output passes its gradient 1 on, once


@pytest.mark.parametrize("backend", ["chunked", "sdpa"])
def test_float32_attention_within_1e5_of_float64(backend):
    q, k, v = _x(2, 300, 8, seed=1) * 3, _x(2, 200, 8, seed=2) * 3, _x(2, 200, 16, seed=3)
    up = _x(2, 300, 16, seed=4)
    args64 = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = softmax_attention(*args64, 0.35, "materialise")
    ref_grads = torch.autograd.grad(ref, args64, up)
    args32 = [t.float().requires_grad_() for t in (q, k, v)]
    out = softmax_attention(*args32, 0.35, backend, 5000)
    grads = torch.autograd.grad(out, args32, up.float())
    for a, b in zip((out, *grads), (ref, *ref_grads), strict=True):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5
