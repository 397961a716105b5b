"""Bookkeeping shared by every attack: model mode, parameter gradients, targets, randomness.

A subclass writes only its update rule (:meth:`Attack._perturb`); this base class

- runs the model in eval mode during the attack (BatchNorm with running statistics, as the
  official ``adv_model.py`` does with ``argscope(BatchNorm, training=False)``) and restores every
  module's own ``training`` flag afterwards, so a model in a mixed mode comes back exactly as given;
- computes gradients with respect to the input only (:func:`torch.autograd.grad`), with the
  parameters' ``requires_grad`` switched off for the duration of the attack, so backward computes no
  weight gradient at all and no ``.grad`` is ever touched (flags are restored afterwards);
- never modifies the caller's input in place; each step works on a detached, attack-owned tensor;
- draws targets ``(y + U{1..K-1}) mod K`` (paper Sec. 6: "the targeted class is selected uniformly
  at random" among the wrong classes) from its own seeded generator and keeps them in
  :attr:`Attack.last_target`.

Pass the bare module to an attack, not a ``DistributedDataParallel`` wrapper (``ddp.module``):
the attack's forward passes must not take part in gradient synchronisation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks.fold import fold_is_exact, folded_batchnorm
from featdenoise.attacks.prepack import ConvPacker, prepacked_convolutions
from featdenoise.attacks.threat import LinfBall


@dataclasses.dataclass
class _SpeedCaches:
    """What the speed options keep for one model, shared by every attack on it (an evaluation
    builds a new attack per batch, training two per run): whether folding is exact, the folded
    weights and the packed convolutions, each refreshed whenever the model's tensors change."""

    fold_exact: bool | None = None
    folded: dict = dataclasses.field(default_factory=dict)
    packer: ConvPacker = dataclasses.field(default_factory=ConvPacker)


# Weak keys: the caches go with the model; they hold no strong reference to any module.
_CACHES: weakref.WeakKeyDictionary[nn.Module, _SpeedCaches] = weakref.WeakKeyDictionary()


def speed_caches(model: nn.Module) -> _SpeedCaches:
    """The speed options' caches of ``model`` (created on first use)."""
    caches = _CACHES.get(model)
    if caches is None:
        caches = _CACHES[model] = _SpeedCaches()
    return caches


