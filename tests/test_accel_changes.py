"""featdenoise.accel.inference_grad sees every change PyTorch's own path would: BatchNorm
statistics updated by a train-mode forward, ``eps`` and removed tensors inside the block; an
empty batch."""

from __future__ import annotations

import pytest
import torch
from test_accel import ConvBNNet, images

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
