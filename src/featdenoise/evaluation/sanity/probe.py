"""The measurements the sanity checks are made of: :class:`Probe` runs PGD at a setting, random
noise of a size, or the input gradient over a fixed set of images with fixed targets, and scores
the model on the result; :func:`collect` takes those images from a loader.

Pixels are float RGB in [0, 1], NCHW; ``eps`` and step sizes are on that scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks import PGD
from featdenoise.evaluation import metrics
from featdenoise.models.registry import model_label
from featdenoise.runtime.finite import check_finite_logits
from featdenoise.runtime.seeds import generator

Score = tuple[float, float, float]
"""``(accuracy, targeted success, mean attack loss)`` of the model on a set of images."""


def collect(loader: Iterable, max_images: int | None,
            device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Take up to ``max_images`` (x [N,C,H,W] in [0,1], y [N]) from the loader, in loader order."""
    batches, n = [], 0
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        keep = y >= 0  # label -1 marks an unreadable file the dataset skipped
        x, y = x[keep], y[keep]
        if max_images is not None:
            x, y = x[: max_images - n], y[: max_images - n]
        if len(x) == 0:
            continue
        if not torch.is_floating_point(x) or x.dim() != 4:
            raise ValueError(
                f"sanity: expected float image batches [N, C, H, W] in [0, 1], got "
                f"{tuple(x.shape)} of {x.dtype}"
            )
        batches.append((x.to(device), y.long().to(device)))
        n += len(x)
        if max_images is not None and n >= max_images:
            break
    if n == 0:
        raise ValueError("sanity: the data loader yielded no images; check the --data folder")
    return batches


class Probe:
    """Runs one attack setting or noise over all collected batches with fixed targets.

    ``batches``: ``[(x [N, C, H, W], y [N])]``; ``targets``: one LongTensor ``[N]`` per batch, the
    wrong class to aim at. :meth:`clean` and :meth:`pgd` scores are computed once per setting
    (several checks read the evaluation's own PGD run).
    """

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 targets: list[torch.Tensor], targeted: bool, seed: int, exact: bool = False):
        self.model = model
        self.exact = exact
        self.batches = batches
        self.targets = targets
        self.targeted = targeted
        self.seed = seed
        self.n = sum(len(x) for x, _ in batches)
        self._scores: dict[tuple, Score] = {}

    @torch.no_grad()
    def _score(self, per_batch_x: list[torch.Tensor]) -> Score:
        """(accuracy, targeted success, mean attack loss) of the model on the given images.

        The attack loss is the cross-entropy to the target when targeted, minus the
        cross-entropy to the label otherwise: lower is better for the attacker."""
        correct, hit, loss = [], [], 0.0
        for (_, y), t, xa in zip(self.batches, self.targets, per_batch_x, strict=True):
            logits = self.model(xa)
            check_finite_logits(logits, model_label(self.model))  # no accuracy made of NaN
            out = metrics.outcomes(logits, y, t)
            correct.append(out["correct"].cpu())
            hit.append(out["target_hit"].cpu())
            if self.targeted:
                loss += float(F.cross_entropy(logits.float(), t, reduction="sum"))
            else:
                loss -= float(F.cross_entropy(logits.float(), y, reduction="sum"))
        return (
            float(metrics.accuracy(torch.cat(correct))),
            float(metrics.success_rate(torch.cat(hit))),
            loss / self.n,
        )

    def clean(self) -> Score:
        """The score on the clean images."""
        key = ("clean",)
        if key not in self._scores:
            self._scores[key] = self._score([x for x, _ in self.batches])
        return self._scores[key]

    def pgd(self, eps: float, steps: int, step_size: float) -> Score:
        """The score under PGD (one random start, seeded by the probe's seed) with a fixed step
        size."""
        key = ("pgd", float(eps), int(steps), float(step_size))
        if key not in self._scores:
            self._scores[key] = self._score(self.adversarial(eps, steps, step_size))
        return self._scores[key]

    def pgd_correct(self, eps: float, steps: int, step_size: float, seed: int) -> list[bool]:
        """Per-image correctness under PGD with a fixed step size and its own random start."""
        advs = self.adversarial(eps, steps, step_size, seed)
        with torch.no_grad():
            return [bool(c) for (_, y), xa in zip(self.batches, advs, strict=True)
                    for c in (self.model(xa).argmax(1) == y).tolist()]

    def adversarial(self, eps: float, steps: int, step_size: float,
                    seed: int | None = None) -> list[torch.Tensor]:
        """PGD's images per batch (``seed`` None: the probe's); refused if they leave the box."""
        eps = min(float(eps), 1.0)
        attack = PGD(self.model, eps=eps, step_size=step_size, steps=steps,
                     targeted=self.targeted, random_start=True, restarts=1, step_rule="fixed",
                     seed=self.seed if seed is None else seed, exact=self.exact)
        advs = []
        for (x, y), t in zip(self.batches, self.targets, strict=True):
            x_adv = attack.attack(x, y, target=t if self.targeted else None).detach()
            # A broken attack must not pass the checks by leaving the threat model.
            if (x_adv - x).abs().max().item() > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
                raise RuntimeError(
                    f"sanity: the attack left the eps={eps:.4g} box or [0, 1]; fix the attack first"
                )
            advs.append(x_adv)
        return advs

    def noise(self, eps: float, kind: str) -> Score:
        """The score under ``uniform`` or ``sign`` noise of size eps."""
        gen = generator(self.seed, "noise", kind)
        noisy = []
        for x, _ in self.batches:
            if kind == "uniform":
                delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
            else:
                delta = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1) * eps
            noisy.append((x + delta.to(x.device, x.dtype)).clamp(0, 1))
        return self._score(noisy)

    def gradients(self) -> tuple[int, int, int]:
        """Counts of images whose input gradient is (usable, zero, non-finite)."""
        usable = zero = nonfinite = 0
        for (x, y), t in zip(self.batches, self.targets, strict=True):
            x = x.clone().requires_grad_(True)
            logits = self.model(x)
            goal = t if self.targeted else y
            loss = F.cross_entropy(logits.float(), goal, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            flat = grad.detach().flatten(1)  # [N, C*H*W]
            finite = torch.isfinite(flat).all(dim=1) & torch.isfinite(logits.detach()).all(dim=1)
            nonzero = flat.abs().amax(dim=1) > 0
            usable += int((finite & nonzero).sum())
            zero += int((finite & ~nonzero).sum())
            nonfinite += int((~finite).sum())
        return usable, zero, nonfinite
