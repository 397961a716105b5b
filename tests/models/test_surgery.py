"""Denoising blocks in any backbone (featdenoise.models.surgery): the same function right after
insertion, the official placement and block shapes, trainable zero-init blocks, the state-dict
key scheme, the speed layer, bf16, torch.compile, viz, and one-line errors. Random weights only."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from featdenoise import accel
from featdenoise.analysis import viz
from featdenoise.models import add_denoising, create_model, feature_modules
from featdenoise.models.denoise import OP_NAMES, DenoisingBlock
from featdenoise.models.surgery import Denoised, load_backbone_state

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = [f"layer{i}" for i in range(1, 5)]
BASIC, BOTTLENECK = [64, 128, 256, 512], [256, 512, 1024, 2048]


def _timm(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


BUILDERS = {
    "torchvision:resnet18": (lambda: torchvision.models.resnet18(num_classes=10), BASIC),
    "torchvision:resnet50": (lambda: torchvision.models.resnet50(num_classes=10), BOTTLENECK),
    "torchvision:resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(), BOTTLENECK),
    "torchvision:wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(), BOTTLENECK),
    "timm:resnet18": (lambda: _timm("resnet18", num_classes=10), BASIC),
    "timm:resnet50": (lambda: _timm("resnet50"), BOTTLENECK),
}


def _trained_looking(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines (a fresh BN is nearly the identity), eval."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


def _blocks(model: nn.Module) -> dict[str, DenoisingBlock]:
    return {k: m for k, m in feature_modules(model).items() if isinstance(m, DenoisingBlock)}


class UserNet(nn.Module):
    """A user's own network: a Sequential, a bare conv, and a linear head."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:resnet50",
                                  "timm:resnet18"])
def test_same_function_after_insertion_and_the_key_scheme(name):
    build, channels = BUILDERS[name]
    torch.manual_seed(0)
    model = _trained_looking(build())
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        assert add_denoising(model, "stages", "nonlocal_gaussian") is model
        for block in _blocks(model).values():  # non-trivial statistics; gamma, beta stay 0
            block.bn.running_mean.uniform_(-0.5, 0.5)
            block.bn.running_var.uniform_(0.5, 2.0)
        assert torch.equal(model(x), reference)  # x + BN(...) with gamma = beta = 0: exact zeros
    assert list(feature_modules(model)) == [n for s in STAGES for n in (s, f"{s}_denoise")]
    assert all(isinstance(getattr(model, s), Denoised) for s in STAGES)
    assert [b.bn.num_features for b in _blocks(model).values()] == channels
    # Keys: the backbone's gain "inner." below each stage; the blocks' are "<stage>.denoise.*",
    # registered parameters and buffers (what DDP, optimisers and state_dict see).
    keys = set(model.state_dict())
    assert "layer1.inner.0.conv1.weight" in keys and "layer1.0.conv1.weight" not in keys
    mapped = {k.replace(".", ".inner.", 1) if k.split(".")[0] in STAGES else k for k in backbone}
    assert mapped <= keys and all(k.split(".")[1] == "denoise" for k in keys - mapped)
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for b in _blocks(model).values() for p in b.parameters())
    # The backbone's state dict loads into a fresh surgered copy, leaving only the blocks' keys.
    torch.manual_seed(5)
    fresh = add_denoising(build(), "stages", "nonlocal_gaussian").eval()
    left = load_backbone_state(fresh, backbone)
    assert left and all(k.split(".")[1] == "denoise" for k in left)
    with torch.no_grad():
        assert torch.equal(fresh(x), reference)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_stages_and_channels_of_every_resnet_on_the_meta_device(name):
    build, channels = BUILDERS[name]
    with torch.device("meta"):
        model = build()
    add_denoising(model, "stages", "nonlocal_gaussian")
    blocks = _blocks(model)
    assert list(blocks) == [f"{s}_denoise" for s in STAGES]
    assert [b.bn.num_features for b in blocks.values()] == channels
    assert all(p.is_meta for b in blocks.values() for p in b.parameters())  # the model's device


def test_blocks_take_the_dtype_of_the_model_and_a_timm_input_channel_count():
    model = _timm("resnet18", num_classes=10, in_chans=1).double()  # pretrained_cfg says 3
    _trained_looking(model)
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        add_denoising(model, "stages", "mean")
        assert torch.equal(model(x), reference)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("op", ["nonlocal_gaussian", "nonlocal_dot"])
