"""CUDA paths checked without a GPU: device placement (meta device, static scan), the fused-SDPA
policy (faked kernels), float32 statistics of the chunked attention under bf16 autocast, the
deterministic median backward, the backend switches, and the non-finite guard of training."""

from __future__ import annotations

import ast
import contextlib
import warnings

import pytest
import torch
from helpers import ROOT

from featdenoise.models import attention, create_model
from featdenoise.models import denoise as dn
from featdenoise.runtime import backends

SRC = ROOT / "src" / "featdenoise"

# ---------------------------------------------------------------------------------------------
# Device placement


@pytest.mark.parametrize("name", dn.OP_NAMES)
def test_every_op_and_backend_runs_on_the_meta_device(name):
    """A tensor created on the CPU inside an op meets meta tensors and raises ("Tensor on
    device cpu is not on the expected device meta"): the ops create everything on x's device."""
    backends_ = dn.ATTENTION_BACKENDS if name.startswith("nonlocal") else ("auto",)
    for backend in backends_:
        kw = {"backend": backend} if name.startswith("nonlocal") else {}
        op = dn.DenoisingBlock(8, op=name, **kw).to("meta")
        x = torch.randn(2, 8, 6, 5, device="meta", requires_grad=True)
        y = op(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert y.device.type == gx.device.type == "meta" and gx.shape == x.shape


def test_chunked_attention_and_deterministic_median_on_the_meta_device():
    q, k, v = (torch.randn(2, 30, c, device="meta", requires_grad=True) for c in (4, 4, 8))
    out = dn.softmax_attention(q, k, v, 0.5, "chunked", budget=40)  # several chunks
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.device.type == "meta" for g in grads)
    x = torch.randn(1, 2, 5, 5, device="meta", requires_grad=True)
    with _deterministic():
        (g,) = torch.autograd.grad(dn.median3x3(x), x, torch.ones(1, 2, 5, 5, device="meta"))
    assert g.device.type == "meta"


def test_denoising_model_forward_and_input_gradient_on_the_meta_device():
    model = create_model("small_resnet_denoise", in_channels=1, width=4).to("meta").eval()
    x = torch.rand(2, 1, 28, 28, device="meta", requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    assert g.device.type == "meta"


# Random draws and tensor factories in the code that runs on the model's device (attacks,
# models, the training losses, viz) must name a device. Known CPU-only ones, with the reason:
_CPU_ON_PURPOSE = {
    ("accel/pack.py", "torch.Generator()"): "oneDNN packing runs on CPUs only",
    ("accel/pack.py", "torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))"):
        "oneDNN packing runs on CPUs only",
    ("accel/pack.py", "torch.empty(x_shape, dtype=grad_y.dtype)"):
        "oneDNN packing runs on CPUs only",
    ("training/parts.py", "torch.rand((), generator=generator)"): "a host-side coin (a bool)",
    ("analysis/viz.py", "torch.Generator()"): "targets drawn on the CPU, then moved to the labels",
    ("analysis/viz.py", "torch.ones(n_rows * cell_h + _GAP, n_cols * cell_w + _GAP, 3)"):
        "the picture's canvas",
}
_FACTORIES = {"Generator", "rand", "randn", "randint", "randperm", "zeros", "ones", "empty",
              "full", "arange", "tensor", "eye", "linspace", "normal", "bernoulli"}


def test_random_draws_and_new_tensors_name_their_device():
    files = [*(SRC / "attacks").glob("*.py"), *(SRC / "accel").glob("*.py"),
             *(SRC / "models").glob("*.py"), SRC / "evaluation" / "engine.py",
             SRC / "training" / "parts.py", SRC / "analysis" / "viz.py"]
    found = []
    for path in sorted(files):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in _FACTORIES
                    and not any(k.arg == "device" for k in node.keywords)
                    and (rel, ast.unparse(node)) not in _CPU_ON_PURPOSE):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "give these a device= (or list them with a reason):\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# Attention: float32 statistics under bf16 autocast, the CUDA kernel policy


def _attention_grads(fn, q, k, v, go, dtype, autocast):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    return [out, *grads]


def test_chunked_attention_keeps_float32_statistics_under_bf16_autocast():
    """bf16 inputs (what a bf16 1x1 conv hands the op) against a float64 reference on the same
    values: float32 statistics give ~0.2% error in dq, dk, dv here; bf16 statistics gave 4-5%
    on these shapes (10-13% on larger ones), fused kernels keep 1-3%."""
    g = torch.Generator().manual_seed(0)
    # bf16-representable inputs: what a bf16 1x1 conv hands the op
    q = (2 * torch.randn(2, 400, 32, generator=g)).bfloat16().float()
    k = (2 * torch.randn(2, 400, 32, generator=g)).bfloat16().float()
    v = torch.randn(2, 400, 64, generator=g).bfloat16().float()
    go = torch.randn(2, 400, 64, generator=g).bfloat16().float()
    ref = _attention_grads(lambda a, b, c: dn.softmax_attention(a, b, c, 0.3, "materialise"),
                           q, k, v, go, torch.float64, False)
    out = _attention_grads(lambda a, b, c: dn.softmax_attention(a, b, c, 0.3, "chunked", 9000),
                           q, k, v, go, torch.bfloat16, True)
    assert out[0].dtype == torch.float32  # computed and returned in float32 under autocast
    for name, r, o in zip(("out", "dq", "dk", "dv"), ref, out, strict=True):
        r = r.detach()
        err = float((o.detach().double() - r).norm() / r.norm())
        assert err < 0.01, (name, err)


