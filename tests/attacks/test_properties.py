"""Attacks: properties every attack must keep, PGD's options and targets.

Tiny models only; cross-checks against torchattacks and the official attacker live in
test_reference.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ConvBNNet
from torch import nn

from featdenoise.accel import caches
from featdenoise.attacks import (
    ATTACKS,
    FGSM,
    IFGSM,
    MIFGSM,
    PGD,
    LinfBall,
    build_attack,
    draw_targets,
)

EPS = 16 / 255
K = 5


def tiny_model(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Dropout-Linear on [N, 3, 8, 8]: BN and dropout make the mode matter."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(6 * 8 * 8, K),
    )
    with torch.no_grad():  # non-trivial running statistics, so train/eval BN differ
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    model.num_classes = K
    return model


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[0, 0, :2] = 0.0  # pixels at the range edges exercise the [0, 1] clipping
    x[0, 1, :2] = 1.0
    return x, torch.randint(0, K, (n,), generator=g)


def make(name: str, model: nn.Module, targeted: bool, **kw):
    if name != "fgsm":
        kw.setdefault("steps", 3)
    return build_attack(name, model, targeted=targeted, seed=0, **kw)


CASES = [(name, targeted) for name in ATTACKS for targeted in (True, False)]


@pytest.mark.parametrize("name,targeted", CASES)
def test_bounds_range_and_input_untouched(name, targeted):
    model = tiny_model()
    x, y = batch()
    x_copy = x.clone()
    x_adv = make(name, model, targeted)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.equal(x, x_copy), "the caller's images were modified"
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    assert (x_adv != x).any(), "the attack did not move any pixel"


@pytest.mark.parametrize("name,targeted", CASES)
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_mode_and_parameters_restored(name, targeted, mode):
    model = tiny_model()
    model.train(mode != "eval")
    if mode == "mixed":
        model[1].eval()  # BN frozen, the rest training: flags must come back per module
    model[5].bias.requires_grad_(False)  # a frozen parameter stays frozen
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)  # an existing .grad stays as is
    before = [m.training for m in model.modules()]
    modules = list(model.modules())
    stats = model[1].running_mean.clone()
    x, y = batch()
    make(name, model, targeted)(x, y)
    assert list(model.modules()) == modules  # folded BatchNorm put back
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[1].running_mean, stats), "BN ran in training mode during the attack"
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, True, False]
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")


def test_attack_runs_in_eval_mode():
    """Dropout active would make two runs differ; BN in train mode would use batch statistics."""
    seen = []
    model = tiny_model().train()
    model[1].register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    x, y = batch()
    PGD(model, steps=2, seed=0)(x, y)
    assert seen and not any(seen)


@pytest.mark.parametrize("name,targeted", CASES)
def test_deterministic_under_seed(name, targeted):
    x, y = batch()
    a1 = make(name, tiny_model(), targeted)
    a2 = make(name, tiny_model(), targeted)
    assert torch.equal(a1(x, y), a2(x, y))
    if targeted:
        assert torch.equal(a1.last_target, a2.last_target)
    else:
        assert a1.last_target is None


@pytest.mark.parametrize("name", list(ATTACKS))
def test_targeted_never_picks_true_label_and_target_is_used(name):
    model = tiny_model()
    x, y = batch(n=64)
    attack = make(name, model, True)
    attack(x, y)
    assert attack.last_target.shape == y.shape
    assert (attack.last_target != y).all()
    # A given target is used as is.
    target = (y + 2) % K
    attack(x, y, target=target)
    assert torch.equal(attack.last_target, target)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_targeted_attack_moves_towards_its_target(name):
    """The targeted objective (minus CE to the target) goes up; untargeted CE to y goes up."""
    model = tiny_model().eval()
    x, y = batch(n=32)
    ce = nn.functional.cross_entropy
    target = (y + 1) % K
    x_adv = make(name, model, True)(x, y, target=target)
    with torch.no_grad():
        assert ce(model(x_adv), target) < ce(model(x), target)
    x_adv = make(name, model, False)(x, y)
    with torch.no_grad():
        assert ce(model(x_adv), y) > ce(model(x), y)


def test_works_under_no_grad_and_with_integer_like_labels():
    model = tiny_model()
    x, y = batch()
    with torch.no_grad():
        x_adv = PGD(model, steps=2, seed=0)(x, y.int())
    assert (x_adv != x).any()


def test_draw_targets_uniform_over_wrong_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(2000)  # [20000]
    t = draw_targets(y, 10, g)
    assert (t != y).all() and t.min() >= 0 and t.max() <= 9
    offsets = torch.bincount((t - y) % 10, minlength=10).float()
    assert offsets[0] == 0
    expected = len(y) / 9
    assert ((offsets[1:] - expected).abs() / expected).max() < 0.1
    assert torch.equal(t, draw_targets(y, 10, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="num_classes"):
        draw_targets(y, 1)


def test_step_rule():
    model = tiny_model()
    assert PGD(model, steps=10).step == pytest.approx(1.6 / 255)  # paper Sec. 6.1
    assert PGD(model, steps=100).step == pytest.approx(1 / 255)
    assert PGD(model, steps=10, step_rule="fixed").step == pytest.approx(1 / 255)
    assert PGD(model, steps=1, step_size=1 / 255).step == pytest.approx(EPS)


def test_random_start_is_uniform_in_box():
    model = tiny_model()
    x = torch.full((64, 3, 8, 8), 0.5)
    y = torch.zeros(64, dtype=torch.long)
    start = PGD(model, steps=0, targeted=False, seed=3)(x, y)  # 0 steps: the start itself
    delta = (start - x) / EPS
    assert delta.abs().max() <= 1 + 1e-6
    assert delta.mean().abs() < 0.02 and (delta.var() - 1 / 3).abs() < 0.02  # U[-1, 1]
    corner = PGD(model, steps=0, targeted=False, seed=3)(torch.zeros_like(x), y)
    assert corner.min() >= 0 and (corner > 0).any()  # clipped to [0, 1], not reflected


def test_clean_start_prob_one_coin_per_batch():
    model = tiny_model()
    x, y = batch(n=2)
    attack = PGD(model, steps=0, targeted=False, clean_start_prob=0.2, seed=0)
    clean = []
    for _ in range(1000):
        x_adv = attack(x, y)
        clean.append(attack.last_clean_starts[0])
        assert torch.equal(x_adv, x) == clean[-1]  # the whole batch starts clean, or none of it
    assert abs(sum(clean) / len(clean) - 0.2) < 0.04  # binomial sd 0.013
    assert PGD(model, random_start=False, seed=0).last_clean_starts == []
    always = PGD(model, steps=0, targeted=False, clean_start_prob=1.0, seed=0)
    assert torch.equal(always(x, y), x)


def test_clean_start_equals_no_random_start():
    model = tiny_model()
    x, y = batch()
    target = (y + 1) % K
    clean = PGD(model, steps=3, random_start=True, clean_start_prob=1.0)(x, y, target)
    plain = PGD(model, steps=3, random_start=False)(x, y, target)
    assert torch.equal(clean, plain)


@pytest.mark.parametrize("targeted", [True, False])
def test_restarts_never_make_the_result_worse(targeted):
    model = tiny_model().eval()
    x, y = batch(n=48)
    kw = dict(eps=2 / 255, steps=2, targeted=targeted, step_rule="fixed", step_size=0.5 / 255)
    one = PGD(model, restarts=1, seed=5, **kw)
    many = PGD(model, restarts=4, seed=5, **kw)
    x1, x4 = one(x, y), many(x, y)
    assert torch.equal(one.last_target, many.last_target) if targeted else True
    labels = one.last_target if targeted else y
    with torch.no_grad():
        s1, o1 = one._score(x1, labels)
        s4, o4 = many._score(x4, labels)
    assert (s4 | ~s1).all(), "an image the single run broke is not broken after restarts"
    assert ((s4 & ~s1) | (o4 >= o1 - 1e-6)).all()
    assert (s4.sum() > s1.sum()) or (o4 > o1 + 1e-6).any(), "restarts never helped on any image"
    assert (x4 - x).abs().max() <= kw["eps"] + 1e-6


def test_mifgsm_momentum_differs_from_ifgsm_and_decay_zero_equals_it():
    model = tiny_model()
    x, y = batch(n=16)
    target = (y + 1) % K
    ifgsm = IFGSM(model, steps=5, step_rule="fixed", step_size=2 / 255)(x, y, target)
    mi0 = MIFGSM(model, steps=5, decay=0.0, step_rule="fixed", step_size=2 / 255)(x, y, target)
    mi1 = MIFGSM(model, steps=5, decay=1.0, step_rule="fixed", step_size=2 / 255)(x, y, target)
    assert torch.equal(ifgsm, mi0)
    assert not torch.equal(ifgsm, mi1)


def test_fgsm_is_one_step_of_eps():
    model = tiny_model().eval()
    x, y = batch()
    target = (y + 1) % K
    x_adv = FGSM(model)(x, y, target)
    xr = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xr), target, reduction="sum")
    (g,) = torch.autograd.grad(loss, xr)
    expected = (x - EPS * g.sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-7)


def test_bf16_autocast_option():
    model = tiny_model()
    x, y = batch()
    a = PGD(model, steps=3, seed=0, bf16=True)
    x_adv = a(x, y)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv, PGD(model, steps=3, seed=0, bf16=True)(x, y))


def test_errors_are_clear():
    model = tiny_model()
    x, y = batch()
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        PGD(model)(x * 255, y)
    with pytest.raises(ValueError, match="step_rule"):
        PGD(model, step_rule="madry")
    with pytest.raises(ValueError, match="eps"):
        PGD(model, eps=16)
    with pytest.raises(ValueError, match="unknown attack"):
        build_attack("cw", model)
    with pytest.raises(ValueError, match="disagree"):
        PGD(model)(x, y[:2])
    with pytest.raises(ValueError, match="restarts"):
        PGD(model, restarts=0)


def test_build_attack_by_name():
    model = tiny_model()
    assert isinstance(build_attack("pgd", model, steps=2), PGD)
    assert isinstance(build_attack("FGSM", model), FGSM)
    assert type(build_attack("bim", model)) is IFGSM
    assert isinstance(build_attack("mi-fgsm", model, decay=0.5), MIFGSM)


def test_threat_model_projection():
    ball = LinfBall(0.1)
    x = torch.tensor([0.0, 0.05, 0.5, 0.97, 1.0])
    lo, hi = ball.bounds(x)
    assert torch.allclose(lo, torch.tensor([0.0, 0.0, 0.4, 0.87, 0.9]))
    assert torch.allclose(hi, torch.tensor([0.1, 0.15, 0.6, 1.0, 1.0]))
    z = torch.tensor([-1.0, 0.2, 0.45, 2.0, 0.5])
    assert torch.allclose(ball.project_(z, lo, hi), torch.tensor([0.0, 0.15, 0.45, 1.0, 0.9]))


def test_accelerated_by_default_and_skipped_where_folding_is_wrong():
    """A BN registered after its conv but applied before it must not be folded; either way the
    default attack gives the images of ``exact=True`` up to rounding-level sign flips."""
    assert PGD(ConvBNNet()).exact is False
    x, y = batch()
    target = (y + 1) % K
    for swapped in (False, True):
        model = ConvBNNet(swapped).eval()
        fast = PGD(model, steps=3, random_start=False)
        exact = PGD(model, steps=3, random_start=False, exact=True)
        x_f, x_e = fast(x, y, target), exact(x, y, target)
        (folded,) = caches(model).verified.values()
        assert folded == ({1} if swapped else {0, 1})  # pair 0 is the swapped one
        assert ((x_f - x_e).abs() <= 1e-6).float().mean() >= 0.99


def plain_pgd(model, x, target, eps, step, steps):
    """The targeted PGD rule written out with autograd (clean start, sign steps, clip)."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = -nn.functional.cross_entropy(model(x_adv), target, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("threads", [1, 2])