def draw_targets(y: torch.Tensor, num_classes: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random wrong-class targets ``(y + U{1..K-1}) mod K``, one per image (paper Sec. 6).

    The official ``PGDAttacker._create_random_target`` rule: uniform over the K-1 classes that are
    not the label, so a target never equals ``y``.

    Args:
        y: labels ``[N]`` (int64) in ``[0, K)``.
        num_classes: K >= 2.
        generator: source of randomness (on ``y``'s device); None uses torch's global generator.
    Returns:
        targets ``[N]`` int64 on ``y``'s device.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a targeted attack needs at least 2 classes")
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y.long() + offset) % num_classes


class Attack:
    """Base class of the attacks: bookkeeping only; subclasses implement :meth:`_perturb`.

    Args:
        model: classifier taking ``[N, C, H, W]`` RGB in [0, 1] and returning logits ``[N, K]``.
        eps: L-infinity budget on the [0, 1] scale (``16 / 255`` = the paper's 16, Sec. 6).
        targeted: True (the paper's setting, Sec. 6): descend the cross-entropy to a target class;
            False: ascend the cross-entropy to the label.
        seed: seeds the attack's own generator (random starts, targets, start coins); the same seed
            on the same inputs gives the same result. None: torch's global generator.
        num_classes: K for drawing targets; default ``model.num_classes``, else read from logits.
        bf16: run the attack's forward/backward passes under bfloat16 autocast (the official
            ``--use-fp16xla`` idea); off by default. Losses are still computed in float32.
        channels_last: run the attack on a channels-last (NHWC) copy of 4-D images (same
            values; the result is returned in the caller's layout). None (default) decides per
            call where it was measured to pay: on a CPU running one thread with batches < 16,
            where PyTorch computes 1x1 convolutions as GEMMs, much faster on NHWC data (ResNet-50:
            ~1.5x); elsewhere it measured equal or slower, so images stay as given.
        fold_bn: during the attack, fold each eval-mode BatchNorm into the convolution before it
            (:mod:`featdenoise.attacks.fold`; the same function up to float rounding), checked
            once per model against the unfolded logits and skipped if they differ. Default False:
            folding moves logits by ~1e-7 relative, which flips the sign of near-zero input
            gradients; on the official fixtures with 2 CPU threads the pixel agreement with the
            authors' attacker moves from 99.84% to 99.83% (denoise) and from 99.92% to 99.96%
            (plain). Training turns
            it on (speed matters there, exactness to the last bit does not). The folded
            weights are kept per model, for every attack on it, while the model's tensors are
            unchanged (two extra copies of the conv weights for the model's lifetime).
        prepack: on a CPU in float32, run each convolution on weights packed once for oneDNN
            instead of at every call, forward and input gradient
            (:mod:`featdenoise.attacks.prepack`; the same function up to float rounding, each
            conv and shape checked once; skipped under ``bf16`` and for a ``torch.compile``d
            model). Default False, like ``fold_bn``: the input gradient
            is not bit-identical (~5e-7 relative), although on the official fixtures the pixel
            agreement with the authors' attacker is unchanged (99.92% and 99.84%);
            training and ``bench attacks`` turn it on. ResNet-50, 64x64, batch 8: 14-17% faster.

    Call ``attack(x, y, target=None)`` (or the object itself) to get ``x_adv``.
    """

    name = "attack"

    def __init__(self, model: nn.Module, eps: float = 16 / 255, targeted: bool = True,
                 seed: int | None = None, num_classes: int | None = None, bf16: bool = False,
                 channels_last: bool | None = None, fold_bn: bool = False,
                 prepack: bool = False):
        self.model = model
        self.threat = LinfBall(eps)
        self.targeted = bool(targeted)
        self.seed = seed
        self.num_classes = num_classes if num_classes is not None else getattr(
            model, "num_classes", None)
        self.bf16 = bool(bf16)
        self.channels_last = channels_last
        self.fold_bn = bool(fold_bn)
        self.prepack = bool(prepack)
        self.last_target: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def eps(self) -> float:
        """L-infinity budget on the [0, 1] scale."""
        return self.threat.eps

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps * 255:g}/255, targeted={self.targeted}, "
                f"seed={self.seed})")

    # ----------------------------------------------------------------------------- public API
    def attack(self, x: torch.Tensor, y: torch.Tensor,
               target: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial images for ``x``.

        Args:
            x: clean images ``[N, C, H, W]``, float RGB in [0, 1]; never modified.
            y: labels ``[N]`` int64.
            target: targets ``[N]`` for a targeted attack; None draws ``(y + U{1..K-1}) mod K``.
                Ignored by an untargeted attack.
        Returns:
            ``x_adv`` shaped like ``x``, with ``|x_adv - x| <= eps`` and values in [0, 1]. The
            targets used are in :attr:`last_target` (None when untargeted).
        """
        self._check_inputs(x, y, target)
        y = y.to(device=x.device, dtype=torch.long)
        caller_contiguous = x.is_contiguous()
        x = x.detach()
        if x.dim() == 4 and self._use_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)  # a copy unless already NHWC
        with self._attack_mode(x):
            if self.targeted:
                if target is None:
                    target = draw_targets(y, self._num_classes(x), self._generator(x.device))
                target = target.to(device=x.device, dtype=torch.long)
                labels = target
            else:
                labels = y
            self.last_target = target if self.targeted else None
            lo, hi = self.threat.bounds(x)
            x_adv = self._perturb(x, labels, lo, hi).detach()
        return x_adv.contiguous() if caller_contiguous else x_adv

    __call__ = attack

    def manual_seed(self, seed: int) -> None:
        """Restart the attack's random stream from ``seed`` (as if freshly built with it)."""
        self.seed = seed
        self._generators.clear()

    # -------------------------------------------------------------------- for subclasses
    def _perturb(self, x: torch.Tensor, labels: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        """The update rule. ``labels`` are the targets (targeted) or true labels (untargeted);
        ``[lo, hi]`` is the feasible set. Return a new tensor; never write into ``x``."""
        raise NotImplementedError

    def _objective_grad(self, x_adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the input of the objective the attack ASCENDS, ``[N, C, H, W]``.

        Objective: ``sum_i CE(f(x_i), y_i)`` untargeted; ``-sum_i CE(f(x_i), t_i)`` targeted (the
        official descent on the target cross-entropy). Summed, not averaged, so an image's
        gradient does not depend on the batch size.
        """
        x_adv = x_adv.detach().requires_grad_(True)
        with self._autocast(x_adv):
            logits = self.model(x_adv)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        if self.targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad

    @torch.no_grad()
    def _score(self, x_adv: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(success [N] bool, objective [N] float)`` for choosing among restarts.

        Success: misclassified (untargeted) or argmax == target (targeted). Objective: the value
        the attack ascends (CE to the label, or minus CE to the target).
        """
        with self._autocast(x_adv):
            logits = self.model(x_adv)
        logits = logits.float()
        objective = F.cross_entropy(logits, labels, reduction="none")
        pred = logits.argmax(1)
        if self.targeted:
            return pred == labels, -objective
        return pred != labels, objective

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's generator on ``device`` (seeded once), or None (global RNG) without seed."""
        if self.seed is None:
            return None
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(self.seed))
            self._generators[device] = gen
        return gen

    # -------------------------------------------------------------------------- internals
    def _autocast(self, x: torch.Tensor):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def _attack_mode(self, x: torch.Tensor) -> Iterator[None]:
        """Eval mode + frozen parameters + grad enabled (+ BN folded, + packed convs); restores
        everything."""
        modes = [(m, m.training) for m in self.model.modules()]
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            self.model.eval()
            for p in params:
                p.requires_grad_(False)
            with contextlib.ExitStack() as stack:
                caches = speed_caches(self.model)
                if self.fold_bn and self._fold_is_exact(x):
                    stack.enter_context(folded_batchnorm(self.model, caches.folded))
                # A compiled model would trace (and recompile) through the packed path.
                if (self.prepack and not self.bf16 and x.device.type == "cpu"
                        and not hasattr(self.model, "_orig_mod")):
                    stack.enter_context(prepacked_convolutions(self.model, caches.packer))
                stack.enter_context(torch.enable_grad())
                yield
        finally:
            for p in params:
                p.requires_grad_(True)
            for m, training in modes:
                m.training = training

    def _use_channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last)
        return x.device.type == "cpu" and torch.get_num_threads() == 1 and x.shape[0] < 16

    def _fold_is_exact(self, x: torch.Tensor) -> bool:
        """Whether BN folding is valid for this model (:func:`~featdenoise.attacks.fold.
        fold_is_exact`: structure and logits), checked once per model; else it runs unfolded."""
        caches = speed_caches(self.model)
        if caches.fold_exact is None:
            caches.fold_exact = fold_is_exact(self.model, x)
        return caches.fold_exact

    def _num_classes(self, x: torch.Tensor) -> int:
        if self.num_classes is None:
            with torch.no_grad(), self._autocast(x):
                self.num_classes = int(self.model(x[:1]).shape[-1])
        return int(self.num_classes)

    @staticmethod
    def _check_inputs(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"images have dtype {x.dtype}; pass float RGB in [0, 1] (x / 255)")
        if x.dim() < 2 or y.shape != x.shape[:1]:
            raise ValueError(
                f"images {tuple(x.shape)} and labels {tuple(y.shape)} disagree; expected x "
                "[N, C, H, W] and y [N]")
        if target is not None and target.shape != y.shape:
            raise ValueError(f"target {tuple(target.shape)} must have the labels' shape "
                             f"{tuple(y.shape)}")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"images range [{float(x.min()):.3g}, {float(x.max()):.3g}] is outside [0, 1]; "
                "attacks take RGB in [0, 1] (normalisation is a layer of the model)")