def test_official_placement_and_block_shapes_of_resnet50_denoise(op):
    """``"stages"`` on torchvision's ResNet-50 puts the blocks where featdenoise's own
    ``resnet50_denoise`` has them (after res2..res5), with the same parameter shapes."""
    ours = add_denoising(torchvision.models.resnet50(), "stages", op)
    official = create_model("resnet50_denoise", denoise=op, blocks=[1, 1, 1, 1])

    def shapes(block):
        return {k: tuple(v.shape) for k, v in block.state_dict().items()}

    theirs = list(official.feature_modules().items())
    mine = list(feature_modules(ours).items())
    assert [k.endswith("_denoise") for k, _ in mine] == [k.endswith("_denoise") for k, _ in theirs]
    for (_, a), (_, b) in zip(mine, theirs, strict=True):
        if isinstance(b, DenoisingBlock):
            assert shapes(a) == shapes(b) and a.op_name == b.op_name == op
            std = float(b.conv.weight.detach().std())  # TF's fan-out variance scaling
            assert float(a.conv.weight.detach().std()) == pytest.approx(std, rel=0.2)


@pytest.mark.parametrize("op", OP_NAMES)
def test_every_op_in_a_users_net_keeps_its_function(op):
    torch.manual_seed(1)
    model = _trained_looking(UserNet())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        add_denoising(model, ["block1", "block2"], op, example_input=(1, 3, 16, 16))
        assert torch.equal(model(x), reference)
    assert model.block1.denoise.bn.num_features == 8 and model.block2.inner.out_channels == 12
    assert model.block2.denoise.bn.num_features == 12 and model.block2.denoise.op_name == op
    assert "block2.inner.weight" in model.state_dict()


def test_blocks_inside_stages_nest_and_their_keys_map():
    torch.manual_seed(2)
    model = _trained_looking(torchvision.models.resnet18(num_classes=10))
    backbone = model.state_dict()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        add_denoising(model, ["layer2", "layer2.0", "layer2.1.conv1"], "median")
        assert torch.equal(model(x), reference)
    assert isinstance(model.layer2.inner[0], Denoised)
    assert model.layer2.inner[1].conv1.denoise.bn.num_features == 128
    fresh = add_denoising(torchvision.models.resnet18(num_classes=10),
                          ["layer2", "layer2.0", "layer2.1.conv1"], "median").eval()
    assert len(load_backbone_state(fresh, backbone)) == 3 * 5  # gamma, beta, mean, var, count
    with torch.no_grad():
        assert torch.equal(fresh(x), reference)
    state = dict(backbone)
    del state["fc.bias"]
    with pytest.raises(ValueError, match=r"1 backbone keys missing, 0 unexpected.*fc\.bias"):
        load_backbone_state(fresh, state)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 unexpected"):
        load_backbone_state(fresh, state, strict=True)
    assert "fc.bias" in load_backbone_state(fresh, state, strict=False)
    # a state of another head is one line naming the tensor and both shapes; nothing is loaded
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    other = torchvision.models.resnet18(num_classes=7).state_dict()
    with pytest.raises(ValueError, match=r"^load_backbone_state: 2 tensors .* e\.g\. fc\.weight "
                                         r"\(7, 512\) vs \(10, 512\); fc\.bias \(7,\) vs "
                                         r"\(10,\);[^\n]*$"):
        load_backbone_state(fresh, other)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_zero_gamma_blocks_learn():
    """With gamma = 0 the gradient reaches the block's BatchNorm affine (gamma, beta) but not
    the conv and embeddings before it (BN's input gradient is gamma-scaled: exactly 0); after one
    SGD step gamma is nonzero, the function changes and the conv gets a gradient too."""
    torch.manual_seed(3)
    model = add_denoising(UserNet(), ["block1", "block2"], "nonlocal_gaussian").train()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 5, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    for block in _blocks(model).values():
        assert all(p.grad is not None for p in block.parameters())  # all in the graph
        assert block.bn.weight.grad.abs().sum() > 0 and block.bn.bias.grad.abs().sum() > 0
        assert not block.conv.weight.grad.any() and not block.op.theta.weight.grad.any()
    model.eval()
    with torch.no_grad():
        before = model(x)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.allclose(model(x), before)
    model.train().zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(b.conv.weight.grad.abs().sum() > 0 for b in _blocks(model).values())


def test_input_gradient_under_inference_grad_and_bf16_autocast():
    torch.manual_seed(4)
    plain = _trained_looking(torchvision.models.resnet18(num_classes=10))
    model = add_denoising(copy.deepcopy(plain), "stages", "nonlocal_gaussian").eval()
    x = torch.rand(2, 3, 32, 32)

    def input_grad(net):
        xg = x.clone().requires_grad_(True)
        with accel.inference_grad(net):
            (g,) = torch.autograd.grad(net(xg)[:, 0].sum(), xg)
        return g

    want, got = input_grad(plain), input_grad(model)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), plain(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.equal(out, ref)  # the blocks add exact zeros in bf16 too
    for block in _blocks(model).values():  # a trained block is no identity: still finite
        nn.init.uniform_(block.bn.weight, 0.5, 1.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x).float()).all()