def test_exact_is_plain_autograd_bit_for_bit(threads):
    """``exact=True`` is PyTorch's normal path: bitwise the attack written out by hand, also on
    one thread, where the default attack switches to channels-last images."""
    torch.set_num_threads(threads)  # restored by conftest
    model = ConvBNNet().eval()
    x, y = batch()
    target = (y + 2) % K
    attack = PGD(model, steps=4, random_start=False, exact=True)
    ours = attack(x, y, target)
    assert torch.equal(ours, plain_pgd(model, x, target, EPS, attack.step, 4))


class LayoutSpy(nn.Module):
    """ConvBNNet that notes whether each batch it sees is channels-last."""

    num_classes = K

    def __init__(self):
        super().__init__()
        self.net = ConvBNNet()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous())
        return self.net(x)


def test_exact_keeps_the_callers_layout_on_one_thread():
    """On one CPU thread the default attack computes on a channels-last copy (faster there, other
    summation order); ``exact=True`` must not: NCHW in, NCHW to the model."""
    torch.set_num_threads(1)  # restored by conftest
    x, y = batch()
    spy = LayoutSpy().eval()
    PGD(spy, steps=2, random_start=False, exact=True)(x, y, (y + 1) % K)
    assert spy.seen and not any(spy.seen)
    spy.seen.clear()
    PGD(spy, steps=2, random_start=False)(x, y, (y + 1) % K)
    assert all(spy.seen[1:])  # the first forward is the class check on one image


@pytest.mark.parametrize("name", list(ATTACKS))
def test_layout_options_do_not_change_the_result(name):
    """channels_last and the accelerator are speed options: same images (float64: no ties)."""
    model = ConvBNNet().double()
    x, y = batch()
    x = x.double()
    results = [make(name, model, True, channels_last=cl, exact=ex)(x, y)
               for cl in (False, True) for ex in (True, False)]
    for r in results[1:]:
        assert torch.allclose(r, results[0], atol=1e-9)
    assert results[0].is_contiguous() and results[-1].is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert make(name, model, True)(x_cl, y).is_contiguous(memory_format=torch.channels_last)


class ExpandedGradNet(nn.Module):
    """Logits that depend on x only through ``x.sum()``: autograd returns an expanded gradient."""

    num_classes = K

    def forward(self, x):
        return torch.arange(K, dtype=x.dtype).expand(x.shape[0], K) * x.sum()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_expanded_input_gradient_is_not_written_in_place(name):
    x, y = batch()
    x_adv = make(name, ExpandedGradNet(), False)(x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max() > 0
