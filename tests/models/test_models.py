"""Networks: every registered model, TF "SAME" padding, placements, initialisation, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.models import DenoisingBlock, create_model, list_models
from featdenoise.models.registry import model_defaults, model_from_metadata, model_metadata
from featdenoise.models.resnet import (
    NUM_BLOCKS,
    Bottleneck,
    OfficialNormalize,
    SameConv2d,
    SameMaxPool2d,
    same_padding,
)
from featdenoise.models.small import BasicBlock

SMALL = [n for n in list_models() if n.startswith("small")]
IMAGENET = [n for n in list_models() if not n.startswith("small")]


def tiny(name: str, **kw) -> nn.Module:
    """The named model with one block per stage (fast enough for CPU tests)."""
    blocks = [1, 1, 1] if name.startswith("small") else [1, 1, 1, 1]
    return create_model(name, **{"blocks": blocks, **kw})


# ---------------------------------------------------------------- every model in the registry

def _distinct_configs() -> list[str]:
    """One name per distinct architecture: with tiny ``blocks`` resnet50/101/152 coincide."""
    seen, names = set(), []
    for name in list_models():
        key = repr(sorted((k, v) for k, v in model_defaults(name).items() if k != "blocks"))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


@pytest.mark.parametrize("name", list_models())
def test_every_name_builds_its_depth(name):
    depth = {"resnet50": 50, "resnet101": 101, "resnet152": 152, "resnext101": 101}
    defaults = model_defaults(name)
    for prefix, d in depth.items():
        if name.startswith(prefix + "_") or name == prefix:
            assert defaults["blocks"] == NUM_BLOCKS[d]
    suffix = {"_denoise": "stages", "_denoise_all": "all", "_denoise_all_gaussian": "all",
              "_bottleneck": "bottleneck"}
    expected = next((p for s, p in suffix.items() if name.endswith(s)), "none")
    assert defaults["placement"] == expected


@pytest.mark.parametrize("name", _distinct_configs())
def test_forward_backward_every_parameter(name):
    torch.manual_seed(0)
    small = name.startswith("small")
    model = tiny(name, num_classes=7).train()
    # Zero-initialised gammas (last BN of each branch, denoising BN) block the gradient to the
    # layers before them; give every BN a non-zero gamma so each parameter must receive one.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    size = 32 if small else 64
    if name.endswith("_denoise_all_gaussian"):  # res5 pooled to one key: a constant softmax,
        size *= 2  # so theta/phi would get no gradient; twice the size gives 2x2 keys
    x = torch.rand(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert model.num_classes == 7
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", SMALL)
def test_small_nets_gray_28px(name):
    model = create_model(name, in_channels=1, width=8, blocks=[1, 2, 1]).eval()
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_imagenet_any_size_and_224():
    model = tiny("resnet50_denoise").eval()
    for size in (33, 50, 224):
        with torch.no_grad():
            assert model(torch.rand(1, 3, size, size)).shape == (1, 1000)


# ---------------------------------------------------------------- TF "SAME" padding

# Independent reference: TF's documented values. Output = ceil(n / s); pads (top, bottom).
TF_SAME = [
    # (size, kernel, stride, (before, after))
    (224, 7, 2, (2, 3)),  # conv0 on ImageNet: 112 out
    (112, 3, 2, (0, 1)),  # stem max-pool
    (56, 3, 2, (0, 1)),  # strided 3x3 of res3
    (7, 3, 2, (1, 1)),  # odd size: symmetric
    (64, 7, 2, (2, 3)),
    (15, 7, 2, (3, 3)),
    (56, 1, 2, (0, 0)),  # strided 1x1 shortcut: no padding
    (10, 3, 1, (1, 1)),
    (10, 4, 1, (1, 2)),  # even kernel, stride 1: the odd pixel goes after
]


@pytest.mark.parametrize("size,k,s,pads", TF_SAME)
def test_same_padding_matches_tf_values(size, k, s, pads):
    assert same_padding(size, k, s) == pads


def _loop_conv_tf_same(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Slow reference: TF SAME conv of [C, H, W] with [O, C, k, k] by explicit index loops.

    Padding by TF's definition: out = ceil(n / s), pad_total = max((out-1)*s + k - n, 0),
    pad_top = pad_total // 2; out-of-range input pixels count as 0.
    """
    c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = math.ceil(h / stride), math.ceil(wd / stride)
    top = max((oh - 1) * stride + k - h, 0) // 2
    left = max((ow - 1) * stride + k - wd, 0) // 2
    out = np.zeros((o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            for di in range(k):
                for dj in range(k):
                    r, q = i * stride + di - top, j * stride + dj - left
                    if 0 <= r < h and 0 <= q < wd:
                        out[:, i, j] += w[:, :, di, dj] @ x[:, r, q]
    return out


@pytest.mark.parametrize("size,k,s", [(8, 3, 2), (9, 3, 2), (10, 7, 2), (7, 7, 2), (6, 3, 1),
                                      (6, 1, 2)])
def test_same_conv_against_loop_reference(size, k, s):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, k, s).double()
    x = torch.randn(1, 2, size, size + 1, dtype=torch.float64)
    ours = conv(x)[0].detach().numpy()
    ref = _loop_conv_tf_same(x[0].numpy(), conv.weight.detach().numpy(), s)
    assert ours.shape == ref.shape == (3, math.ceil(size / s), math.ceil((size + 1) / s))
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [8, 9, 112])
def test_same_max_pool_ignores_padding(size):
    # All-negative input: zero padding would win at the border; TF's SAME pool never does.
    x = -1 - torch.rand(1, 2, size, size, dtype=torch.float64)
    ours = SameMaxPool2d(3, 2)(x)[0].numpy()
    n = x.shape[-1]
    out = math.ceil(n / 2)
    top = max((out - 1) * 2 + 3 - n, 0) // 2
    ref = np.full((2, out, out), -np.inf)
    xn = x[0].numpy()
    for i in range(out):
        for j in range(out):
            for di in range(3):
                for dj in range(3):
                    r, q = i * 2 + di - top, j * 2 + dj - top
                    if 0 <= r < n and 0 <= q < n:
                        ref[:, i, j] = np.maximum(ref[:, i, j], xn[:, r, q])
    np.testing.assert_array_equal(ours, ref)


