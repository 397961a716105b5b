"""AutoAttack: APGD, APGD-T, FAB-T, Square and the chain against the authors' own code
(pyautoattack 0.2.0, Croce and Hein) and against ``exact=True``, paired per image with a stated
rule (:func:`assert_not_weaker`); their invariants, the chain's per-image records and a
gradient-masked model.

The model: a small CNN trained in about a second on a synthetic 10-class task (class templates plus
noise, 1x16x16), cached per module. At eps 16/255 about a third of its 200 test images survive
APGD, so the attacks' strengths can differ. Budgets are reduced in CI (same settings on both
sides); the standard budget runs under ``-m slow``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import fit_with_noise
from scipy.optimize import linprog
from torch import nn

from featdenoise.attacks import (
    APGD,
    APGDT,
    FAB,
    PGD,
    AutoAttack,
    Square,
    build_attack,
    run_chain,
)
from featdenoise.attacks.apgd import checkpoints
from featdenoise.attacks.autoattack import ATTACK_NAMES
from featdenoise.attacks.fab import project_linf
from featdenoise.evaluation.paired import discordant, sign_test

original = pytest.importorskip("pyautoattack")

K = 10
EPS = 16 / 255


def synthetic(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, size, size]`` in [0, 1]: a smooth template per class plus noise."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(K, 1, size // 4, size // 4, generator=g)
    templates = nn.functional.interpolate(templates, size=size, mode="bilinear",
                                          align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = 0.5 + 0.6 * (templates[y] - 0.5) + 0.15 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(0, 1), y


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, K))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest (and steady on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread) -> nn.Module:
    return train_small_cnn()


def train_small_cnn() -> nn.Module:
    """:func:`small_cnn` trained 6 epochs on 1024 synthetic images with light noise (~1 s)."""
    x, y = synthetic(1024, seed=0)
    return fit_with_noise(small_cnn(), x, y, epochs=6, batch=64, noise=0.05, lr=3e-3,
                          generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(200, seed=1)


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


# Same settings on both sides (reduced: 20 iterations, 3 targets, 100 queries). The reference is
# the authors' own code (pyautoattack, Croce and Hein), attack by attack.
def _pairs(model, eps, steps, targets, queries):
    ref = dict(eps=eps, seed=0, device="cpu")
    return {
        "apgd-ce": (APGD(model, eps=eps, steps=steps, seed=0),
                    original.autopgd_base.APGDAttack(model, n_iter=steps, **ref).perturb),
        "apgd-dlr": (APGD(model, eps=eps, steps=steps, loss="dlr", seed=0),
                     original.autopgd_base.APGDAttack(model, n_iter=steps, loss="dlr",
                                                      **ref).perturb),
        "apgd-t": (APGDT(model, eps=eps, steps=steps, n_target_classes=targets, seed=0),
                   original.autopgd_base.APGDAttack_targeted(
                       model, n_iter=steps, n_target_classes=targets, **ref).perturb),
        "fab-t": (FAB(model, eps=eps, steps=steps, n_target_classes=targets, seed=0),
                  original.fab_pt.FABAttack_PT(model, n_iter=steps, targeted=True,
                                               n_target_classes=targets, **ref).perturb),
        "square": (Square(model, eps=eps, n_queries=queries, seed=0),
                   original.square.SquareAttack(model, n_queries=queries, p_init=0.8,
                                                resc_schedule=False, **ref).perturb),
    }


ALPHA = 0.01  # false-alarm rate of a strength test when both sides are equally strong


def robust_flags(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def assert_not_weaker(model, x, y, x_ours, x_ref, what="the original") -> tuple[int, int]:
    """The rule of every strength test here: paired per-image outcomes. ``b`` images survive
    ours but not the reference, ``c`` the reverse; if both are equally strong each such image is
    a fair coin, so ours fails when ``P(Bin(b + c, 1/2) >= b) < ALPHA`` (one-sided sign test).
    On 200 images of this model, rounding alone (the same attack in two CPU kernel sets, or
    the speed layer against ``exact=True``) decides 0-3 images (``featdenoise bench
    agreement``): b = 3, c = 0 gives p = 0.125, so rounding cannot fail the test, while ours
    leaving 7 more images robust with no image the other way (p = 0.008) does."""
    b, c = discordant(robust_flags(model, x_ours, y), robust_flags(model, x_ref, y))
    p = sign_test(b, c)
    assert p >= ALPHA, (f"ours leaves {b} images robust that {what} breaks and breaks {c} that "
                        f"it leaves (sign test p = {p:.4f} < {ALPHA})")
    return b, c


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"])
def test_each_attack_at_least_as_strong_as_the_original(trained, images, name):
    x, y = images
    ours, ref = _pairs(trained, EPS, steps=20, targets=3, queries=100)[name]
    x_ours = ours(x, y)
    assert_not_weaker(trained, x, y, x_ours, ref(x, y))
    left = int(robust_flags(trained, x_ours, y).sum())
    assert left < robust(trained, x, y) - 10, "the attack broke (almost) nothing: test is void"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"])
def test_each_attack_standard_budget_vs_the_original(trained, images, name):
    x, y = images
    ours, ref = _pairs(trained, EPS, steps=100, targets=9, queries=5000)[name]
    assert_not_weaker(trained, x, y, ours(x, y), ref(x, y))


def original_chain(model, eps, steps, targets, queries):
    """The authors' AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square) at a budget."""
    chain = original.AutoAttack(model, eps=eps, version="standard", seed=0, device="cpu")
    chain.apgd.n_iter = chain.apgd_targeted.n_iter = chain.fab.n_iter = steps
    chain.apgd_targeted.n_target_classes = chain.fab.n_target_classes = targets
    chain.square.n_queries = queries
    return chain


