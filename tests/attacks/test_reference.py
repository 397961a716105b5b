"""Attacks against independent implementations: the official TF attacker and torchattacks.

- Official: ``tests/fixtures/official/*/reference.npz`` holds one targeted PGD step of the
  authors' ``adv_model.py`` ``PGDAttacker`` (BGR, [-1, 1]); our PGD on [0, 1] RGB, mapped to that
  scale, must match on >= 99.5% of pixels (fixture README).
- torchattacks (an independent PyTorch implementation): PGD, BIM, MIFGSM and FGSM with the same
  start and settings give the same adversarial images. Float64 keeps gradient signs away from
  rounding ties, so the comparison is nearly exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import OFFICIAL

from featdenoise.attacks import FGSM, IFGSM, MIFGSM, PGD
from featdenoise.models import create_model

FIXTURES = OFFICIAL
FOLDERS = {"resnet_1111": ("ResNet", [1, 1, 1, 1]),
           "resnet_denoise_2211": ("ResNetDenoise", [2, 2, 1, 1])}


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "accelerated"])
@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_pgd_matches_official_attacker(folder, exact):
    assert (FIXTURES / folder).is_dir(), f"official fixture missing: {FIXTURES / folder}"
    from featdenoise.hub.tensorpack import load_tensorpack

    arch, blocks = FOLDERS[folder]
    model = load_tensorpack(FIXTURES / folder / "checkpoint.npz", arch, blocks=blocks)
    ref = np.load(FIXTURES / folder / "reference.npz")
    bgr = ref["input_bgr_uint8"]  # [N, H, W, 3] uint8 BGR
    x = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255  # RGB [0, 1]
    target = torch.from_numpy(ref["pgd_target"]).long()
    attack = PGD(model, eps=float(ref["eps"]) / 255, step_size=float(ref["step"]) / 255,
                 steps=int(ref["pgd_iter"]), targeted=True, random_start=False,
                 step_rule="paper", exact=exact)
    x_adv = attack(x, torch.zeros_like(target), target=target)
    ours = x_adv.flip(1) * 2 - 1  # RGB [0, 1] -> BGR [-1, 1], NCHW
    official = torch.from_numpy(ref["pgd_adv_nchw"])
    close = (ours - official).abs() <= 1e-4
    assert close.float().mean() >= 0.995, f"only {close.float().mean():.4%} of pixels match"
    assert torch.equal(attack.last_target, target)
    moved = ((official + 1) / 2 * 255 - bgr_nchw(bgr)).abs()
    assert moved.max() > 15, "fixture sanity: the official step moved pixels by eps"


def bgr_nchw(bgr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bgr).permute(0, 3, 1, 2).double()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("small_resnet", in_channels=3, num_classes=10, width=8, blocks=[1, 1, 1])
    return model.double().eval()


def data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, (y + 1 + torch.randint(0, 9, (n,), generator=g)) % 10


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor) -> None:
    same = (ours - theirs).abs() <= 1e-9
    assert same.float().mean() >= 0.999, f"only {same.float().mean():.4%} of pixels agree"
    assert (ours != x).float().mean() > 0.3  # moved (signs that flip return a pixel)


def torchattacks_attack(atk, targeted: bool):
    if targeted:
        atk.set_mode_targeted_by_label(quiet=True)
    return atk


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_matches_torchattacks(targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model = small_model()
    x, y, target = data()
    eps, alpha, steps = 8 / 255, 2 / 255, 5
    ours = PGD(model, eps=eps, step_size=alpha, steps=steps, targeted=targeted,
               random_start=False, step_rule="fixed")(x, y, target)
    atk = torchattacks_attack(
        torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False), targeted)
    theirs = atk(x, target if targeted else y)
    assert_same(ours, theirs, x)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_ifgsm_mifgsm_match_torchattacks(targeted):
    torchattacks = pytest.importorskip("torchattacks")
    model = small_model()
    x, y, target = data()
    labels = target if targeted else y
    eps, alpha, steps = 8 / 255, 1 / 255, 4
    pairs = [
        (FGSM(model, eps=eps, targeted=targeted), torchattacks.FGSM(model, eps=eps)),
        (IFGSM(model, eps=eps, step_size=alpha, steps=steps, targeted=targeted,
               step_rule="fixed"), torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)),
        (MIFGSM(model, eps=eps, step_size=alpha, steps=steps, targeted=targeted,
                step_rule="fixed", decay=1.0),
         torchattacks.MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=1.0)),
    ]
    for ours, theirs in pairs:
        assert_same(ours(x, y, target), torchattacks_attack(theirs, targeted)(x, labels), x)
