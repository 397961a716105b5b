"""Outcomes of an attack and the two rates the paper reports (Sec. 6).

- accuracy: fraction of adversarial images still classified as their label (the defender's
  number, "top-1 classification accuracy ... regardless of its targets", Sec. 6);
- targeted attack success rate: fraction whose prediction is the attack's target (the attacker's
  number, official ``compute_attack_success``).

Rates carry their denominator: ``str(accuracy(correct))`` reads ``"41.2% (412/1000)"``, and rates
of several batches add up (``sum(rates)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def outcomes(logits: torch.Tensor, y: torch.Tensor,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image outcomes from logits.

    Args:
        logits: ``[N, K]``.
        y: labels ``[N]``.
        target: the attack's targets ``[N]``, or None (untargeted: ``target_hit`` all False).
    Returns:
        ``{"correct": argmax == y, "target_hit": argmax == target}``, bool tensors ``[N]``.
    """
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(y.shape)} disagree; "
                         "expected [N, K] and [N]")
    pred = logits.argmax(dim=1)
    correct = pred == y.to(pred.device)
    if target is None:
        target_hit = torch.zeros_like(correct)
    else:
        target_hit = pred == target.to(pred.device)
    return {"correct": correct, "target_hit": target_hit}


@dataclass(frozen=True)
class Rate:
    """``count`` of ``total`` images; ``value`` in [0, 1] (nan for 0 images); ``percent``."""

    count: int
    total: int

    @property
    def value(self) -> float:
        return self.count / self.total if self.total else float("nan")

    @property
    def percent(self) -> float:
        return 100.0 * self.value

    def __float__(self) -> float:
        return self.value

    def __add__(self, other: Rate) -> Rate:
        if not isinstance(other, Rate):
            return NotImplemented
        return Rate(self.count + other.count, self.total + other.total)

    def __radd__(self, other) -> Rate:
        if isinstance(other, int) and other == 0:  # lets sum(rates) start from 0
            return self
        return self.__add__(other)

    def __str__(self) -> str:
        return f"{self.percent:.1f}% ({self.count}/{self.total})"


def _rate(flags: torch.Tensor) -> Rate:
    flags = torch.as_tensor(flags)
    if flags.dtype != torch.bool:
        raise ValueError(f"expected a bool tensor of per-image outcomes, got {flags.dtype}")
    return Rate(int(flags.sum()), int(flags.numel()))


def accuracy(correct: torch.Tensor) -> Rate:
    """Top-1 accuracy: images still classified correctly / all attacked images (Sec. 6)."""
    return _rate(correct)


def success_rate(target_hit: torch.Tensor) -> Rate:
    """Targeted attack success rate: images predicted as their target / all attacked images."""
    return _rate(target_hit)
