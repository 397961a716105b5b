"""Attacks of the paper (Sec. 5, 6 and footnote 4), on [0, 1] RGB pixels (``eps=16/255`` = 16).

- :class:`PGD`: the paper's targeted PGD (official ``adv_model.py`` rule), random or clean start,
  restarts, bf16 option; :class:`FGSM`, :class:`IFGSM` (BIM), :class:`MIFGSM` (momentum).
- :func:`build_attack` picks one by name; :func:`draw_targets` draws ``(y + U{1..K-1}) mod K``.
- Rates (accuracy, targeted success) live in :mod:`featdenoise.evaluation.metrics`.
- :class:`LinfBall` is the threat model (projection, random start) the update rules walk in.
- AutoAttack (Croce & Hein, ICML 2020): :class:`APGD`, :class:`APGDT`, :class:`FAB` (FAB-T),
  :class:`Square` and the chain :class:`AutoAttack` / :func:`run_chain` with per-image records.
- Every attack runs its passes inside :func:`featdenoise.accel.inference_grad` (BatchNorm folded,
  packed convolutions: the same function up to float rounding) unless built with ``exact=True``.
"""

from __future__ import annotations

from torch import nn

from featdenoise.attacks.apgd import APGD, APGDT
from featdenoise.attacks.autoattack import AutoAttack, run_chain
from featdenoise.attacks.base import Attack, draw_targets
from featdenoise.attacks.fab import FAB
from featdenoise.attacks.fgsm import FGSM, IFGSM, MIFGSM
from featdenoise.attacks.pgd import PGD
from featdenoise.attacks.square import Square
from featdenoise.attacks.threat import LinfBall

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "fgsm": FGSM, "ifgsm": IFGSM, "mifgsm": MIFGSM}
# AutoAttack's members: untargeted in outcome (success = misclassified), with per-image results.
AUTOATTACK_ATTACKS: dict[str, type[Attack]] = {"apgdce": APGD, "apgdt": APGDT, "fabt": FAB,
                                               "square": Square}


def build_attack(name: str, model: nn.Module, **kwargs) -> Attack:
    """Build an attack by name (``"pgd"``, ``"fgsm"``, ``"ifgsm"``, ``"mifgsm"``, ``"apgd-ce"``,
    ``"apgd-t"``, ``"fab-t"``, ``"square"``; ``"apgd-dlr"`` is ``"apgd-ce"`` with ``loss="dlr"``)
    from kwargs."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "bim":
        key = "ifgsm"
    if key == "apgddlr":
        key, kwargs = "apgdce", {**kwargs, "loss": "dlr"}
    registry = {**ATTACKS, **AUTOATTACK_ATTACKS}
    if key not in registry:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(registry)}")
    try:
        return registry[key](model, **kwargs)
    except TypeError as err:
        raise ValueError(f"attack {name!r}: {err}") from None


__all__ = ["APGD", "APGDT", "ATTACKS", "AUTOATTACK_ATTACKS", "Attack", "AutoAttack", "FAB", "FGSM",
           "IFGSM", "LinfBall", "MIFGSM", "PGD", "Square", "build_attack", "draw_targets",
           "run_chain"]
