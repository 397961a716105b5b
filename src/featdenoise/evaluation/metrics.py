"""Every rate an evaluation reports, each with its denominator (paper Sec. 6, 6.2).

- accuracy: fraction of (adversarial) images still classified as their label (the defender's
  number, "top-1 classification accuracy ... regardless of its targets", Sec. 6); top-5 likewise;
- targeted attack success rate: fraction whose prediction is the attack's target (the attacker's
  number, official ``compute_attack_success``); for an untargeted attack, the misclassification
  rate;
- all-or-nothing accuracy (Sec. 6.2, CAAD 2018): an image counts only if it is classified
  correctly under every attacker; AutoAttack's robust accuracy is the same rule over its chain.

Two levels: tensors of one batch (:func:`outcomes`, :func:`accuracy`, :func:`success_rate`,
:func:`topk_correct`), and per-image *records* of a whole evaluation (:func:`summarize`,
:func:`all_or_nothing`), which is what every summary of :mod:`featdenoise.evaluation` and
training's periodic evaluation is computed from. Rates carry their denominator:
``str(accuracy(correct))`` reads ``"41.2% (412/1000)"``, and rates of several batches add up
(``sum(rates)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Whether the label is among the ``k`` largest logits: ``[N, K], [N] -> [N]`` bool."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y.to(logits.device)[:, None]).any(dim=1)


# --------------------------------------------------------------------------- per-image records
def kept(records: Sequence[dict]) -> tuple[list[dict], int]:
    """``(records that count, number skipped)``: unreadable files (``skipped``) count nowhere."""
    good = [r for r in records if not r.get("skipped")]
    if not good:
        raise ValueError("no per-image records to summarize (all skipped, or none given)")
    return good, len(records) - len(good)


def _fraction(flags) -> float:
    flags = list(flags)
    return sum(1 for f in flags if f) / len(flags)


def column_rates(records: Sequence[dict], name: str, targeted: bool) -> dict:
    """Accuracy, success rate (and top-5 when recorded) of column ``pred_<name>`` (fractions).

    Success is ``pred == target`` for a targeted column, ``pred != label`` otherwise.
    """
    key = f"pred_{name}"
    out = {"name": name, "n": len(records),
           "accuracy": _fraction(r[key] == r["label"] for r in records)}
    if targeted:
        out["success_rate"] = _fraction(r[key] == r["target"] for r in records)
    else:
        out["success_rate"] = _fraction(r[key] != r["label"] for r in records)
    if f"top5_{name}" in records[0]:
        out["top5"] = _fraction(bool(r[f"top5_{name}"]) for r in records)
    return out


def summarize(records: Sequence[dict], names: Sequence[str], targeted: bool = True) -> dict:
    """Clean top-1/top-5 and, per attack column, accuracy / success / top-5, from records (pure).

    Records hold ``label``, ``target`` (-1 when untargeted), ``pred_clean``, ``top5_clean`` and
    ``pred_<name>`` (+ ``top5_<name>``) per column. Returns ``{"num_images", "skipped_images",
    "clean": {"top1", "top5", "n"}, "attacks": [column_rates, ...]}`` (rates in [0, 1]).
    """
    records, skipped = kept(records)
    n = len(records)
    return {
        "num_images": n,
        "skipped_images": skipped,
        "clean": {"top1": _fraction(r["pred_clean"] == r["label"] for r in records),
                  "top5": _fraction(bool(r.get("top5_clean", True)) for r in records), "n": n},
        "attacks": [column_rates(records, name, targeted) for name in names],
    }


def all_or_nothing(correct: Mapping[str, Sequence[bool]]) -> dict:
    """Accuracy per attacker and the all-or-nothing accuracy (paper Sec. 6.2, CAAD 2018 criterion).

    Args:
        correct: ``{attacker: per-image correctness}``, every sequence over the same images in the
            same order (bools or 0/1).
    Returns:
        ``{"per_attacker": {attacker: fraction correct}, "all_or_nothing": fraction of images
        correct under every attacker, "n": number of images}``. With no attacker the
        all-or-nothing accuracy is undefined and raises ValueError.
    """
    if not correct:
        raise ValueError("all-or-nothing needs at least one attacker")
    lengths = {name: len(v) for name, v in correct.items()}
    n = next(iter(lengths.values()))
    if any(m != n for m in lengths.values()):
        raise ValueError(f"attackers cover different numbers of images: {lengths}")
    if n == 0:
        raise ValueError("all-or-nothing needs at least one image")
    per = {name: sum(1 for c in v if c) / n for name, v in correct.items()}
    every = sum(1 for flags in zip(*correct.values(), strict=True) if all(flags)) / n
    return {"per_attacker": per, "all_or_nothing": every, "n": n}


def robust_after_each(records: Sequence[dict], names: Sequence[str]) -> list[float]:
    """Fraction of images correct clean and under every column up to each one of ``names``.

    The robust accuracy after each attack of a chain (AutoAttack's report): the k-th entry is
    the all-or-nothing accuracy over ``pred_clean`` and the first k + 1 columns.
    """
    records, _ = kept(records)
    alive = [r["pred_clean"] == r["label"] for r in records]
    out = []
    for name in names:
        alive = [a and r[f"pred_{name}"] == r["label"] for a, r in zip(alive, records, strict=True)]
        out.append(sum(alive) / len(records))
    return out
