"""Bookkeeping shared by every attack: model mode, parameter gradients, targets, randomness.

A subclass writes only its update rule (:meth:`Attack._perturb`); this base class

- runs the model in eval mode during the attack (BatchNorm with running statistics, as the
  official ``adv_model.py`` does with ``argscope(BatchNorm, training=False)``) and restores every
  module's own ``training`` flag afterwards, so a model in a mixed mode comes back exactly as given;
- computes gradients with respect to the input only (:func:`torch.autograd.grad`), with the
  parameters' ``requires_grad`` switched off for the duration of the attack, so backward computes no
  weight gradient at all and no ``.grad`` is ever touched (flags are restored afterwards);
- runs those passes inside :func:`featdenoise.accel.inference_grad` (BatchNorm folded, packed
  convolutions; verified, the same function up to float rounding) unless ``exact=True``;
- refuses images, labels, targets and model outputs that cannot be right, with one clear line;
- watches every logits batch and input gradient the attack computes for NaN / inf on the device
  (no host sync per pass) and checks once, at the end of the call, that they and the returned
  images were finite (``sign(NaN) = 0``: a NaN gradient would silently stall the attack):
  otherwise :class:`~featdenoise.runtime.finite.NonFiniteError` names the model and the images,
  never an adversarial image of NaN or a number computed from one;
- never modifies the caller's input in place; each step works on a detached, attack-owned tensor;
- draws targets ``(y + U{1..K-1}) mod K`` (paper Sec. 6: "the targeted class is selected uniformly
  at random" among the wrong classes) from its own seeded generator and keeps them in
  :attr:`Attack.last_target`.

Pass the bare module to an attack, not a ``DistributedDataParallel`` wrapper (``ddp.module``):
the attack's forward passes must not take part in gradient synchronisation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise import accel
from featdenoise.attacks.threat import LinfBall
from featdenoise.models.registry import model_label
from featdenoise.runtime.finite import (
    NonFiniteError,
    all_finite,
    bad_rows,
    check_finite_logits,
    list_some,
)
from featdenoise.runtime.modes import bf16_autocast, eval_mode, frozen

_RANGE_TOLERANCE = 1e-6  # images may exceed [0, 1] by this much (float rounding of x / 255)


def count_arg(name: str, value, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int, or one line naming ``name`` if it is not a whole number >=
    ``minimum`` (steps, restarts, queries, targets...); ``hint`` ends the message."""
    need = "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"
    try:
        whole = int(value) == value and value >= minimum
    except (TypeError, ValueError):  # None, "many", ...
        whole = False
    if not whole:
        raise ValueError(f"{name}={value!r} must be {need}{hint}")
    return int(value)


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
            Under autocast the accelerator steps aside (PyTorch's normal path).
        channels_last: run the attack on a channels-last (NHWC) copy of 4-D images (same
            values; the result is returned in the caller's layout). None (default) decides per
            call: NHWC on a CPU running one thread with batches < 16, where PyTorch computes 1x1
            convolutions as GEMMs that are faster on NHWC data; elsewhere the images stay as
            given. With ``exact=True`` None means never (NHWC kernels sum in another order).
            Measurements: docs/benchmarks.md.
        exact: False (default): the attack's forward and input-gradient passes run inside
            :func:`featdenoise.accel.inference_grad` (BatchNorm folded into the convolutions,
            CPU convolutions on packed weights; each verified once per model and input kind,
            the normal path elsewhere). The same function up to float rounding, which can flip
            the sign of near-zero input gradients (the pixel agreement with the authors'
            attacker either way: docs/results.md).
            True: PyTorch's normal path only, bit for bit the attack of earlier releases
            (which had these speed-ups off by default).

    Inputs are checked before anything runs (one ValueError line saying what is expected): ``x``
    a 4-D float tensor ``[N, C, H, W]`` of finite values in [0, 1] (1e-6 tolerance) with the
    dtype of the model's parameters (no silent conversion: pass ``x.float()`` for a float32
    model; ``bf16=True`` is the way to compute in bfloat16); ``y`` integer labels ``[N]`` in
    ``[0, K)``; ``target`` likewise, never equal to the label; the model must return one logits
    tensor ``[N, K]`` (not a tuple or dict). Float options are refused when they are not finite
    numbers (:func:`~featdenoise.runtime.finite.finite_float`).

    Every forward pass goes through :meth:`_forward` and every input gradient through
    :meth:`_input_grad`, which note on the device whether they are finite; after the update rule
    one host sync checks those notes and the returned images, and a NaN or inf is a
    :class:`~featdenoise.runtime.finite.NonFiniteError` naming the model and the images (the clean
    logits' rows, or the images whose attack went non-finite).
    Set ``check_finite = False`` on an attack whose caller has its own guard for non-finite
    numbers (adversarial training: its guard stops every process at the same step).

    Call ``attack(x, y, target=None)`` (or the object itself) to get ``x_adv``.

    A subclass lists only its own parameters and forwards the options after ``eps`` here as
    keywords (``**options: Unpack[AttackOptions]``, :mod:`featdenoise.attacks.options`).
    """

    name = "attack"
    check_finite = True

    def __init__(self, model: nn.Module, eps: float = 16 / 255, targeted: bool = True,
                 seed: int | None = None, num_classes: int | None = None, bf16: bool = False,
                 channels_last: bool | None = None, exact: bool = False):
        self.model = model
        self.threat = LinfBall(eps)
        self.targeted = bool(targeted)
        self.seed = seed
        self.num_classes = num_classes if num_classes is not None else getattr(
            model, "num_classes", None)
        self.bf16 = bool(bf16)
        self.channels_last = channels_last
        self.exact = bool(exact)
        self.last_target: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._finite: torch.Tensor | None = None  # 0-d bool on the device: all logits finite
        self._finite_grad: torch.Tensor | None = None  # ... and all input gradients

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
        self._finite = self._finite_grad = None
        y = y.to(device=x.device, dtype=torch.long)
        if target is not None:
            target = target.to(device=x.device, dtype=torch.long)
        caller_contiguous = x.is_contiguous()
        x = x.detach()
        if x.dim() == 4 and self._use_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)  # a copy unless already NHWC
        # Eval mode and frozen parameters (restored on exit, also on an error), input gradients on.
        with (eval_mode(self.model), frozen(self.model), torch.enable_grad(),
              contextlib.ExitStack() as stack):
            self._check_classes(x, y, target)
            # Entered after the checks: their forward of one image is not worth packing for.
            stack.enter_context(accel.inference_grad(self.model, enabled=not self.exact))
            if self.targeted:
                if target is None:
                    target = draw_targets(y, self._num_classes(x), self._generator(x.device))
                labels = target
            else:
                labels = y
            self.last_target = target if self.targeted else None
            lo, hi = self.threat.bounds(x)
            x_adv = self._perturb(x, labels, lo, hi).detach()
            self._check_finite_run(x, x_adv)
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
        logits = self._logits(x_adv)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        if self.targeted:
            loss = -loss
        return self._input_grad(loss, x_adv)

    @torch.no_grad()
    def _score(self, x_adv: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(success [N] bool, objective [N] float)`` for choosing among restarts.

        Success: misclassified (untargeted) or argmax == target (targeted). Objective: the value
        the attack ascends (CE to the label, or minus CE to the target).
        """
        logits = self._logits(x_adv).float()
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

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` (under the bf16 autocast if asked), checked to be logits ``[N, K]``."""
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The one way an attack runs the model: ``model(x)`` under the bf16 autocast if asked,
        checked to be logits ``[N, K]``, their finiteness noted on the device (no host sync;
        read once by :meth:`_check_finite_run`). Gradients flow as usual."""
        with self._autocast(x):
            logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != len(x):
            got = (f"a {type(logits).__name__}" if not isinstance(logits, torch.Tensor)
                   else f"a tensor {tuple(logits.shape)}")
            raise ValueError(
                f"{type(self.model).__name__} returned {got} for images {tuple(x.shape)}; "
                "attacks need one logits tensor [N, K] (wrap the model to return the logits)")
        if self.check_finite and logits.numel():
            finite = all_finite(logits)
            self._finite = finite if self._finite is None else self._finite & finite
        return logits

    def _input_grad(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``d loss / d x`` (:func:`torch.autograd.grad`, the parameters untouched), its
        finiteness noted on the device like the logits' (:meth:`_forward`)."""
        (grad,) = torch.autograd.grad(loss, x)
        if self.check_finite and grad.numel():
            finite = all_finite(grad)
            self._finite_grad = finite if self._finite_grad is None else self._finite_grad & finite
        return grad

    def _check_finite_run(self, x: torch.Tensor, x_adv: torch.Tensor) -> None:
        """One host sync: every logits batch of this call and ``x_adv`` were finite; otherwise
        a :class:`NonFiniteError` naming the model and the images (row indices of the batch)."""
        if not self.check_finite or not x_adv.numel():
            return
        ok = all_finite(x_adv)
        for note in (self._finite, self._finite_grad):
            if note is not None:
                ok = ok & note
        if bool(ok):
            return
        who = f"{type(self).__name__}: {model_label(self.model)}"
        with torch.no_grad(), self._autocast(x):
            check_finite_logits(self.model(x), who)  # the clean images' logits already
        rows = bad_rows(x_adv)
        if rows:
            where = f"images {list_some(rows)} of {len(x)} became NaN or inf"
        elif self._finite_grad is not None and not bool(self._finite_grad):
            where = "the input gradient of the attack loss was NaN or inf"
        else:
            where = f"the logits of a perturbed point of these {len(x)} images were NaN or inf"
        raise NonFiniteError(
            f"{who}: the clean logits are finite but during the attack {where}: the model's "
            "logits or input gradients overflow or are undefined there (reduced precision? a "
            "non-differentiable operation such as sqrt at 0?); no attack result can be computed")

    # -------------------------------------------------------------------------- internals
    def _autocast(self, x: torch.Tensor):
        return bf16_autocast(self.bf16, x.device)

    def _use_channels_last(self, x: torch.Tensor) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last)
        if self.exact:  # PyTorch's normal path: the caller's layout, the caller's arithmetic
            return False
        return x.device.type == "cpu" and torch.get_num_threads() == 1 and x.shape[0] < 16

    def _num_classes(self, x: torch.Tensor) -> int:
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(self._logits(x[:1]).shape[-1])
        return int(self.num_classes)

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor,
                      target: torch.Tensor | None) -> None:
        """Refuse images and labels that cannot be right, before any model call."""
        if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() != 4:
            what = (f"a {type(x).__name__}" if not isinstance(x, torch.Tensor)
                    else f"{x.dtype} {tuple(x.shape)}")
            raise ValueError(f"images are {what}; attacks take a float tensor [N, C, H, W] of "
                             "RGB in [0, 1] (uint8 images: x.float() / 255)")
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.dtype != dtype:
            raise ValueError(f"images are {x.dtype} but the model's parameters are {dtype}; "
                             f"pass x.to({dtype}) (bf16=True computes in bfloat16)")
        for name, labels in (("labels", y), ("target", target)):
            if labels is None:
                continue
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or \
                    labels.is_complex() or labels.dtype == torch.bool:
                what = (str(labels.dtype) if isinstance(labels, torch.Tensor)
                        else type(labels).__name__)
                raise ValueError(f"{name} are {what}; pass integer class indices [N] (int64)")
            if labels.shape != x.shape[:1]:
                raise ValueError(
                    f"images {tuple(x.shape)} and {name} {tuple(labels.shape)} disagree; "
                    f"expected x [N, C, H, W] and {name} [N]")
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf; attacks take finite RGB in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"images range [{lo:.3g}, {hi:.3g}] is outside [0, 1]; attacks take RGB in "
                "[0, 1] (normalisation is a layer of the model)")

    def _check_classes(self, x: torch.Tensor, y: torch.Tensor,
                       target: torch.Tensor | None) -> None:
        """Labels and targets in ``[0, K)``; a target never equal to its label."""
        if not len(y):
            return
        k = self._num_classes(x)
        for name, labels in (("labels", y), ("target", target if self.targeted else None)):
            if labels is not None and (labels.min() < 0 or labels.max() >= k):
                raise ValueError(f"{name} span [{int(labels.min())}, {int(labels.max())}] but "
                                 f"the model has K={k} classes; pass class indices in [0, {k})")
        if self.targeted and target is not None and (target == y).any():
            i = int((target == y).nonzero()[0, 0])
            raise ValueError(f"target[{i}] = labels[{i}] = {int(y[i])}: a targeted attack needs "
                             "a wrong class (target=None draws (y + U{1..K-1}) mod K)")
