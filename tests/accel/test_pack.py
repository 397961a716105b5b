"""Packed convolutions (featdenoise.accel.pack, .onednn) against float64 autograd, and every way
the private operators can fail falling back to PyTorch's own convolution."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.accel import caches, inference_grad, onednn
from featdenoise.attacks import PGD
from featdenoise.models import create_model

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")

# (in, out, kernel, stride, padding, dilation, groups, bias, size)
CONFIGS = [
    (3, 16, 7, 2, 0, 1, 1, False, 23),   # stem-like, odd size, stride 2
    (16, 32, 1, 1, 0, 1, 1, False, 9),   # 1x1
    (16, 32, 1, 2, 0, 1, 1, True, 9),    # strided 1x1 shortcut, bias
    (16, 16, 3, 1, 1, 1, 1, True, 8),    # 3x3 same
    (16, 16, 3, 2, 1, 1, 1, False, 8),   # 3x3 stride 2, even size
    (32, 32, 3, 1, 2, 2, 1, False, 10),  # dilated
    (64, 64, 3, 1, 1, 1, 32, False, 6),  # grouped (ResNeXt)
]


def frozen_conv(*args, **kwargs) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(*args, **kwargs).eval()


def forward_and_grad(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor | None = None):
    x = x.detach().requires_grad_(True)
    y = model(x)
    grad_y = torch.ones_like(y) if grad_y is None else grad_y
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    return y.detach(), grad_x


@needs_onednn
@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=[f"k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}" for c in CONFIGS])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_packed_conv_forward_and_input_gradient_match_float64(cfg, layout):
    cin, cout, k, s, p, d, g, bias, size = cfg
    conv = frozen_conv(cin, cout, k, s, p, d, g, bias=bias)
    x = torch.randn(3, cin, size, size)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(F.conv2d(x, conv.weight, conv.bias, s, p, d, g).shape)
    with inference_grad(conv):
        y, grad_x = forward_and_grad(conv, x, grad_y)
    assert list(caches(conv).packer._checked.values()) == [True]
    assert not conv.__dict__.get("_conv_forward") and "forward" not in conv.__dict__

    x64 = x.detach().double().requires_grad_(True)
    y64 = F.conv2d(x64, conv.weight.double(), conv.bias.double() if bias else None, s, p, d, g)
    (gx64,) = torch.autograd.grad(y64, x64, grad_y.double())
    for ours, ref in ((y, y64), (grad_x, gx64)):
        assert ours.shape == ref.shape
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_onednn
def test_packs_follow_every_kind_of_weight_change():
    conv = frozen_conv(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)

    def packed():
        with inference_grad(conv), torch.no_grad():
            return conv(x)

    def ref():
        return F.conv2d(x, conv.weight, conv.bias, padding=1)

    first = packed()
    packs = caches(conv).packer._packs[id(conv)]
    entry = packs[tuple(x.shape[1:])]
    assert packed().equal(first) and packs[tuple(x.shape[1:])] is entry
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place: version counter
    assert torch.allclose(packed(), ref(), atol=1e-5)
    conv.bias.data.add_(1.0)  # .data: no version bump, caught by the snapshot
    assert torch.allclose(packed(), ref(), atol=1e-5)
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))  # a new tensor
    assert torch.allclose(packed(), ref(), atol=1e-5)


@needs_onednn
def test_weight_changes_inside_one_block_are_followed():
    """Inside one block each conv call reuses what its first call resolved to: any change of a
    weight (in place, a new tensor, unfrozen) must still be seen at the next call."""
    conv = frozen_conv(8, 8, 3, padding=1, bias=True)
    x = torch.randn(2, 8, 6, 6)

    def ref():
        return F.conv2d(x, conv.weight, conv.bias, padding=1)

    with inference_grad(conv):
        with torch.no_grad():
            first = conv(x)
            assert torch.allclose(first, ref(), atol=1e-5)
            conv.weight.mul_(2.0)  # in place
            assert torch.allclose(conv(x), ref(), atol=1e-5)
            conv.bias = nn.Parameter(torch.randn_like(conv.bias), requires_grad=False)  # new
            assert torch.allclose(conv(x), ref(), atol=1e-5)
        conv.weight.requires_grad_(True)  # weight gradients wanted after all: normal path
        conv(x).sum().backward()
    assert conv.weight.grad is not None
    assert torch.allclose(conv.weight.grad, F.conv2d(
        x.transpose(0, 1), torch.ones(2, 8, 6, 6).transpose(0, 1), padding=1).transpose(0, 1),
        atol=1e-4)


@needs_onednn
def test_one_kind_in_other_layouts_and_under_autocast_inside_one_block():
    """What a conv call resolved to is reused only for inputs it holds for: a strided view,
    autocast or an unbatched image of the same size run the normal path, with its result."""
    class Twice(nn.Module):
        """The same conv on the same input, then again under autocast, in one forward."""

        def __init__(self):
            super().__init__()
            self.conv = frozen_conv(8, 8, 3, padding=1)

        def forward(self, x):
            first = self.conv(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return first, self.conv(x)

    model = Twice().eval()
    conv = model.conv
    x = torch.randn(2, 8, 6, 6)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 8, 6, 12)[..., ::2]  # neither NCHW nor NHWC
    with inference_grad(model), torch.no_grad():
        for inp in (nhwc, strided, x, x[0]):
            first, second = model(inp)
            assert torch.allclose(first, F.conv2d(inp, conv.weight, conv.bias, padding=1),
                                  atol=1e-5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = F.conv2d(inp, conv.weight, conv.bias, padding=1)
            assert second.dtype == torch.bfloat16 and second.equal(ref)


@needs_onednn
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[6]],
                         ids=["stem", "3x3s2", "grouped"])
def test_one_pack_and_one_check_serve_every_batch_size(cfg, monkeypatch):
    """Attacks that drop broken images see a new batch size at almost every step: the pack and
    check of the first batch are reused, and every batch size still matches float64."""
    cin, cout, k, s, p, d, g, bias, size = cfg
    conv = frozen_conv(cin, cout, k, s, p, d, g, bias=bias)
    packer = caches(conv).packer
    calls = {"pack": 0, "verify": 0}
    real_pack, real_verify = onednn.pack, packer._verify

    def counting_pack(*args):
        calls["pack"] += 1
        return real_pack(*args)

    def counting_verify(*args):
        calls["verify"] += 1
        return real_verify(*args)

    monkeypatch.setattr(onednn, "pack", counting_pack)
    monkeypatch.setattr(packer, "_verify", counting_verify)
    for n in (8, 1, 3, 17, 8):
        x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
        grad_y = torch.randn(F.conv2d(x, conv.weight, conv.bias, s, p, d, g).shape)
        with inference_grad(conv):
            y, grad_x = forward_and_grad(conv, x, grad_y)
        x64 = x.detach().double().requires_grad_(True)
        y64 = F.conv2d(x64, conv.weight.double(), conv.bias.double() if bias else None, s, p, d,
                       g)
        (gx64,) = torch.autograd.grad(y64, x64, grad_y.double())
        for ours, ref in ((y, y64), (grad_x, gx64)):
            assert ours.shape == ref.shape
            assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert calls == {"pack": 1, "verify": 1}
    assert list(packer._checked.values()) == [True]
    assert list(packer._packs[id(conv)]) == [(cin, size, size)]


def test_ineligible_inputs_run_the_normal_path():
    """float64, bf16 autocast, trainable weights: PyTorch's own convolution, bitwise."""
    conv = frozen_conv(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    with inference_grad(conv.double()), torch.no_grad():
        out64 = conv(x.double())
    assert out64.equal(F.conv2d(x.double(), conv.weight, conv.bias, padding=1))
    conv.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = conv(x)
        with inference_grad(conv):
            out = conv(x)
    assert out.dtype == torch.bfloat16 and out.equal(ref)
    with inference_grad(conv):
        conv.weight.requires_grad_(True)  # someone wants weight gradients inside: honoured
        y = conv(x)
        y.sum().backward()
    assert conv.weight.grad is not None and y.equal(conv(x))
    assert not any(caches(conv).packer._packs.values())


class _FakeOps(types.SimpleNamespace):
    """A ``torch.ops.mkldnn`` stand-in: some operators missing or raising."""


def _mkldnn_like(**overrides):
    real = torch.ops.mkldnn
    ops = {name: getattr(real, name) for name in onednn._OPS if hasattr(real, name)}
    ops.update(overrides)
    return _FakeOps(**{k: v for k, v in ops.items() if v is not None})


def _refuse(*args, **kwargs):
    raise RuntimeError("mkldnn: this shape is not supported")


@pytest.mark.parametrize("case", ["no_namespace", "missing_op", "refuses_pack",
                                  "refuses_forward", "refuses_backward"])
def test_operator_failures_fall_back_to_the_same_result(monkeypatch, case):
    """A torch without the operators, or operators refusing the call (pack, forward or input
    gradient): the normal path, same forward and input gradient as PyTorch's own."""
    conv = frozen_conv(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    ref = forward_and_grad(conv, x)
    fakes = {
        "no_namespace": None,
        "missing_op": _mkldnn_like(_convolution_transpose_pointwise=None),
        "refuses_pack": _mkldnn_like(_reorder_convolution_weight=_refuse),
        "refuses_forward": _mkldnn_like(_convolution_pointwise=_refuse),
        "refuses_backward": _mkldnn_like(_convolution_transpose_pointwise=_refuse),
    }
    monkeypatch.setattr(onednn, "_ops", lambda: fakes[case])
    if case in ("no_namespace", "missing_op"):
        assert not onednn.available()
    with inference_grad(conv):
        out = forward_and_grad(conv, x)
        again = forward_and_grad(conv, x)
    for ours in (out, again):
        assert torch.allclose(ours[0], ref[0], atol=1e-5)
        assert torch.allclose(ours[1], ref[1], atol=1e-5)
    if case in ("no_namespace", "missing_op"):
        assert ours[0].equal(ref[0]) and ours[1].equal(ref[1])  # never even tried
    if case in ("refuses_pack", "refuses_forward"):
        assert ours[0].equal(ref[0])  # PyTorch's own convolution ran
        assert list(caches(conv).packer._checked.values()) == [False]


@needs_onednn
def test_an_input_gradient_refused_after_verification_falls_back(monkeypatch):
    conv = frozen_conv(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    ref = forward_and_grad(conv, x)
    with inference_grad(conv):
        forward_and_grad(conv, x)  # verified and packed
        monkeypatch.setattr(onednn, "_ops", lambda: _mkldnn_like(
            _convolution_transpose_pointwise=_refuse))
        out = forward_and_grad(conv, x)
    assert list(caches(conv).packer._checked.values()) == [True]
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1], ref[1], atol=1e-5)


@needs_onednn
def test_unverified_packs_are_not_used(monkeypatch):
    conv = frozen_conv(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    monkeypatch.setattr(type(caches(conv).packer), "_verify",
                        staticmethod(lambda *a, **k: False))
    with inference_grad(conv), torch.no_grad():
        assert conv(x).equal(ref)  # bitwise: PyTorch's own convolution ran


def test_cuda_and_other_devices_are_never_packed():
    assert not onednn.eligible(torch.empty(2, 3, 8, 8, device="meta"))
    assert not onednn.eligible(torch.empty(2, 3, 8, 8, dtype=torch.float16))
    assert onednn.eligible(torch.empty(2, 3, 8, 8))
    if torch.cuda.is_available():
        model = create_model("small_resnet", in_channels=3, num_classes=10).cuda().eval()
        x = torch.rand(4, 3, 28, 28, device="cuda")
        ref = forward_and_grad(model, x)
        with inference_grad(model):
            out = forward_and_grad(model, x)
        assert not any(caches(model).packer._packs.values())
        assert torch.allclose(out[0], ref[0], atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("name,kwargs,size", [
    ("small_resnet_denoise", dict(in_channels=3, num_classes=10), 28),
    ("resnext101_32x8d_denoise_all", dict(num_classes=10, blocks=[1, 1, 1, 1]), 32),
    ("resnet50_denoise", dict(num_classes=10, blocks=[1, 1, 1, 1], denoise="nonlocal_gaussian"),
     32),
])
def test_accelerated_attack_gives_the_same_images(name, kwargs, size):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x, y = torch.rand(4, 3, size, size), torch.randint(0, 10, (4,))
    common = dict(steps=3, random_start=True, seed=0)
    exact = PGD(model, exact=True, **common)(x, y)
    fast = PGD(model, **common)(x, y)
    checked = caches(model).packer._checked
    assert checked and all(checked.values())
    assert ((fast - exact).abs() <= 1e-6).float().mean() >= 0.999
    assert fast.is_contiguous()
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the attack
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "_conv_forward"))


@needs_onednn
def test_attacks_on_one_model_share_its_packs_and_folded_weights():
    """An evaluation builds a new attack per batch: the second must not fold or pack again."""
    torch.manual_seed(0)
    model = create_model("small_resnet", in_channels=3, num_classes=10).eval()
    x, y = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    common = dict(steps=2, random_start=False, seed=0)
    first = PGD(model, **common)(x, y)
    c = caches(model)
    packs = {k: dict(v) for k, v in c.packer._packs.items()}
    folded = dict(c.folds._entries)
    assert packs and folded and all(c.verified.values())
    again = PGD(model, **common)(x, y)
    assert again.equal(first)
    assert all(c.packer._packs[k][s] is e for k, v in packs.items() for s, e in v.items())
    assert all(c.folds._entries[k] is e for k, e in folded.items())
