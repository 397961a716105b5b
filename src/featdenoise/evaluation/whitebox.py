"""White-box robustness evaluation (paper Sec. 6.1, Fig. 6; official INSTRUCTIONS.md).

For each image: the clean prediction (top-1 and whether the label is in the top 5), then, for every
attack strength (e.g. PGD with 10, 100 and 1000 iterations), the prediction on the adversarial
image (top-1 and top-5). The summary reports, per attack, the *accuracy* (the defender's number),
the adversarial top-5 and the *targeted attack success rate* (prediction == target; the attacker's
number), as the official model zoo does, with the number of images.

Threat model (paper Sec. 6, official ``PGDAttacker``): targeted PGD under L-inf with eps = 16 on the
0..255 scale (16/255 here, pixels are [0, 1]), step size 1 (``max(step, eps / steps)`` for the
"paper" step rule, so 1.6 for 10 iterations), a random start, and one target per image drawn
uniformly from the wrong classes. Images, targets, random starts, sharding and resumption are the
engine's (:mod:`featdenoise.evaluation.engine`): an evaluation split over ranks or interrupted and
resumed gives exactly the same numbers. A sweep is a job (:func:`whitebox_job`) run by the one
entry, :func:`featdenoise.evaluation.evaluate.evaluate`.

Files written to ``out_dir``: ``settings.json`` (everything that determines the numbers, model
weights included; checked on resume), ``parts/outcomes-rank<R>.jsonl`` (records appended after
every attack of every batch), ``outcomes.jsonl`` (all records, in order, once every image is done),
``summary.json``, ``table.md`` and ``accuracy_vs_iterations.png`` (see :mod:`.report`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from featdenoise.attacks import Attack, build_attack
from featdenoise.attacks.registry import ATTACKS as _SWEEPS
from featdenoise.evaluation import engine, metrics, report
from featdenoise.evaluation.autoattack import autoattack_columns, summarize_autoattack
from featdenoise.evaluation.evaluate import Job, evaluate
from featdenoise.evaluation.options import RunOptions, split_settings

ATTACKS = tuple(_SWEEPS)  # the sweep attacks of the registry
STEP_DEFAULTS = {"step_size": 1 / 255, "steps": 10, "restarts": 1, "step_rule": "paper"}
"""The iterative attacks' settings :func:`make_attack` fills in when not given."""


def attack_names(attack: str, steps: Sequence[int]) -> list[str]:
    """Record keys of the attacks of a sweep: ``("pgd", [10, 100]) -> ["pgd10", "pgd100"]``."""
    return [f"{attack}{int(s)}" for s in steps]


def make_attack(name: str, model: nn.Module, *, eps: float, targeted: bool = True,
                seed: int | None = None, exact: bool = False, **settings) -> Attack:
    """Build an attack of :mod:`featdenoise.attacks` by name with the evaluation's settings.

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale. ``settings``: ``step_size`` (1/255),
    ``steps`` (10), ``restarts`` (1), ``step_rule`` ("paper"), and any other keyword of the
    attack class (``num_classes``, ``bf16``...). One-step attacks (fgsm) ignore ``steps``,
    ``step_size``, ``restarts`` and ``step_rule``. ``exact`` turns the speed layer off.
    """
    chosen = {**STEP_DEFAULTS, **settings}
    step = {k: chosen.pop(k) for k in STEP_DEFAULTS}
    kw: dict[str, Any] = dict(eps=eps, targeted=targeted, seed=seed, exact=exact, **chosen)
    if name != "fgsm":
        kw.update(step_size=step["step_size"], steps=int(step["steps"]))
    if name == "pgd":
        kw.update(restarts=int(step["restarts"]), step_rule=step["step_rule"], random_start=True)
    return build_attack(name, model, **kw)


