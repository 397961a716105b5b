"""featdenoise.accel.inference_grad sees every change PyTorch's own path would: BatchNorm
statistics updated by a train-mode forward, ``eps`` and removed tensors inside the block; an
empty batch; hooks (module and global, added before or inside the block) see PyTorch's own
tensors, once per call; subclasses with their own forward, parametrized weights, other padding
modes, SyncBatchNorm and a BatchNorm applied twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ConvBNNet, images, logits_and_grad
from torch import nn

from featdenoise.accel import caches, inference_grad
from featdenoise.attacks import APGD, FAB, PGD, Square


def fast_and_exact(model, x):
    """The model's output inside the active block, and PyTorch's own (a nested exact block)."""
    out = model(x)
    with inference_grad(model, enabled=False):
        return out, model(x)


def assert_same(out, ref):
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), float((out - ref).abs().max())


def _train_forward(model):
    model.train()
    model(images() * 3)  # the kernel updates the running statistics without a version bump
    model.eval()


def _train_forward_cumulative(model):
    model.bn.momentum = None  # cumulative average: also counted in num_batches_tracked
    _train_forward(model)


def _eps(model):
    model.bn.eps = 0.5  # a float attribute, no tensor changes


def _no_running_stats(model):
    model.bn.running_mean = None  # eval mode then normalises with the batch's statistics
    model.bn.running_var = None


CHANGES = {"train_forward": _train_forward, "train_forward_cumulative": _train_forward_cumulative,
           "eps": _eps, "no_running_stats": _no_running_stats}


@pytest.mark.parametrize("change", CHANGES)
def test_a_batchnorm_change_inside_the_block_is_seen_at_the_next_call(change):
    model = ConvBNNet().eval()
    x = images()
    with inference_grad(model), torch.no_grad():
        before, _ = fast_and_exact(model, x)
        assert list(caches(model).verified.values()) == [{0, 1}]  # folded before the change
        CHANGES[change](model)
        out, ref = fast_and_exact(model, x)
    assert not torch.allclose(ref, before, rtol=1e-3)  # the change matters
    assert_same(out, ref)
    # Refolded from the new values, not switched off by a failed check of stale ones.
    assert list(caches(model).verified.values()) == [{0, 1}]


def test_an_empty_batch_runs_the_normal_path_and_attacks_return_an_empty_batch():
    model = ConvBNNet().eval()
    x, y = images()[:0], torch.zeros(0, dtype=torch.long)
    with inference_grad(model), torch.no_grad():
        out = model(x)
    assert out.shape == (0, 5) and not caches(model).verified  # nothing to check on
    for attack in (PGD(model, steps=2), APGD(model, steps=2), FAB(model, steps=2),
                   Square(model, n_queries=4)):
        assert attack(x, y).shape == x.shape


def _recorder(kind: str, model, seen: list):
    """Register one hook of ``kind`` that records what it is given; returns its handle."""
    module = {"conv": model.conv, "bn": model.bn, "relu": model.head[2]}.get(kind.split("_")[0])
    last = lambda t: seen.append(t[0].detach().clone())  # noqa: E731
    only = lambda fn: lambda m, *a: fn(*a) if m is model.conv else None  # noqa: E731
    global_hooks = torch.nn.modules.module
    register = {
        "conv_forward": lambda: module.register_forward_hook(lambda m, i, o: last([o])),
        "conv_pre": lambda: module.register_forward_pre_hook(lambda m, i: last(i)),
        "conv_backward": lambda: module.register_full_backward_hook(lambda m, gi, go: last(go)),
        "bn_forward": lambda: module.register_forward_hook(lambda m, i, o: last([o])),
        "bn_pre": lambda: module.register_forward_pre_hook(lambda m, i: last(i)),
        "bn_backward": lambda: module.register_full_backward_hook(lambda m, gi, go: last(go)),
        "bn_backward_pre": lambda: module.register_full_backward_pre_hook(lambda m, go: last(go)),
        "relu_forward": lambda: module.register_forward_hook(lambda m, i, o: last([o])),
        "global_forward": lambda: global_hooks.register_module_forward_hook(
            only(lambda i, o: last([o]))),
        "global_backward": lambda: global_hooks.register_module_full_backward_hook(
            only(lambda gi, go: last(go))),
    }
    return register[kind]()


HOOKS = ["conv_forward", "conv_pre", "conv_backward", "bn_forward", "bn_pre", "bn_backward",
         "bn_backward_pre", "relu_forward", "global_forward", "global_backward"]


@pytest.mark.parametrize("when", ["before", "inside"])
@pytest.mark.parametrize("kind", HOOKS)
def test_a_hook_sees_what_pytorch_gives_it_once_per_call(kind, when):
    """A hooked conv or BatchNorm runs PyTorch's own path (a folded pair would show a hook the
    conv+BN output, or the BN as identity), and the first call's checks, which run the model
    twice more, are not shown to any hook inside it."""
    model = ConvBNNet().eval()
    x = images()
    ref: list = []
    handle = _recorder(kind, model, ref)
    try:
        ref_out = logits_and_grad(model, x)
    finally:
        handle.remove()
    seen: list = []
    with inference_grad(model):
        if when == "inside":
            logits_and_grad(model, x)  # folded and packed, then hooked
        handle = _recorder(kind, model, seen)
        try:
            out = logits_and_grad(model, x)
        finally:
            handle.remove()
        again = logits_and_grad(model, x)
    assert len(seen) == len(ref) == 1
    assert_same(seen[0], ref[0])
    for ours in (out, again):
        assert_same(ours[0], ref_out[0])
        assert_same(ours[1], ref_out[1])
    assert list(caches(model).verified.values()) == [{0, 1}]  # unhooked: folded again


def test_a_hooked_conv_given_as_the_model_is_not_packed():
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    x = images()
    seen: list = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o))
    with inference_grad(conv), torch.no_grad():
        out = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert out.equal(ref) and out.is_contiguous()  # a pack would give NHWC
    assert len(seen) == 1 and seen[0] is out


class OwnConvForward(nn.Conv2d):
    """A subclass with its own ``_conv_forward`` (as a custom padding would have)."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, bias) + 1.0


