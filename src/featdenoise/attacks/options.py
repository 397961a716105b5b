"""The keyword options every attack shares, declared once for the attacks that pass them on.

:class:`~featdenoise.attacks.base.Attack` takes these options and owns their meaning, defaults
and checks; an attack's own constructor lists only its own parameters and forwards the rest as
``**options: Unpack[AttackOptions]``, so ``PGD(model, eps=16/255, steps=10, seed=0, exact=True)``
reads as before and a type checker still sees every keyword. :class:`ChainOptions` are the
keywords :class:`~featdenoise.attacks.autoattack.AutoAttack` passes on to its members.
"""

from __future__ import annotations

from typing import TypedDict


class PassOptions(TypedDict, total=False):
    """How an attack computes its forward and input-gradient passes (same results up to float
    rounding; meaning and defaults: :class:`~featdenoise.attacks.base.Attack`).

    ``bf16`` (False): bfloat16 autocast; ``channels_last`` (None: decided per call): NHWC
    copies of 4-D images; ``exact`` (False): PyTorch's normal path only, no speed layer.
    """

    bf16: bool
    channels_last: bool | None
    exact: bool


class AttackOptions(PassOptions, total=False):
    """Every option of :class:`~featdenoise.attacks.base.Attack` besides ``model`` and ``eps``.

    ``targeted`` (True: the paper's setting, Sec. 6; AutoAttack's members ignore it),
    ``seed`` (None: torch's global generator), ``num_classes`` (None: ``model.num_classes``,
    else read from the logits), and the :class:`PassOptions`.
    """

    targeted: bool
    seed: int | None
    num_classes: int | None


class ChainOptions(PassOptions, total=False):
    """What :class:`~featdenoise.attacks.autoattack.AutoAttack` hands on to its members: the
    budget and the :class:`PassOptions` (``targeted`` is accepted and ignored: the members are
    untargeted in outcome).

    ``steps`` (100): APGD / FAB iterations; ``n_target_classes`` (9, capped at K - 1): APGD-T /
    FAB-T targets; ``n_queries`` (5000): Square queries; ``eot_iter`` (None: 1, or 20 in
    ``"rand"``): APGD's passes averaged per gradient. Smaller values give a cheaper, weaker
    check (not AutoAttack any more: say so).
    """

    steps: int
    n_target_classes: int
    n_queries: int
    eot_iter: int | None
    targeted: bool
