"""Attacks of the paper (Sec. 5, 6 and footnote 4), on [0, 1] RGB pixels (``eps=16/255`` = 16).

- :class:`PGD`: the paper's targeted PGD (official ``adv_model.py`` rule), random or clean start,
  restarts, bf16 option; :class:`FGSM`, :class:`IFGSM` (BIM), :class:`MIFGSM` (momentum).
- :mod:`~featdenoise.attacks.registry` names them (:data:`ATTACKS`, :data:`AUTOATTACK_ATTACKS`,
  :data:`AUTOATTACK_VERSIONS`: the choices of the command line and the evaluation);
  :func:`build_attack` picks one by name; :func:`draw_targets` draws ``(y + U{1..K-1}) mod K``.
- The options every attack shares (targeted, seed, num_classes, bf16, channels_last, exact) are
  declared once, in :class:`~featdenoise.attacks.base.Attack` (typed as :class:`AttackOptions`);
  each attack's constructor lists only its own.
- Rates (accuracy, targeted success) live in :mod:`featdenoise.evaluation.metrics`.
- :class:`LinfBall` is the threat model (projection, random start) the update rules walk in.
- AutoAttack (Croce & Hein, ICML 2020): :class:`APGD`, :class:`APGDT`, :class:`FAB` (FAB-T),
  :class:`Square` and the chain :class:`AutoAttack` / :func:`run_chain` with per-image records.
- Every attack runs its passes inside :func:`featdenoise.accel.inference_grad` (BatchNorm folded,
  packed convolutions: the same function up to float rounding) unless built with ``exact=True``.
"""

from __future__ import annotations

from featdenoise.attacks.apgd import APGD, APGDT
from featdenoise.attacks.autoattack import AutoAttack, run_chain
from featdenoise.attacks.base import Attack, draw_targets
from featdenoise.attacks.fab import FAB
from featdenoise.attacks.fgsm import FGSM, IFGSM, MIFGSM
from featdenoise.attacks.options import AttackOptions
from featdenoise.attacks.pgd import PGD
from featdenoise.attacks.registry import (
    ATTACKS,
    AUTOATTACK_ATTACKS,
    AUTOATTACK_VERSIONS,
    build_attack,
)
from featdenoise.attacks.square import Square
from featdenoise.attacks.threat import LinfBall

__all__ = ["APGD", "APGDT", "ATTACKS", "AUTOATTACK_ATTACKS", "AUTOATTACK_VERSIONS", "Attack",
           "AttackOptions", "AutoAttack", "FAB", "FGSM", "IFGSM", "LinfBall", "MIFGSM", "PGD",
           "Square", "build_attack", "draw_targets", "run_chain"]