def attack_column(name: str, attack: str, *, source: nn.Module | None = None,
                  seed_tag: str = "start", **attack_kwargs) -> engine.Column:
    """A column that attacks each batch with ``attack`` and records the model's predictions.

    ``source``: craft the images on this model instead (a transfer attack, Sec. 6.2); the
    evaluated model then only classifies them. ``attack_kwargs`` go to :func:`make_attack`.
    """

    def run(model: nn.Module, batch: engine.Batch) -> dict:
        atk = make_attack(attack, source if source is not None else model, seed=batch.seed,
                          **attack_kwargs)
        target = batch.target if attack_kwargs.get("targeted", True) else None
        x_adv = atk.attack(batch.x, batch.y, target=target)
        return engine.predict_fields(model, name, x_adv, batch.y, batch.ids)

    return engine.Column(name, run, seed_tag=seed_tag)


@dataclass(frozen=True)
class WhiteboxSettings:
    """The attack settings of a white-box evaluation (paper Sec. 6.1); see
    :func:`evaluate_whitebox` for each field."""

    steps: Sequence[int] = (10, 100, 1000)
    attack: str | None = "pgd"
    eps: float = 16 / 255
    step_size: float = 1 / 255
    restarts: int = 1
    targeted: bool = True
    step_rule: str = "paper"
    autoattack: dict | None = None


def evaluate_whitebox(model: nn.Module, dataset: Dataset, out_dir: str, *,
                      options: RunOptions | None = None, **settings) -> dict | None:
    """Evaluate ``model`` on ``dataset`` clean and under an attack at several iteration counts.

    Paper Sec. 6.1 / Fig. 6. Resumable: records already in ``out_dir`` are kept and only what is
    missing runs; a folder holding another evaluation (other settings, images or weights) is
    refused. Distributed: under torchrun each rank takes every ``world_size``-th batch and rank 0
    merges; in one process, ``rank``/``world_size`` may be given to run one shard by hand.

    Args:
        model: classifier taking ``[N, C, H, W]`` pixels in [0, 1], returning logits ``[N, K]``;
            needs ``model.num_classes``. Run in eval mode (BatchNorm in inference mode).
        dataset: yields ``(image [C, H, W] in [0, 1], label int)``.
        out_dir: output folder (created; reused to resume).
        options: how to run (:class:`~featdenoise.evaluation.options.RunOptions`: ``batch_size``
            (32), ``limit``, ``seed`` (0), ``ids``, ``name``, ``device``, ``rank``,
            ``world_size``, ``max_batches``, ``num_workers``, ``progress``, ``exact``,
            ``restart``, ``extra``); each field may also be given as a keyword, which wins.
        **settings: the fields of :class:`WhiteboxSettings` and of ``RunOptions``; any other
            keyword is a ``TypeError``. The attack settings:

            - ``steps``: attack iteration counts, default ``(10, 100, 1000)``; one record column
              each (sorted, duplicates dropped; ``fgsm`` has exactly one step).
            - ``attack``: ``pgd`` (the paper's, default), ``fgsm``, ``ifgsm`` or ``mifgsm``;
              None: no sweep (only ``autoattack``).
            - ``eps``, ``step_size``: L-inf radius and step on the [0, 1] scale (paper and
              defaults: 16/255 and 1/255).
            - ``restarts``: random restarts per attack (PGD; default 1).
            - ``targeted``: the paper's targeted attacks with a random wrong target per image
              (default) or untargeted attacks (success = misclassification).
            - ``step_rule``: "paper" (default) uses ``max(step_size, eps / steps)`` (Sec. 6.1) as
              the official code; "fixed" uses ``step_size``.
            - ``autoattack``: also run AutoAttack on the same images after the sweep (or alone
              when ``attack`` is None): ``{"version": "standard"|"rand", "attacks": [...] or
              None, "steps", "n_target_classes", "n_queries"}`` (any subset; see
              :mod:`featdenoise.evaluation.autoattack`). L-inf at the same ``eps``; untargeted
              and targeted stages as in the original, whatever ``targeted`` says.

    Returns:
        The summary dict (also written to ``summary.json``) when every image is done and this
        process merged the results; None otherwise (other ranks, or stopped by ``max_batches``).
    """
    attack, run = split_settings("evaluate_whitebox", settings, WhiteboxSettings, options)
    return evaluate(model, dataset, out_dir, whitebox_job(model, attack, run.exact), run)