def test_chain_at_least_as_strong_as_the_original_autoattack(trained, images):
    x, y = images
    ours = AutoAttack(trained, eps=EPS, n_classes=K, steps=10, n_target_classes=3, n_queries=50)
    x_adv, records = ours.run(x, y, seed=0)
    x_ref, _ = original_chain(trained, EPS, 10, 3, 50).run_standard_evaluation(x, y)
    assert_not_weaker(trained, x, y, x_adv, x_ref)
    assert sum(r["robust"] for r in records) == int(robust_flags(trained, x_adv, y).sum())
    assert sum(r["robust"] for r in records) < robust(trained, x, y) - 10


@pytest.mark.slow
def test_chain_standard_budget_vs_the_original(trained, images):
    x, y = images
    ours = AutoAttack(trained, eps=EPS, n_classes=K)
    x_ref, _ = original_chain(trained, EPS, 100, 9, 5000).run_standard_evaluation(x, y)
    assert_not_weaker(trained, x, y, ours(x, y), x_ref)


def test_default_as_strong_as_exact_for_each_attack(trained, images):
    """The speed layer must not weaken an attack: default against ``exact=True``, paired, with
    the same rule (FAB-T used to leave 1-3 more images robust in AVX2 and SSE4.1 kernels: its
    points sit on the decision boundary, where the speed layer's rounding decided)."""
    x, y = images
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        kw = dict(SMALL_BUDGET[name], seed=0)
        fast = build_attack(name, trained, eps=EPS, **kw)(x, y)
        exact = build_attack(name, trained, eps=EPS, exact=True, **kw)(x, y)
        assert_not_weaker(trained, x, y, fast, exact, what="exact=True")


SMALL_BUDGET = {"apgd-ce": dict(steps=20), "apgd-t": dict(steps=20, n_target_classes=3),
                "fab-t": dict(steps=20, n_target_classes=3), "square": dict(n_queries=100)}