def test_strided_layers_use_tf_padding():
    model = tiny("resnet50")
    assert isinstance(model.conv0.conv, SameConv2d) and model.conv0.conv.stride == (2, 2)
    assert isinstance(model.pool0, SameMaxPool2d)
    # the stride sits on the 3x3 conv of the bottleneck, not on the first 1x1
    block = model.group1.block0
    assert block.conv1.conv.stride == (1, 1)
    assert block.conv2.conv.stride == (2, 2) and isinstance(block.conv2.conv, SameConv2d)
    assert block.convshortcut.conv.stride == (2, 2)


# ---------------------------------------------------------------- placements and structure

def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("base,blocks", [("resnet50", [2, 3, 1, 1]), ("small_resnet", [2, 1, 3])])
def test_placements_block_counts(base, blocks):
    n_stages = len(blocks)
    block_kind = BasicBlock if base.startswith("small") else Bottleneck
    plain = create_model(base, blocks=blocks)
    assert _count(plain, DenoisingBlock) == 0
    assert _count(create_model(base + "_denoise", blocks=blocks), DenoisingBlock) == n_stages
    assert _count(create_model(base + "_denoise_all", blocks=blocks), DenoisingBlock) == sum(
        blocks)
    control = create_model(base + "_bottleneck", blocks=blocks)
    assert _count(control, DenoisingBlock) == 0
    assert _count(control, block_kind) == _count(plain, block_kind) + n_stages


def test_feature_module_names():
    stages = tiny("resnet50_denoise").feature_modules()
    assert list(stages) == ["res2", "res2_denoise", "res3", "res3_denoise", "res4",
                            "res4_denoise", "res5", "res5_denoise"]
    assert all(isinstance(stages[f"res{k}_denoise"], DenoisingBlock) for k in range(2, 6))
    every = create_model("resnet50_denoise_all", blocks=[2, 1, 1, 1]).feature_modules()
    assert list(every)[:3] == ["res2_block0_denoise", "res2_block1_denoise", "res2"]
    assert sum(k.endswith("_denoise") for k in every) == 5
    small = tiny("small_resnet_denoise").feature_modules()
    assert list(small) == ["stage1", "stage1_denoise", "stage2", "stage2_denoise", "stage3",
                           "stage3_denoise"]
    assert list(tiny("small_resnet").feature_modules()) == ["stage1", "stage2", "stage3"]


def test_feature_modules_see_the_denoised_maps():
    model = tiny("small_resnet_denoise").eval()
    seen = {}
    for name, mod in model.feature_modules().items():
        mod.register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.shape}))
    model(torch.rand(2, 3, 32, 32))
    assert seen["stage1"] == seen["stage1_denoise"] == (2, 16, 32, 32)
    assert seen["stage3_denoise"] == (2, 64, 8, 8)


def test_variant_defaults_and_denoise_kwarg():
    r152 = create_model("resnet152_denoise", blocks=[1, 1, 1, 1])
    op = r152.group0_denoise.op
    assert hasattr(op, "theta") and hasattr(op, "phi")  # Gaussian non-local with embedding
    x101 = tiny("resnext101_32x8d_denoise_all")
    assert not any(True for _ in x101.group0.block0.non_local.op.parameters())  # dot, no embed
    mean = create_model("small_resnet_denoise", denoise="mean")
    assert not any(True for _ in mean.stage1_denoise.op.parameters())
    assert len(create_model("small_resnet", blocks=[1, 4, 2]).stage2) == 4


