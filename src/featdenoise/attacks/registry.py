"""The attacks by name: the one list the command line and the evaluation take their choices from.

- :data:`ATTACKS`: the sweep attacks, the paper's PGD (Sec. 6) and the attackers of its
  footnote 4 (FGSM, iterative FGSM, momentum iterative FGSM), with their classes;
- :data:`AUTOATTACK_ATTACKS`: the members of AutoAttack (Croce & Hein, ICML 2020) in chain order,
  with their classes (``"apgd-dlr"`` is :class:`~featdenoise.attacks.apgd.APGD` with the options
  of :data:`FIXED_OPTIONS`);
- :data:`AUTOATTACK_VERSIONS`: the chain of each of the authors' versions;
- :func:`build_attack`: one attack by name, from keywords.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from featdenoise.attacks.apgd import APGD, APGDT
from featdenoise.attacks.base import Attack
from featdenoise.attacks.fab import FAB
from featdenoise.attacks.fgsm import FGSM, IFGSM, MIFGSM
from featdenoise.attacks.pgd import PGD
from featdenoise.attacks.square import Square

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "fgsm": FGSM, "ifgsm": IFGSM, "mifgsm": MIFGSM}
# AutoAttack's members: untargeted in outcome (success = misclassified), with per-image results.
AUTOATTACK_ATTACKS: dict[str, type[Attack]] = {"apgd-ce": APGD, "apgd-dlr": APGD, "apgd-t": APGDT,
                                               "fab-t": FAB, "square": Square}
FIXED_OPTIONS: dict[str, dict[str, Any]] = {"apgd-dlr": {"loss": "dlr"}}  # over the caller's
AUTOATTACK_VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}


def _key(name: str) -> str:
    """``name`` as :func:`build_attack` matches it: lower case, without ``-`` and ``_``."""
    return name.lower().replace("-", "").replace("_", "")


_NAMES = {_key(name): name for name in (*ATTACKS, *AUTOATTACK_ATTACKS)} | {"bim": "ifgsm"}
_CHOICES = sorted(_key(name) for name in (*ATTACKS, *AUTOATTACK_ATTACKS)
                  if name not in FIXED_OPTIONS)  # each class once, as the error names them


def build_attack(name: str, model: nn.Module, **kwargs: Any) -> Attack:
    """Build an attack by name (``"pgd"``, ``"fgsm"``, ``"ifgsm"`` (or ``"bim"``),
    ``"mifgsm"``, ``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"``, ``"square"``; ``"apgd-dlr"`` is
    ``"apgd-ce"`` with ``loss="dlr"``; case, ``-`` and ``_`` do not matter) from kwargs (the
    class's keywords); a wrong name or keyword is one ValueError line."""
    full = _NAMES.get(_key(name))
    if full is None:
        raise ValueError(f"unknown attack {name!r}; choose one of {_CHOICES}")
    cls = ATTACKS.get(full) or AUTOATTACK_ATTACKS[full]
    try:
        return cls(model, **{**kwargs, **FIXED_OPTIONS.get(full, {})})
    except TypeError as err:
        raise ValueError(f"attack {name!r}: {err}") from None
