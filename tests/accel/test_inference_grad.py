"""featdenoise.accel.inference_grad: the same function as PyTorch's own path, verified folding,
caches that follow the weights, a clean exit, and the fallbacks (training mode, autocast,
compiled models, nested blocks, other call signatures); a third-party attack inside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CONVBN_CLASSES as K
from helpers import ConvBNNet, images, logits_and_grad
from torch import nn

from featdenoise.accel import caches, inference_grad
from featdenoise.accel.fold import FoldCache, fold, foldable_pairs
from featdenoise.models import create_model


def float64_reference(model: nn.Module, x: torch.Tensor):
    """The unfolded model in float64: an independent slow reference."""
    import copy

    ref = copy.deepcopy(model).double()
    out, g = logits_and_grad(ref, x.double())
    return out, g


def snapshot(model: nn.Module) -> dict:
    return dict(
        modules=list(model.named_modules()),
        params=[(n, p, p.requires_grad) for n, p in model.named_parameters()],
        training=[m.training for m in model.modules()],
        state={k: v.clone() for k, v in model.state_dict().items()},
        dicts=[set(m.__dict__) for m in model.modules()],
    )


def assert_as_before(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert [(n, id(p), r) for n, p, r in after["params"]] == \
        [(n, id(p), r) for n, p, r in before["params"]]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["dicts"] == before["dicts"]  # no routing function left behind


def test_fast_path_is_the_same_function_as_float64():
    model = ConvBNNet().eval()
    x = images()
    ref_out, ref_g = float64_reference(model, x)
    with inference_grad(model):
        out, g = logits_and_grad(model, x)
        assert not any(p.requires_grad for p in model.parameters())  # input gradients only
    (folded,) = caches(model).verified.values()
    assert folded == {0, 1}
    assert (out.double() - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    assert (g.double() - ref_g).abs().max() <= 1e-5 * ref_g.abs().max()


def test_exit_restores_everything_also_after_an_exception():
    model = ConvBNNet()
    model.head.eval()  # mixed modes come back per module
    model.head[4].bias.requires_grad_(False)  # a frozen parameter stays frozen
    before = snapshot(model)
    with pytest.raises(KeyError, match="boom"):
        with inference_grad(model):
            model.eval()  # an attack library switching modes inside
            model(images())
            raise KeyError("boom")
    assert_as_before(model, before)
    with inference_grad(model):
        model.eval()
        model(images())
    assert_as_before(model, before)


def test_state_dict_and_modules_are_the_callers_inside_the_block():
    model = ConvBNNet().eval()
    state = model.state_dict()
    with inference_grad(model):
        model(images())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_cache_follows_every_kind_of_weight_change():
    """Folded weights must never come from stale parameters or statistics."""
    model = ConvBNNet().eval()
    conv, bn = model.conv, model.bn
    cache = FoldCache()
    first = cache.get(conv, bn, epoch=1)
    assert cache.get(conv, bn, epoch=1)[0] is first[0]  # unchanged: reused
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place, as an optimizer step
    second = cache.get(conv, bn, epoch=1)
    assert second[0] is not first[0] and torch.equal(second[0], fold(conv, bn)[0])
    bn.bias.data.add_(0.5)  # .data: no version bump; seen at the next epoch's comparison
    third = cache.get(conv, bn, epoch=2)
    assert third[1] is not second[1] and torch.equal(third[1], fold(conv, bn)[1])
    bn.running_var = bn.running_var * 3  # a new tensor
    assert torch.equal(cache.get(conv, bn, epoch=2)[0], fold(conv, bn)[0])
    assert len(cache) == 1


def test_the_block_follows_weight_changes_between_and_inside_blocks():
    model = ConvBNNet().eval()
    x = images()

    def fast_and_normal():
        out = model(x)
        with inference_grad(model, enabled=False):  # nested: PyTorch's own path
            return out, model(x)

    with inference_grad(model), torch.no_grad():
        first, _ = fast_and_normal()
        model.head[1].running_var.mul_(4.0)  # inside the block, in place
        inside, expected_inside = fast_and_normal()
    model.bn.weight.data.mul_(0.5)  # between blocks, bypassing version counters
    with inference_grad(model), torch.no_grad():
        between, expected_between = fast_and_normal()
    assert not torch.allclose(inside, first) and not torch.allclose(between, inside)
    assert torch.allclose(inside, expected_inside, rtol=1e-5, atol=1e-6)
    assert torch.allclose(between, expected_between, rtol=1e-5, atol=1e-6)


def test_wrong_wiring_is_not_folded_whatever_the_bn_statistics():
    """Freshly built (identity-like) BN: numbers alone cannot tell the wrong wiring apart."""
    x = images()
    for swapped in (True, False):
        model = ConvBNNet(swapped).eval()
        for bn in (model.bn, model.head[1]):
            bn.reset_parameters()
            bn.reset_running_stats()
        with inference_grad(model), torch.no_grad():
            model(x)
        (folded,) = caches(model).verified.values()
        assert folded == ({1} if swapped else {0, 1})
    assert len(foldable_pairs(ConvBNNet())) == 2
    assert foldable_pairs(nn.Sequential(nn.Flatten(), nn.Linear(192, K))) == []


def test_a_fold_that_changes_the_logits_is_refused(monkeypatch):
    """The numeric check: a fold that computes something else is never used."""
    model = ConvBNNet().eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
    wrong = lambda conv, bn, epoch=None: (conv.weight * 2, conv.bias)  # noqa: E731
    monkeypatch.setattr(FoldCache, "get", lambda self, conv, bn, epoch=None: wrong(conv, bn))
    with inference_grad(model), torch.no_grad():
        out = model(x)
    assert caches(model).verified[(tuple(x.shape[1:]), x.dtype, x.device)] == frozenset()
    assert torch.allclose(out, ref, atol=1e-5)


def test_training_mode_autocast_and_other_signatures_run_the_normal_path():
    model = ConvBNNet().train()
    x = images()
    stats = model.bn.running_mean.clone()
    torch.manual_seed(0)
    ref = model(x)
    model.bn.running_mean.copy_(stats)
    with inference_grad(model):
        torch.manual_seed(0)
        out = model(x)  # training mode: batch statistics, running stats updated, as normal
    assert out.equal(ref) and not torch.equal(model.bn.running_mean, stats)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
        with inference_grad(model):
            out = model(x)
    assert out.equal(ref) and not caches(model).verified
    with inference_grad(model):
        out = model.forward(x=x)  # keywords: not a single positional tensor
    assert out.equal(model(x)) and not caches(model).verified


class NoisyNet(ConvBNNet):
    """A randomised defence: noise from the global generator at every call, also in eval mode."""

    def forward(self, x):
        return super().forward(x + 0.01 * torch.rand_like(x))


def test_checks_leave_the_global_random_stream_alone():
    """The first call's checks must not shift the draws a randomised model (or attack) sees."""
    model = NoisyNet().eval()
    x = images()
    torch.manual_seed(0)
    with torch.no_grad():
        ref = [model(x), model(x)]
    after = torch.get_rng_state()
    torch.manual_seed(0)
    with inference_grad(model), torch.no_grad():
        out = [model(x), model(x)]
    assert torch.equal(torch.get_rng_state(), after)
    assert all(torch.allclose(o, r, rtol=1e-5, atol=1e-6) for o, r in zip(out, ref, strict=True))
    assert list(caches(model).verified.values()) == [{0, 1}]  # same draws in both check passes