# ------------------------------------------------------------------------------ invariants
def bn_dropout_model() -> nn.Module:
    """Conv-BN-ReLU-Dropout-Linear, 10 classes on [N, 3, 8, 8]: BN and dropout make modes matter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Dropout(0.5), nn.Flatten(), nn.Linear(6 * 8 * 8, K))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


SMALL = {"apgd-ce": dict(steps=5), "apgd-t": dict(steps=3, n_target_classes=2),
         "fab-t": dict(steps=3, n_target_classes=2), "square": dict(n_queries=20)}


@pytest.mark.parametrize("name", list(SMALL) + ["chain"])
def test_invariants_box_range_input_modes_and_seed(name):
    model = bn_dropout_model()
    model.train()
    model[1].eval()  # mixed modes come back per module
    before = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 3, 8, 8, generator=g)
    x[0, :, :2] = 0.0
    x[1, :, :2] = 1.0
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # all clean-correct: every image is attacked
    model.train()
    model[1].eval()
    x_copy = x.clone()

    def attack(seed):
        if name == "chain":
            return AutoAttack(model, eps=EPS, n_classes=K, steps=3, n_target_classes=2,
                              n_queries=20).run(x, y, seed=seed)[0]
        return build_attack(name, model, eps=EPS, seed=seed, **SMALL[name])(x, y)

    x_adv = attack(5)
    assert torch.equal(x, x_copy), "the caller's images were modified"
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[1].running_mean, stats), "BN ran in training mode"
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(attack(5), x_adv), "not deterministic under a seed"
    assert (x_adv != x).any()


def test_records_margins_and_resume_equal_one_run(trained, images):
    """The records agree with an independent forward pass, and running the chain attack by
    attack on the images still unbroken (as a resuming engine does) gives the same result."""
    x, y = images[0][:60], images[1][:60].clone()
    y[:3] = (y[:3] + 1) % K  # three images the model misclassifies clean
    chain = AutoAttack(trained, eps=EPS, n_classes=K, steps=5, n_target_classes=2, n_queries=30)
    x_adv, records = chain.run(x, y, seed=7)
    with torch.no_grad():
        logits = trained(x_adv)
    for i, r in enumerate(records):
        others = logits[i].clone()
        others[y[i]] = -float("inf")
        assert r["margin"] == pytest.approx(float(logits[i, y[i]] - others.max()), abs=1e-4)
        assert r["robust"] == (r["broken_by"] is None) == (logits[i].argmax() == y[i])
    assert [r["broken_by"] for r in records[:3]] == ["clean"] * 3
    assert {r["broken_by"] for r in records} - {None, "clean"} <= set(chain.attacks)
    assert any(r["broken_by"] == "apgd-ce" for r in records)
    assert all(r["iteration"] is not None for r in records if r["broken_by"] not in (None,))
    assert all(r["target"] is not None for r in records if r["broken_by"] in ("apgd-t", "fab-t"))
    acc = chain.robust_accuracy(records)
    assert acc["clean"] == 57 / 60 and acc["square"] == sum(r["robust"] for r in records) / 60
    # Attack by attack, each on the images every earlier one failed on.
    with torch.no_grad():
        alive = trained(x).argmax(1) == y
    for name in chain.attacks:
        idx = alive.nonzero()[:, 0]
        adv, recs = chain.run_attack(name, x[idx], y[idx], seed=7)
        for j, i in enumerate(idx.tolist()):
            if recs[j]["broken"]:
                assert records[i]["broken_by"] == name
                assert records[i]["iteration"] == recs[j]["iteration"]
                assert torch.equal(adv[j], x_adv[i])
                alive[i] = False
    assert [bool(a) for a in alive] == [r["robust"] for r in records]
    # start_at skips the attacks before it.
    _, later = chain.run(x, y, seed=7, start_at=2)
    assert not any(r["broken_by"] in ("apgd-ce", "apgd-t") for r in later)


# -------------------------------------------------------------------- gradient masking
class Quantised(nn.Module):
    """Quantise the input to 8 levels with a non-differentiable round, then classify: the input
    gradient is zero everywhere, so gradient attacks see nothing."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 7) / 7)


def test_gradient_masked_model_broken_by_square_not_by_pgd_or_apgd(trained, images):
    x, y = images[0][:100], images[1][:100]
    masked = Quantised(trained).eval()
    clean = robust(masked, x, y)
    r_pgd = robust(masked, PGD(masked, eps=EPS, steps=20, targeted=False, seed=0)(x, y), y)
    r_apgd = robust(masked, APGD(masked, eps=EPS, steps=20, seed=0)(x, y), y)
    r_square = robust(masked, Square(masked, eps=EPS, n_queries=300, seed=0)(x, y), y)
    assert r_pgd >= 0.8 * clean and r_apgd >= 0.8 * clean, (clean, r_pgd, r_apgd)
    assert r_square <= 0.7 * clean, (clean, r_square)
    _, records = run_chain(masked, x, y, eps=EPS, n_classes=K, steps=10, n_target_classes=2,
                           n_queries=300)
    assert sum(r["broken_by"] == "square" for r in records) >= 0.25 * clean