class GatedConv(nn.Conv2d):
    """``forward`` overridden: the conv's own output passed on as it is, or clamped once gated."""

    gated = False

    def forward(self, x):
        out = super().forward(x)
        return out.clamp(min=0) if self.gated else out


class ShiftedBN(nn.BatchNorm2d):
    """``forward`` overridden: BatchNorm, then a shift (0 at the first call's checks)."""

    shift = 0.0

    def forward(self, x):
        return super().forward(x) + self.shift


def _swapped(model, name: str, cls):
    old = getattr(model, name)
    new = cls(3) if issubclass(cls, nn.modules.batchnorm._BatchNorm) else cls(3, 3, 3, padding=1)
    new.load_state_dict(old.state_dict())
    setattr(model, name, new)
    return new


SUBCLASSES = {
    "own_conv_forward": ("conv", OwnConvForward, lambda m: None),
    "gated_conv": ("conv", GatedConv, lambda m: setattr(m, "gated", True)),
    "shifted_bn": ("bn", ShiftedBN, lambda m: setattr(m, "shift", 1.0)),
}


@pytest.mark.parametrize("case", SUBCLASSES)
def test_a_subclass_with_its_own_forward_is_neither_bypassed_nor_folded(case):
    """Folding assumes Conv2d's and BatchNorm2d's own forward: a subclass that overrides it may
    pass the first call's checks and then compute something else."""
    name, cls, change = SUBCLASSES[case]
    model = ConvBNNet()
    module = _swapped(model, name, cls)
    model.eval()
    x = images()
    with inference_grad(model), torch.no_grad():
        model(x)
        change(module)
        out = model(x)
    with torch.no_grad():
        assert_same(out, model(x))  # outside any block: routing would bypass its own method
    assert list(caches(model).verified.values()) == [{0}]  # the head's pair is still folded


class Scale(nn.Module):
    """A parametrization: the weight times ``s``."""

    s = 1.0

    def forward(self, weight):
        return weight * self.s


@pytest.mark.parametrize("when", ["before", "inside"])
@pytest.mark.parametrize("case", ["conv", "bn", "weight_norm"])
def test_a_parametrized_module_runs_the_normal_path_checked_once(case, when, monkeypatch):
    """A parametrized weight is a new tensor at every access: nothing derived from it can be
    kept, so its module runs the normal path instead of refolding and re-checking each call."""
    from featdenoise.accel import layer

    checks = []
    real = layer._verify_fold
    monkeypatch.setattr(layer, "_verify_fold", lambda *a: checks.append(1) or real(*a))
    model = ConvBNNet().eval()
    x = images()

    def parametrize_it():
        if case == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(model.conv)
            change = lambda: model.conv.parametrizations.weight.original0.mul_(2.0)  # noqa: E731
        else:
            scale = Scale()
            torch.nn.utils.parametrize.register_parametrization(getattr(model, case), "weight",
                                                                scale)
            change = lambda: setattr(scale, "s", 2.0)  # noqa: E731
        model.eval()  # the parametrization's modules too
        return change

    change = parametrize_it() if when == "before" else None
    with inference_grad(model), torch.no_grad():
        if when == "inside":
            fast_and_exact(model, x)
            change = parametrize_it()
        for _ in range(3):
            assert_same(*fast_and_exact(model, x))
        change()
        out, ref = fast_and_exact(model, x)
        assert_same(out, ref)
    assert len(checks) == (1 if when == "before" else 2)
    assert list(caches(model).verified.values()) == [{1}]


def _reflect(model):
    model.conv.padding_mode = "reflect"


def _sync_bn(model):
    _swapped(model, "bn", nn.SyncBatchNorm)


class BNTwice(ConvBNNet):
    def forward(self, x):
        return self.head(torch.relu(self.bn(self.bn(self.conv(x)))))


@pytest.mark.parametrize("case", ["reflect", "sync_bn", "bn_twice"])
def test_other_padding_sync_batchnorm_and_a_batchnorm_applied_twice_are_exact(case):
    model = BNTwice() if case == "bn_twice" else ConvBNNet()
    {"reflect": _reflect, "sync_bn": _sync_bn, "bn_twice": lambda m: None}[case](model)
    model.eval()
    x = images()
    with inference_grad(model), torch.no_grad():
        out, ref = fast_and_exact(model, x)
    assert_same(out, ref)
    folded = {"reflect": {0, 1}, "sync_bn": {0}, "bn_twice": {1}}[case]  # sync_bn: no pair 0
    assert list(caches(model).verified.values()) == [folded]
