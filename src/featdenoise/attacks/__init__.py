"""Attacks of the paper (Sec. 5, 6 and footnote 4), on [0, 1] RGB pixels (``eps=16/255`` = 16).

- :class:`PGD`: the paper's targeted PGD (official ``adv_model.py`` rule), random or clean start,
  restarts, bf16 option; :class:`FGSM`, :class:`IFGSM` (BIM), :class:`MIFGSM` (momentum).
- :func:`build_attack` picks one by name; :func:`draw_targets` draws ``(y + U{1..K-1}) mod K``.
- :mod:`featdenoise.attacks.metrics`: per-image outcomes, accuracy and targeted success rate.
- :class:`LinfBall` is the threat model (projection, random start) the update rules walk in.
- Every attack runs its passes inside :func:`featdenoise.accel.inference_grad` (BatchNorm folded,
  packed convolutions: the same function up to float rounding) unless built with ``exact=True``.
"""

from __future__ import annotations

from torch import nn

from featdenoise.attacks import metrics
from featdenoise.attacks.base import Attack, draw_targets
from featdenoise.attacks.fgsm import FGSM, IFGSM, MIFGSM
from featdenoise.attacks.pgd import PGD
from featdenoise.attacks.threat import LinfBall

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "fgsm": FGSM, "ifgsm": IFGSM, "mifgsm": MIFGSM}


def build_attack(name: str, model: nn.Module, **kwargs) -> Attack:
    """Build an attack by name (``"pgd"``, ``"fgsm"``, ``"ifgsm"``, ``"mifgsm"``) from kwargs."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "bim":
        key = "ifgsm"
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    try:
        return ATTACKS[key](model, **kwargs)
    except TypeError as err:
        raise ValueError(f"attack {name!r}: {err}") from None


__all__ = ["ATTACKS", "Attack", "FGSM", "IFGSM", "LinfBall", "MIFGSM", "PGD", "build_attack",
           "draw_targets", "metrics"]