class PerImage(nn.Module):
    """Runs ``net`` one image at a time (logits independent of the batch), counting images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return torch.cat([self.net(x[i:i + 1]) for i in range(len(x))])


def test_square_skips_only_proposals_that_change_no_pixel(trained, images, monkeypatch):
    """Gray images: a window often already holds the proposed corner values. Not sending those
    proposals through the model changes no result, and saves passes."""
    x, y = images[0][:24], images[1][:24]
    model = PerImage(trained).eval()
    runs = {}
    for skip in (True, False):
        monkeypatch.setattr(Square, "_skip_unchanged", skip)
        model.images = 0
        attack = Square(model, eps=4 / 255, n_queries=400, seed=0)
        runs[skip] = (attack(x, y), attack.last_iteration, attack.last_margin, model.images)
    (adv, its, margin, passes), (adv_ref, its_ref, margin_ref, passes_ref) = runs[True], runs[False]
    assert adv.equal(adv_ref) and its.equal(its_ref) and margin.equal(margin_ref)
    assert (its_ref == -1).sum() >= 4  # some images ran all queries
    assert passes < 0.95 * passes_ref, (passes, passes_ref)


# --------------------------------------------------------------------------- the parts
def test_checkpoints_are_the_papers():
    """Croce & Hein 2020, Sec. 3.2: p_j = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99."""
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]


def test_linf_projection_matches_a_linear_program():
    """FAB's projection (minimal |d|_inf onto w.z = b inside [0, 1]) against scipy's LP."""
    g = torch.Generator().manual_seed(0)
    n, dim = 12, 7
    t = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w[0, :3] = 0.0  # zero weights stay put
    b = (w * t).sum(1) + torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    d = project_linf(t, w, b)
    for i in range(n):
        # variables (d_1..d_D, r): minimise r s.t. |d_j| <= r, -t_j <= d_j <= 1 - t_j, w.d = c
        c = float(b[i] - w[i] @ t[i])
        eye = np.eye(dim)
        a_ub = np.block([[eye, -np.ones((dim, 1))], [-eye, -np.ones((dim, 1))]])
        bounds = [(-float(t[i, j]), 1 - float(t[i, j])) for j in range(dim)] + [(0, None)]
        lp = linprog(c=[0] * dim + [1], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                     A_eq=np.append(w[i].numpy(), 0)[None], b_eq=[c], bounds=bounds)
        if lp.status == 2:  # the box does not reach the plane: every pixel moved to its bound
            assert float(w[i] @ d[i]) * c > 0
            continue
        assert lp.status == 0
        assert float(d[i].abs().max()) == pytest.approx(lp.fun, abs=1e-9)
        assert float(w[i] @ d[i]) == pytest.approx(c, abs=1e-9)
        assert ((t[i] + d[i]) >= -1e-12).all() and ((t[i] + d[i]) <= 1 + 1e-12).all()
    assert (d[0, :3] == 0).all()


def test_names_and_errors():
    model = bn_dropout_model()
    assert type(build_attack("apgd-ce", model)) is APGD
    assert build_attack("apgd-dlr", model).loss == "dlr"
    assert type(build_attack("APGD-T", model)) is APGDT
    assert type(build_attack("fab-t", model)) is FAB
    assert type(build_attack("square", model)) is Square
    assert AutoAttack(model, n_classes=K).attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    rand = AutoAttack(model, version="rand", n_classes=K)
    assert rand.attacks == ["apgd-ce", "apgd-dlr"] and rand.eot_iter == 20
    assert AutoAttack(model, n_classes=3).n_target_classes == 2
    assert set(ATTACK_NAMES) >= set(AutoAttack(model, n_classes=K).attacks)
    for bad in (dict(version="plus"), dict(attacks=["pgd"]), dict(steps=0),
                dict(n_queries=-1)):
        with pytest.raises(ValueError):
            AutoAttack(model, n_classes=K, **bad)
    with pytest.raises(ValueError):
        build_attack("square", model, steps=3)


def test_rand_version_averages_over_eot(images, trained):
    """EOT 20 on a model with random input noise: the chain still breaks images, within eps."""

    class Noisy(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x + 0.02 * torch.randn_like(x))

    x, y = images[0][:30], images[1][:30]
    torch.manual_seed(0)
    chain = AutoAttack(Noisy(trained), eps=EPS, version="rand", n_classes=K, steps=5,
                       eot_iter=4)
    x_adv, records = chain.run(x, y, seed=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert sum(r["broken_by"] in ("apgd-ce", "apgd-dlr") for r in records) >= 5


def test_fab_runs_in_float64(trained, images):
    """A float64 model and images: FAB's record of the closest distance has the images' dtype
    (it used to be float32, and indexing it with float64 distances raised)."""
    x, y = images
    model = copy.deepcopy(trained).double()
    attack = FAB(model, eps=EPS, steps=5, n_target_classes=2, seed=0, exact=True)
    x_adv = attack(x[:32].double(), y[:32])
    assert x_adv.dtype == torch.float64
    assert float((x_adv - x[:32].double()).abs().max()) <= EPS + 1e-12
    assert attack.last_broken.any()
