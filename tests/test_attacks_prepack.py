"""Packed convolutions for attacks (featdenoise.attacks.prepack) against float64 autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks import PGD
from featdenoise.attacks import prepack as pp
from featdenoise.attacks.base import speed_caches
from featdenoise.models import create_model

pytestmark = pytest.mark.skipif(not pp.available(), reason="this PyTorch build has no oneDNN")

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


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=[f"k{c[2]}s{c[3]}p{c[4]}d{c[5]}g{c[6]}" for c in CONFIGS])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_packed_conv_forward_and_input_gradient_match_float64(cfg, layout):
    cin, cout, k, s, p, d, g, bias, size = cfg
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).requires_grad_(False)
    x = torch.randn(3, cin, size, size)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    packer = pp.ConvPacker()
    with pp.prepacked_convolutions(conv, packer) as routed:
        y = conv(x)
        grad_y = torch.randn_like(y)
        (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert routed == 1 and list(packer._checked.values()) == [True]
    assert "_conv_forward" not in conv.__dict__  # put back on exit

    x64 = x.detach().double().requires_grad_(True)
    w64 = conv.weight.double()
    b64 = conv.bias.double() if bias else None
    y64 = F.conv2d(x64, w64, b64, s, p, d, g)
    (gx64,) = torch.autograd.grad(y64, x64, grad_y.double())
    for ours, ref in ((y, y64), (grad_x, gx64)):
        assert ours.shape == ref.shape
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_packs_follow_every_kind_of_weight_change():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6)
    packer = pp.ConvPacker()

    def packed():
        with pp.prepacked_convolutions(conv, packer):
            return conv(x)

    first = packed()
    entry = packer._packs[id(conv)][tuple(x.shape)]
    assert packed().equal(first) and packer._packs[id(conv)][tuple(x.shape)] is entry
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place: version counter
    assert torch.allclose(packed(), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    conv.bias.data.add_(1.0)  # .data: no version bump, caught by the snapshot
    assert torch.allclose(packed(), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
    conv.weight = nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)  # new tensor
    assert torch.allclose(packed(), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)


def test_ineligible_or_unverified_convs_run_the_normal_path(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 5, 5)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    packer = pp.ConvPacker()
    with pp.prepacked_convolutions(conv.double(), packer):
        conv(x.double())  # float64: not packed
    conv.float()
    trainable = nn.Conv2d(4, 4, 3, padding=1)  # weights that need gradients: not packed
    with pp.prepacked_convolutions(trainable, packer):
        trainable(x)
    assert not any(packer._packs.values())
    monkeypatch.setattr(pp.ConvPacker, "_verify", staticmethod(lambda *a, **k: False))
    with pp.prepacked_convolutions(conv, packer):
        out = conv(x)
    assert out.equal(ref)  # bitwise: PyTorch's own convolution ran
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("this build's operator takes other arguments")

    other = pp.ConvPacker()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", broken)
    with pp.prepacked_convolutions(conv, other):
        assert conv(x).equal(ref)
    assert list(other._checked.values()) == [False]


@pytest.mark.parametrize("name,kwargs,size", [
    ("small_resnet_denoise", dict(in_channels=3, num_classes=10), 28),
    ("resnext101_32x8d_denoise_all", dict(num_classes=10, blocks=[1, 1, 1, 1]), 32),
    ("resnet50_denoise", dict(num_classes=10, blocks=[1, 1, 1, 1], denoise="nonlocal_gaussian"),
     32),
])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_prepacked_attack_gives_the_same_images(name, kwargs, size, fold_bn):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x, y = torch.rand(4, 3, size, size), torch.randint(0, 10, (4,))
    common = dict(steps=3, random_start=True, seed=0, fold_bn=fold_bn)
    plain = PGD(model, **common)(x, y)
    attack = PGD(model, prepack=True, **common)
    packed = attack(x, y)
    checked = speed_caches(model).packer._checked
    assert checked and all(checked.values())
    assert ((packed - plain).abs() <= 1e-6).float().mean() >= 0.999
    assert packed.is_contiguous()
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the attack
    assert not any("_conv_forward" in m.__dict__ for m in model.modules())


def test_attacks_on_one_model_share_its_packs_and_folded_weights():
    """An evaluation builds a new attack per batch: the second must not fold or pack again."""
    torch.manual_seed(0)
    model = create_model("small_resnet", in_channels=3, num_classes=10).eval()
    x, y = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    common = dict(steps=2, random_start=False, seed=0, fold_bn=True, prepack=True)
    first = PGD(model, **common)(x, y)
    caches = speed_caches(model)
    packs = {k: dict(v) for k, v in caches.packer._packs.items()}
    folded = dict(caches.folded)
    assert packs and folded and caches.fold_exact is True
    again = PGD(model, **common)(x, y)
    assert again.equal(first)
    assert all(caches.packer._packs[k][s] is e for k, v in packs.items() for s, e in v.items())
    assert all(caches.folded[k] is e for k, e in folded.items())
