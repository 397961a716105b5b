"""AutoAttack (Croce & Hein, ICML 2020): the ensemble the field reports robustness with, L-infinity.

Versions (as in the authors' code):

- ``"standard"``: APGD-CE (100 iterations, no restarts) -> APGD-T (targeted DLR, 9 target classes,
  fewer when there are fewer classes: K - 1, 100 iterations each) -> FAB-T (9 target classes,
  100 iterations each) -> Square (5000 queries, p_init 0.8);
- ``"rand"`` (randomised defences): APGD-CE -> APGD-DLR, each with EOT over 20 passes per gradient.

Each attack runs only on the images every earlier attack failed on; an image's result is the first
attack that broke it. Images the model misclassifies clean are not attacked (``broken_by="clean"``).
Eps is on the [0, 1] scale: the paper's 16 is ``16 / 255``; RobustBench's ImageNet setting is
``4 / 255`` on 5000 validation images.

API (what an evaluation engine calls)::

    aa = AutoAttack(model, eps=4 / 255, version="standard", n_classes=1000)
    aa.attacks                                  # ["apgd-ce", "apgd-t", "fab-t", "square"]
    # whole chain on a batch (start_at skips the first attacks: the caller passes only the
    # images still unbroken by them):
    x_adv, records = aa.run(x, y, seed=batch_seed, start_at=0)
    # one attack of the chain on a batch (resume an attack from its last finished batch;
    # pass only the images every earlier attack failed on):
    x_adv, records = aa.run_attack("apgd-t", x, y, seed=batch_seed)
    aa.robust_accuracy(records)                 # {"clean": .., "apgd-ce": .., ...}
    run_chain(model, x, y, eps, version="standard", seed=0)   # the same as one call

``run`` returns one dict per image (JSON-ready)::

    {"clean_correct": bool, "broken_by": "apgd-t" | "clean" | None, "iteration": int | None,
     "target": int | None, "margin": float, "robust": bool}

``run_attack`` returns per image ``{"attack", "broken", "iteration", "target", "margin"}``.
``iteration`` is the APGD/FAB iteration (0 = the random start) or the Square query count at which
the image was first misclassified; ``target`` the target class of APGD-T / FAB-T's successful run;
``margin`` is ``f_y - max_{k != y} f_k`` on the returned image (< 0 iff broken; for an image no
attack broke, the lowest margin the chain found). Results are deterministic for a given
``seed`` and batch; every attack of the chain gets its own seed derived from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featdenoise.attacks.apgd import APGD, APGDT
from featdenoise.attacks.fab import FAB
from featdenoise.attacks.options import ChainOptions
from featdenoise.attacks.outcome import OutcomeAttack, margins
from featdenoise.attacks.registry import AUTOATTACK_ATTACKS, AUTOATTACK_VERSIONS
from featdenoise.attacks.square import Square
from featdenoise.attacks.threat import LinfBall
from featdenoise.models.registry import model_label
from featdenoise.runtime.finite import check_finite_logits
from featdenoise.runtime.modes import eval_mode
from featdenoise.runtime.seeds import derive_seed

if TYPE_CHECKING:
    from typing import Unpack  # Python >= 3.11; annotations only

ATTACK_NAMES = tuple(AUTOATTACK_ATTACKS)  # the members, in chain order (the registry's)
VERSIONS = AUTOATTACK_VERSIONS


class RunChainOptions(ChainOptions, total=False):
    """:func:`run_chain`'s keywords besides its own: :class:`ChainOptions` and ``n_classes``
    (:class:`AutoAttack`)."""

    n_classes: int | None


def attack_seed(seed: int, name: str) -> int:
    """Seed of attack ``name`` for a batch seeded ``seed`` (the same whichever attacks run)."""
    return derive_seed(seed, "autoattack", name)


class AutoAttack:
    """The AutoAttack chain with per-image records (module docstring for the API).

    Args:
        model: classifier on [0, 1] RGB ``[N, C, H, W]`` returning logits ``[N, K]``.
        eps: L-infinity budget on the [0, 1] scale (``16 / 255`` = the paper's 16;
            RobustBench ImageNet: ``4 / 255``).
        version: ``"standard"`` or ``"rand"``.
        n_classes: K (caps the target classes at K - 1); default ``model.num_classes`` or read
            from the logits.
        seed: default seed of :meth:`run` / :meth:`run_attack`.
        attacks: a subset of the version's attacks (or of ``ATTACK_NAMES``), run in the given
            order; default: the version's chain.
        **options: what the members get (:class:`~featdenoise.attacks.options.ChainOptions`):
            the budget, ``steps`` (APGD / FAB iterations, 100), ``n_target_classes`` (APGD-T /
            FAB-T targets, 9), ``n_queries`` (Square queries, 5000), ``eot_iter`` (EOT passes,
            1; 20 in 'rand'), and the rest, passed to every attack
            (:class:`~featdenoise.attacks.base.Attack`: bf16, channels_last, exact).
            A smaller budget gives a cheaper, weaker check (not AutoAttack any more: say so).
    """

    def __init__(self, model: nn.Module, eps: float = 16 / 255, version: str = "standard",
                 n_classes: int | None = None, seed: int = 0,
                 attacks: list[str] | tuple[str, ...] | None = None,
                 **options: Unpack[ChainOptions]):
        if version not in VERSIONS:
            raise ValueError(f"version={version!r} is unknown; use one of {sorted(VERSIONS)}")
        names = list(VERSIONS[version] if attacks is None else attacks)
        unknown = [a for a in names if a not in ATTACK_NAMES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"attacks={names}: give distinct names among {list(ATTACK_NAMES)}")
        if n_classes is not None and n_classes < 2:
            raise ValueError(f"n_classes={n_classes} must be >= 2")
        self.model = model
        self.eps = LinfBall(eps).eps  # refused here (not at the first batch) when not in [0, 1]
        self.version = version
        self.attacks = names
        self.n_classes = n_classes if n_classes is not None else getattr(model, "num_classes",
                                                                         None)
        self.seed = int(seed)
        self.steps = int(options.pop("steps", 100))
        self.n_target_classes = int(options.pop("n_target_classes", 9))
        if self.n_classes is not None:
            self.n_target_classes = min(self.n_target_classes, int(self.n_classes) - 1)
        self.n_queries = int(options.pop("n_queries", 5000))
        eot_iter = options.pop("eot_iter", None)
        self.eot_iter = int(eot_iter if eot_iter is not None else
                            (20 if version == "rand" else 1))
        self.kwargs: dict[str, Any] = dict(options)  # the rest: passed to every member
        for name in names:  # validate every setting now, not half-way through an evaluation
            self.build(name, 0)

    def __repr__(self) -> str:
        return (f"AutoAttack(eps={self.eps * 255:g}/255, version={self.version!r}, "
                f"attacks={self.attacks}, steps={self.steps}, "
                f"n_target_classes={self.n_target_classes}, n_queries={self.n_queries}, "
                f"eot_iter={self.eot_iter})")

    def build(self, name: str, seed: int) -> OutcomeAttack:
        """Attack ``name`` of the chain with this chain's settings and the seed of a batch
        seeded ``seed``."""
        if name not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {name!r}; choose one of {list(ATTACK_NAMES)}")
        common: dict[str, Any] = dict(eps=self.eps, seed=attack_seed(seed, name),
                                      num_classes=self.n_classes, **self.kwargs)
        if name in ("apgd-ce", "apgd-dlr"):
            return APGD(self.model, steps=self.steps, loss=name[5:], restarts=1,
                        eot_iter=self.eot_iter, **common)
        if name == "apgd-t":
            return APGDT(self.model, steps=self.steps, n_target_classes=self.n_target_classes,
                         restarts=1, eot_iter=self.eot_iter, **common)
        if name == "fab-t":
            return FAB(self.model, steps=self.steps, n_target_classes=self.n_target_classes,
                       restarts=1, **common)
        return Square(self.model, n_queries=self.n_queries, p_init=0.8, restarts=1,
                      rescale_schedule=False, **common)

    # ----------------------------------------------------------------------------- running
    def run_attack(self, name: str | int, x: torch.Tensor, y: torch.Tensor,
                   seed: int | None = None) -> tuple[torch.Tensor, list[dict]]:
        """Run ONE attack of the chain on a batch.

        Args:
            name: the attack's name or its index in :attr:`attacks`.
            x: images ``[N, C, H, W]`` in [0, 1] (never modified); pass only the images every
                earlier attack failed on. y: labels ``[N]``.
            seed: the batch's seed (default: the chain's).
        Returns:
            ``(x_adv [N, C, H, W], records)``: one dict per image, ``{"attack", "broken",
            "iteration", "target", "margin"}`` (module docstring).
        """
        name = self.attacks[name] if isinstance(name, int) else name
        attack = self.build(name, self.seed if seed is None else seed)
        x_adv = attack(x, y)
        broken, its, targets, margin = (attack.last_broken, attack.last_iteration,
                                        attack.last_target_class, attack.last_margin)
        assert (broken is not None and its is not None and targets is not None
                and margin is not None)  # set by every call
        records = [{"attack": name, "broken": bool(b), "iteration": int(i) if b else None,
                    "target": int(t) if b and t >= 0 else None, "margin": float(m)}
                   for b, i, t, m in zip(broken.tolist(), its.tolist(), targets.tolist(),
                                         margin.tolist(), strict=True)]
        return x_adv, records

    def run(self, x: torch.Tensor, y: torch.Tensor, seed: int | None = None,
            start_at: int = 0) -> tuple[torch.Tensor, list[dict]]:
        """Run the chain from attack ``start_at`` on a batch.

        Args:
            x: images ``[N, C, H, W]`` in [0, 1] (never modified); y: labels ``[N]``.
            seed: the batch's seed (default: the chain's).
            start_at: index in :attr:`attacks` of the first attack to run (the caller passes
                only images the earlier attacks failed on).
        Returns:
            ``(x_adv, records)``: adversarial images (the breaking attack's point; for unbroken
            images the lowest-margin point found) and one dict per image (module docstring).
        """
        if not 0 <= start_at <= len(self.attacks):
            raise ValueError(f"start_at={start_at} must be in [0, {len(self.attacks)}]")
        seed = self.seed if seed is None else seed
        y = y.to(device=x.device, dtype=torch.long)
        with torch.no_grad(), eval_mode(self.model):
            clean = self.model(x.detach()).float()  # [N, K]
            check_finite_logits(clean, f"AutoAttack: {model_label(self.model)}")
            clean_margin = margins(clean, y)
        clean_correct = clean_margin > 0
        n = len(x)
        x_adv = x.detach().clone()
        margin = clean_margin.clone()
        broken_by: list[str | None] = [None if c else "clean" for c in clean_correct.tolist()]
        iteration: list[int | None] = [None if c else 0 for c in clean_correct.tolist()]
        target: list[int | None] = [None] * n
        alive = clean_correct.clone()
        for name in self.attacks[start_at:]:
            idx = alive.nonzero()[:, 0]
            if len(idx) == 0:
                break
            adv, recs = self.run_attack(name, x[idx], y[idx], seed)
            for j, (i, rec) in enumerate(zip(idx.tolist(), recs, strict=True)):
                if rec["broken"]:
                    broken_by[i], iteration[i], target[i] = name, rec["iteration"], rec["target"]
                    alive[i] = False
                if rec["broken"] or rec["margin"] < margin[i]:
                    x_adv[i] = adv[j]
                    margin[i] = rec["margin"]
        records = [{"clean_correct": bool(c), "broken_by": b, "iteration": it, "target": t,
                    "margin": float(m), "robust": b is None}
                   for c, b, it, t, m in zip(clean_correct.tolist(), broken_by, iteration,
                                             target, margin.tolist(), strict=True)]
        return x_adv, records

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``run(x, y)[0]``: adversarial images only."""
        return self.run(x, y)[0]

    def robust_accuracy(self, records: list[dict]) -> dict[str, float]:
        """Accuracy ``{"clean": .., name: robust accuracy after that attack, ...}`` over
        ``records`` (from :meth:`run`), each a fraction of ``len(records)``."""
        n = max(len(records), 1)
        left = sum(r["broken_by"] != "clean" for r in records)
        out = {"clean": left / n}
        for name in self.attacks:
            left -= sum(r["broken_by"] == name for r in records)
            out[name] = left / n
        return out


def run_chain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 16 / 255,
              version: str = "standard", seed: int = 0, start_at: int = 0,
              attacks: list[str] | None = None,
              **options: Unpack[RunChainOptions]) -> tuple[torch.Tensor, list[dict]]:
    """AutoAttack on one batch in one call: ``AutoAttack(...).run(x, y, seed, start_at)``.

    Args: see :class:`AutoAttack` (``options``: n_classes, steps, n_target_classes, n_queries,
    eot_iter and the attacks' options). Returns ``(x_adv [N, C, H, W], records)``.
    """
    chain = AutoAttack(model, eps=eps, version=version, seed=seed, attacks=attacks, **options)
    return chain.run(x, y, seed=seed, start_at=start_at)