def _fake_sdpa(accepts):
    """A stand-in for F.scaled_dot_product_attention that refuses shapes like a fused kernel."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, scale=None):
        if not accepts(q.shape[-1], v.shape[-1]):
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(q.double(), k.double(), v.double(), scale=scale).to(q.dtype)

    return sdpa


def _reference(q, k, v, scale):
    return torch.softmax(q.double() @ k.double().transpose(1, 2) * scale, -1) @ v.double()


def test_cuda_policy_reraises_errors_other_than_a_refused_kernel(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dn.F, "scaled_dot_product_attention", broken)
    monkeypatch.setattr(attention, "fused_kernels", contextlib.nullcontext)
    monkeypatch.setattr(attention, "_CUDA_PLANS", {})
    q = torch.randn(1, 4, 2)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        attention._sdpa_cuda(q, q, torch.randn(1, 4, 4), 0.5, 1 << 20)
    assert attention._CUDA_PLANS == {}


@pytest.mark.parametrize("accepts, plan", [
    (lambda d, c: True, "as_is"),  # memory-efficient: q/k head dim != v head dim is fine
    (lambda d, c: d == c, "pad"),  # flash only: equal head dims
    (lambda d, c: False, "chunked"),  # neither: chunked function, one warning
])
def test_cuda_policy_tries_unpadded_then_padded_then_chunked(monkeypatch, accepts, plan):
    monkeypatch.setattr(dn.F, "scaled_dot_product_attention", _fake_sdpa(accepts))
    monkeypatch.setattr(attention, "fused_kernels", contextlib.nullcontext)
    monkeypatch.setattr(attention, "_CUDA_PLANS", {})
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 20, c, generator=g) for c in (4, 4, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention._sdpa_cuda(q, k, v, 0.5, 1 << 20)
        attention._sdpa_cuda(q, k, v, 0.5, 1 << 20)  # second call: the remembered plan, no warning
    assert list(attention._CUDA_PLANS.values()) == [plan]
    assert len([w for w in caught if "no fused attention kernel" in str(w.message)]) == (
        plan == "chunked")
    torch.testing.assert_close(out.double(), _reference(q, k, v, 0.5), rtol=1e-5, atol=1e-6)


def test_auto_backend_is_fused_sdpa_on_cuda_and_unchanged_on_cpu():
    assert dn.resolve_backend("auto", 8, 3136, 3136, 256, "cuda") == "sdpa"
    assert dn.resolve_backend("auto", 8, 49, 49, 2048, "cuda") == "sdpa"
    assert dn.resolve_backend("auto", 8, 3136, 3136, 256) == "chunked"
    assert dn.resolve_backend("auto", 8, 49, 49, 2048, "cpu") == "materialise"
    assert dn.resolve_backend("chunked", 8, 49, 49, 2048, "cuda") == "chunked"


# ---------------------------------------------------------------------------------------------
# Deterministic mode


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_deterministic_median_backward_equals_the_scatter_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 7, generator=g, dtype=torch.float64)
    x[0, 0, :3, :3] = 0.5  # ties: the first window element in row-major order gets it
    x.requires_grad_()
    go = torch.randint(-8, 8, (2, 3, 9, 7), generator=g).double()  # exact sums in any order
    (a,) = torch.autograd.grad(dn.median3x3(x), x, go)
    with _deterministic():
        (b,) = torch.autograd.grad(dn.median3x3(x), x, go)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_backend_switches_leave_the_cpu_alone_and_set_cuda_flags():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              backends.tf32_enabled())
    precision = (torch.backends.cuda.matmul.fp32_precision,
                 torch.backends.cudnn.conv.fp32_precision)
    try:
        assert backends.configure("cpu", tf32=False) == {"device": "cpu", "deterministic": False}
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                backends.tf32_enabled()) == before
        got = backends.configure(torch.device("cuda", 0), tf32=True)
        assert got["tf32"] and torch.backends.cudnn.benchmark
        assert backends.tf32_enabled() == {"matmul": True, "conv": True}
        with _deterministic():  # restored afterwards
            got = backends.configure("cuda", tf32=True, deterministic=True)
            assert torch.are_deterministic_algorithms_enabled() and backends.deterministic()
        assert not got["tf32"] and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert backends.tf32_enabled() == {"matmul": False, "conv": False}
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.backends.cuda.matmul.fp32_precision = precision[0]
        torch.backends.cudnn.conv.fp32_precision = precision[1]