def _checked_steps(s: WhiteboxSettings) -> list[int]:
    """Refuse impossible settings (before anything is written); the sweep's iteration counts."""
    if s.attack is None and not s.autoattack:
        raise ValueError("give an attack to run (a PGD-style sweep, AutoAttack, or both)")
    if s.attack is not None and s.attack not in ATTACKS:
        raise ValueError(f"unknown attack {s.attack!r}; choose one of {', '.join(ATTACKS)}")
    steps = ([] if s.attack is None else [1] if s.attack == "fgsm"
             else sorted({int(k) for k in s.steps}))
    if s.attack is not None and (not steps or any(k < 1 for k in steps)):
        raise ValueError(f"--steps must be positive iteration counts, got {steps}")
    if not 0 < s.eps <= 1:
        raise ValueError(f"eps={s.eps:g} is outside (0, 1] (the [0, 1] pixel scale; 16/255 is "
                         "the paper's 16)")
    if int(s.restarts) != s.restarts or s.restarts < 1:
        raise ValueError(f"--restarts must be an integer >= 1, got {s.restarts}")
    return steps


def whitebox_job(model: nn.Module, s: WhiteboxSettings, exact: bool = False) -> Job:
    """The columns (one per iteration count, then AutoAttack's) and settings of a sweep."""
    steps = _checked_steps(s)
    names = attack_names(s.attack, steps) if s.attack else []
    kw: dict[str, Any] = dict(eps=s.eps, step_size=s.step_size, restarts=s.restarts,
                              targeted=s.targeted, step_rule=s.step_rule, exact=exact)
    columns = [attack_column(n, s.attack, steps=k, **kw)
               for n, k in zip(names, steps, strict=True) if s.attack]
    if s.attack is not None:  # a bad option (step_size=inf...) is refused now, not at batch 1
        make_attack(s.attack, model, steps=steps[0], **kw)
    settings: dict[str, Any] = {
        "attack": s.attack, "steps": steps, "step_size": float(s.step_size),
        "step_size_255": round(float(s.step_size) * 255, 6), "restarts": int(s.restarts),
        "targeted": bool(s.targeted), "step_rule": s.step_rule,
    }
    if s.autoattack:
        aa = {k: v for k, v in s.autoattack.items() if v is not None}
        columns += autoattack_columns(model, eps=s.eps, exact=exact, **aa)
        settings["autoattack"] = {**aa, "attacks": [c.name for c in columns[len(names):]]}
    return Job("whitebox", columns, s.eps, s.targeted, settings, finalize)


def summarize(records: Sequence[dict], settings: dict) -> dict:
    """The summary of a finished sweep: settings, :func:`metrics.summarize`, steps per attack."""
    names = attack_names(settings["attack"], settings["steps"]) if settings["attack"] else []
    summary = {**settings, **metrics.summarize(records, names, settings["targeted"])}
    for entry, n in zip(summary["attacks"], settings["steps"], strict=True):
        entry["steps"] = n
    if settings.get("autoattack"):
        summary["autoattack"] = {**settings["autoattack"], **summarize_autoattack(
            records, settings["autoattack"]["attacks"])}
    return summary


def finalize(out_dir: str, records: Sequence[dict], settings: dict) -> dict:
    """Write ``outcomes.jsonl``, ``summary.json``, ``table.md``, the Fig. 6 plot; return summary."""
    summary = summarize(records, settings)
    engine.write_outcomes(out_dir, records)
    engine.write_json(os.path.join(out_dir, engine.SUMMARY_FILE), summary)
    report.write_report([summary], out_dir)
    return summary