def test_r152_all_denoise_is_the_papers_table2_row():
    """Sec. 6.2: non-local Gaussian after every residual block, x_j 2x2 max-pooled."""
    defaults = model_defaults("resnet152_denoise_all_gaussian")
    assert defaults["blocks"] == NUM_BLOCKS[152] and defaults["placement"] == "all"
    model = create_model("resnet152_denoise_all_gaussian", blocks=[2, 1, 1, 1])
    blocks = [m for m in model.modules() if isinstance(m, DenoisingBlock)]
    assert len(blocks) == 5
    for block in blocks:
        assert block.op_name == "nonlocal_gaussian"
        assert block.op.softmax and block.op.embed and block.op.subsample
    x101 = tiny("resnext101_32x8d_denoise_all")  # the official model keeps its dot op
    for block in (m for m in x101.modules() if isinstance(m, DenoisingBlock)):
        assert not block.op.softmax and not block.op.embed and not block.op.subsample


def test_r152_all_denoise_runs_at_224():
    """The +all denoise network end to end at ImageNet size (2 blocks per stage to stay fast);
    the keys of the Gaussian op are the pooled maps: 28, 14, 7 and 3 pixels a side."""
    model = create_model("resnet152_denoise_all_gaussian", blocks=[2, 2, 2, 2]).eval()
    keys = []
    for m in model.modules():
        if isinstance(m, DenoisingBlock):
            m.op.phi.register_forward_hook(lambda mod, i, o: keys.append(o.shape[-1]))
    with torch.no_grad():
        y = model(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert keys == [28, 28, 14, 14, 7, 7, 3, 3]


@pytest.mark.slow
def test_full_r152_all_denoise_forward_at_224():
    model = create_model("resnet152_denoise_all_gaussian").eval()
    with torch.no_grad():
        y = model(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


def test_resnext_widths_and_groups():
    block = tiny("resnext101_32x8d").group0.block0
    assert block.conv2.conv.groups == 32
    assert block.conv1.conv.out_channels == 256  # 32 groups x 8 channels
    assert block.conv3.conv.out_channels == 256
    res5 = tiny("resnext101_32x8d").group3.block0
    assert res5.conv2.conv.weight.shape == (2048, 64, 3, 3)


def test_official_initialisation():
    torch.manual_seed(0)
    model = tiny("resnet50_denoise")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-5 and m.momentum == pytest.approx(0.1)  # TF momentum 0.9
    for i in range(4):
        for block in getattr(model, f"group{i}"):
            assert torch.all(block.conv3.bn.weight == 0)  # last BN of every residual branch
            assert torch.all(block.conv1.bn.weight == 1)
        assert torch.all(getattr(model, f"group{i}_denoise").bn.weight == 0)
    # FC ~ N(0, 0.01), bias 0
    assert model.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.all(model.linear.bias == 0)
    # convs: variance scaling fan-out: std sqrt(2 / (k*k*out)), truncated at 2 std before rescale
    w = model.group2.block0.conv2.conv.weight  # [256, 256, 3, 3]
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.03)
    assert w.abs().max().item() <= 2 * math.sqrt(2 / (9 * 256)) / 0.8796 + 1e-6


def test_normalisation_is_official_bgr_scaling():
    x = torch.rand(1, 3, 8, 8)
    expected = torch.stack([x[:, 2], x[:, 1], x[:, 0]], 1) * 2 - 1
    torch.testing.assert_close(OfficialNormalize()(x), expected)
    # conv0 on 8 px: TF pads (2, 3) on both axes
    conv0 = SameConv2d(3, 4, 7, 2)
    ref = F.conv2d(F.pad(expected, (2, 3, 2, 3)), conv0.weight, stride=2)
    torch.testing.assert_close(conv0(OfficialNormalize()(x)), ref)


# ---------------------------------------------------------------- registry

def test_registry_names():
    names = list_models()
    for base in ("resnet50", "resnet101", "resnet152", "resnext101_32x8d", "small_resnet"):
        for suffix in ("", "_denoise", "_denoise_all", "_denoise_all_gaussian", "_bottleneck"):
            assert base + suffix in names
    assert names == sorted(names)


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="resnet152_denoise") as err:
        create_model("resnet152_denoize")
    assert "Did you mean" in str(err.value)


def test_unknown_kwarg_is_a_clear_error():
    with pytest.raises(ValueError, match="does not take width"):
        create_model("resnet50", width=3)
    with pytest.raises(ValueError, match="4 positive counts"):
        create_model("resnet50", blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="placement"):
        create_model("small_resnet", placement="everywhere")


def test_metadata_round_trip():
    model = create_model("small_resnet_denoise", in_channels=1, width=4, denoise="median")
    meta = model_metadata(model)
    assert all(isinstance(v, str) for v in meta.values())
    clone = model_from_metadata(meta)
    assert clone.model_name == "small_resnet_denoise"
    assert clone.model_kwargs == {"in_channels": 1, "width": 4, "denoise": "median"}
    assert clone.state_dict().keys() == model.state_dict().keys()
