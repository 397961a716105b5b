"""Print the parity numbers against the authors' TensorFlow code, one line per quantity.

Reads the official fixtures (``tests/fixtures/official/*``: a checkpoint in the released npz
format and what the official ``nets.py`` / ``adv_model.py`` computed with it) and prints, per
fixture, float32 on this machine's CPU:

* logits error: ``max|ours - official| / max|official|`` on the clean input and on the official
  one-step PGD image (acceptance 1e-4, ``tests/hub/test_tensorpack.py``);
* one-step targeted PGD pixel agreement: the share of pixels of our ``PGD`` output (mapped to BGR
  [-1, 1]) within 1e-4 of the official ``pgd_adv_nchw``, with the exact gradients and with
  the speed layer of :mod:`featdenoise.accel` (acceptance 99.5%,
  ``tests/attacks/test_reference.py``).

Usage: ``python scripts/official_parity.py [FIXTURES_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from featdenoise.attacks import PGD
from featdenoise.hub.tensorpack import load_tensorpack

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"
ARCHS = {"resnet_1111": ("ResNet", [1, 1, 1, 1]),
         "resnet_denoise_2211": ("ResNetDenoise", [2, 2, 1, 1])}


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    """``max|ours - ref| / max|ref|``."""
    return float(np.abs(ours.numpy() - ref).max() / np.abs(ref).max())


def pgd_agreement(model, x: torch.Tensor, ref, fast: bool) -> float:
    """Share of pixels of one targeted PGD step within 1e-4 of the official image."""
    target = torch.from_numpy(ref["pgd_target"]).long()
    attack = PGD(model, eps=float(ref["eps"]) / 255, step_size=float(ref["step"]) / 255,
                 steps=int(ref["pgd_iter"]), targeted=True, random_start=False,
                 step_rule="paper", exact=not fast)
    adv = attack(x, torch.zeros_like(target), target=target)
    ours = adv.flip(1) * 2 - 1  # RGB [0, 1] -> BGR [-1, 1]
    return float(((ours - torch.from_numpy(ref["pgd_adv_nchw"])).abs() <= 1e-4).float().mean())


def main(folder: Path = FIXTURES) -> int:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, float32, CPU, {torch.get_num_threads()} threads")
    for name, (arch, blocks) in ARCHS.items():
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"official fixture {folder / name} is missing")
        model = load_tensorpack(folder / name / "checkpoint.npz", arch, blocks=blocks)
        ref = np.load(folder / name / "reference.npz", allow_pickle=False)
        bgr = ref["input_bgr_uint8"]  # [N, H, W, 3] uint8 BGR
        x = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255
        adv = (torch.from_numpy(ref["pgd_adv_nchw"]).flip(1) + 1) / 2  # official adv, RGB [0, 1]
        with torch.no_grad():
            clean_err = rel_err(model(x), ref["logits"])
            adv_err = rel_err(model(adv), ref["pgd_adv_logits"])
        exact = pgd_agreement(model, x, ref, fast=False)
        fast = pgd_agreement(model, x, ref, fast=True)
        print(f"{name} ({arch}): logits error clean {clean_err:.1e}, on the official PGD image "
              f"{adv_err:.1e}; one-step PGD pixels within 1e-4: {exact:.2%} exact, "
              f"{fast:.2%} accelerated")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURES))