def test_nested_blocks_and_disabled_block():
    model = ConvBNNet().eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
        with inference_grad(model, enabled=False):
            assert model(x).equal(ref) and "forward" not in model.__dict__
        with inference_grad(model):
            with inference_grad(model, enabled=False):
                assert model(x).equal(ref)  # an exact attack inside a user's fast block
            with inference_grad(model):
                fast = model(x)
            assert "forward" in model.__dict__  # the outer block is still active
        assert "forward" not in model.__dict__
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_compiled_model_is_left_alone():
    model = ConvBNNet().eval()
    compiled = torch.compile(model, backend="eager")
    before = snapshot(model)
    x = images()
    with torch.no_grad():
        ref = model(x)
        with inference_grad(compiled):
            assert "forward" not in model.__dict__
            out = compiled(x)
    assert out.equal(ref)
    assert_as_before(model, before)


def test_torchattacks_pgd_inside_the_block_gives_the_same_images():
    """A third-party attack that calls model.eval() and model(x) itself: same images."""
    torchattacks = pytest.importorskip("torchattacks")
    torch.manual_seed(0)
    model = create_model("small_resnet", in_channels=3, num_classes=10, width=8).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    settings = dict(eps=16 / 255, alpha=1.6 / 255, steps=5, random_start=False)
    plain = torchattacks.PGD(model, **settings)(x, y)
    before = snapshot(model)
    with inference_grad(model):
        fast = torchattacks.PGD(model, **settings)(x, y)
    assert_as_before(model, before)
    c = caches(model)
    assert c.verified and all(c.verified.values())  # the fast path did run (after model.eval())
    same = ((fast - plain).abs() <= 1e-6).float().mean()
    assert same >= 0.999, f"only {same:.4%} of pixels agree"
    assert (fast != x).float().mean() > 0.5


def test_input_gradient_of_a_denoising_network_matches_normal_path():
    torch.manual_seed(0)
    model = create_model("small_resnet_denoise", in_channels=3, num_classes=10, width=8).eval()
    x = torch.rand(4, 3, 28, 28)
    ref_out, ref_g = logits_and_grad(model, x)
    with inference_grad(model):
        out, g = logits_and_grad(model, x)
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert (g - ref_g).abs().max() <= 1e-4 * ref_g.abs().max()
    assert F.cosine_similarity(g.flatten(), ref_g.flatten(), dim=0) > 0.99999


def test_fold_check_tolerance_follows_the_precision_in_use():
    """Strict float32 keeps 1e-4; CUDA with TF32 allows 8 TF32 roundoffs (both passes carry it),
    still far below what a wrong fold moves (the wiring check catches misplaced pairs)."""
    from featdenoise.accel.layer import fold_tolerance

    assert fold_tolerance("cpu", tf32=True) == 1e-4
    assert fold_tolerance("cuda", tf32=False) == 1e-4
    assert fold_tolerance("cuda", tf32=True) == pytest.approx(8 * 2.0 ** -11)
    assert fold_tolerance("cuda", tf32=True) < 0.01