def test_timm_gradient_checkpointing_runs_the_blocks():
    torch.manual_seed(6)
    model = add_denoising(_timm("resnet18", num_classes=10), "stages", "mean").eval()
    for block in _blocks(model).values():
        nn.init.uniform_(block.bn.weight, 0.5, 1.0)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model.set_grad_checkpointing(True)  # iterates the stages' children: inner, denoise
        assert torch.allclose(model(x), reference, atol=1e-6, rtol=0)


def test_viz_captures_the_maps_of_a_surgered_torchvision_model():
    torch.manual_seed(7)
    model = add_denoising(torchvision.models.resnet18(num_classes=10), ["layer2", "layer3"],
                          "nonlocal_dot")
    maps = viz.capture_features(model, torch.rand(1, 3, 32, 32))
    assert list(maps) == ["layer2", "layer2_denoise.before", "layer2_denoise.after",
                          "layer2_denoise", "layer3", "layer3_denoise.before",
                          "layer3_denoise.after", "layer3_denoise"]
    assert maps["layer2"].shape == (1, 128, 4, 4) and maps["layer3"].shape == (1, 256, 2, 2)
    assert torch.equal(maps["layer2"], maps["layer2_denoise.before"])  # the map before the block
    assert viz.default_stage(model) == "layer3" and model.training
    with pytest.raises(ValueError, match="no denoising blocks"):
        viz.capture_features(UserNet(), torch.rand(1, 3, 8, 8))


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(8)
    model = add_denoising(UserNet(), ["block1", "block2"], "nonlocal_gaussian").eval()
    for block in _blocks(model).values():
        nn.init.uniform_(block.bn.weight, 0.5, 1.0)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(model)
    out, ref = compiled(x), model(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(after=["blok1"]), "UserNet has no module 'blok1' (names as in model.named_modules(); "
                            "did you mean block1"),
    (dict(after=["nothing_alike_here"]), "its children: block1, block2, head"),
    (dict(after="stages"), "cannot guess the stages: UserNet has no layer1..layer4 (its "
                           "children: block1, block2, head)"),
    (dict(after=["head"]), "'head' outputs (1, 5) on an example input of shape (1, 3, 224, 224), "
                           "not a 4-D [N, C, H, W] feature map (Linear)"),
    (dict(after=["block1"], example_input=(1, 12)), "a dry run of UserNet on an input of shape "
                                                    "(1, 12) failed"),
    (dict(after=["block1"], op="gaussian"), "unknown denoising op 'gaussian'; choose one of"),
    (dict(after=["block1"], use_bn=False), "DenoisingBlock does not take use_bn"),
    (dict(after=["block1"], op="mean", subsample=True), "subsample applies to the non-local"),
    (dict(after=["block1", "block1"]), "names a module twice"),
    (dict(after=[""]), "has no module ''"),
])
def test_bad_requests_are_one_line_and_change_nothing(kwargs, words):
    model = UserNet()
    keys = list(model.state_dict())
    with pytest.raises(ValueError) as err:
        add_denoising(model, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert list(model.state_dict()) == keys and model.training


def _ddp_worker(rank, world, port, out):
    import torch.distributed as tdist
    from helpers import as_rank
    from torch.nn.parallel import DistributedDataParallel

    as_rank(rank, world, port)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = add_denoising(torchvision.models.resnet18(num_classes=4), "stages", "mean")
        ddp = DistributedDataParallel(model)
        torch.manual_seed(10 + rank)  # different data per rank
        x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2,))
        nn.functional.cross_entropy(ddp(x), y).backward()
        grads = torch.cat([model.get_submodule(f"layer{i}").denoise.bn.weight.grad
                           for i in range(1, 5)])
        torch.save(grads, out / f"grad{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_blocks_train_under_ddp(tmp_path):
    """Two gloo ranks: the blocks' parameters are registered, so DDP all-reduces their
    gradients (equal on both ranks, nonzero although each rank saw other images)."""
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.start_processes(_ddp_worker, args=(2, free_port(), tmp_path), nprocs=2, join=True,
                       start_method="fork")
    g0, g1 = torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt")
    assert torch.equal(g0, g1) and g0.abs().sum() > 0
