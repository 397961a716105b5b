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
resumed gives exactly the same numbers.

Files written to ``out_dir``: ``settings.json`` (everything that determines the numbers, model
weights included; checked on resume), ``parts/outcomes-rank<R>.jsonl`` (records appended after
every attack of every batch), ``outcomes.jsonl`` (all records, in order, once every image is done),
``summary.json``, ``table.md`` and ``accuracy_vs_iterations.png`` (see :mod:`.report`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.evaluation import engine, metrics
from featdenoise.runtime import outdir

ATTACKS = ("pgd", "fgsm", "ifgsm", "mifgsm")


def attack_names(attack: str, steps: Sequence[int]) -> list[str]:
    """Record keys of the attacks of a sweep: ``("pgd", [10, 100]) -> ["pgd10", "pgd100"]``."""
    return [f"{attack}{int(s)}" for s in steps]


def make_attack(name: str, model: nn.Module, *, eps: float, step_size: float = 1 / 255,
                steps: int = 10, targeted: bool = True, restarts: int = 1,
                step_rule: str = "paper", seed: int | None = None, exact: bool = False,
                **kwargs):
    """Build an attack of :mod:`featdenoise.attacks` by name with the evaluation's settings.

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale. One-step attacks (fgsm) ignore
    ``steps``, ``restarts`` and ``step_rule``. ``exact`` turns the speed layer off.
    """
    from featdenoise.attacks import build_attack

    kw = dict(eps=eps, targeted=targeted, seed=seed, exact=exact, **kwargs)
    if name != "fgsm":
        kw.update(step_size=step_size, steps=int(steps))
    if name == "pgd":
        kw.update(restarts=int(restarts), step_rule=step_rule, random_start=True)
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


def evaluate_whitebox(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str,
    *,
    steps: Sequence[int] = (10, 100, 1000),
    attack: str = "pgd",
    eps: float = 16 / 255,
    step_size: float = 1 / 255,
    restarts: int = 1,
    targeted: bool = True,
    step_rule: str = "paper",
    seed: int = 0,
    batch_size: int = 32,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    name: str | None = None,
    device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_batches: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    exact: bool = False,
    restart: bool = False,
    autoattack: dict | None = None,
    extra: dict | None = None,
) -> dict | None:
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
        steps: attack iteration counts, e.g. ``(10, 100, 1000)``; one record column each
            (sorted, duplicates dropped; ``fgsm`` has exactly one step).
        attack: ``pgd`` (the paper's), ``fgsm``, ``ifgsm`` or ``mifgsm``; None: no sweep (only
            ``autoattack``).
        eps, step_size: L-inf radius and step on the [0, 1] scale (paper: 16/255 and 1/255).
        restarts: random restarts per attack (PGD).
        targeted: paper's targeted attacks with a random wrong target per image (default) or
            untargeted attacks (success = misclassification).
        step_rule: "paper" uses ``max(step_size, eps / steps)`` (Sec. 6.1) as the official code.
        seed: seeds targets, random starts and the ``limit`` subset.
        batch_size: images per batch; part of the settings (it fixes the random starts).
        limit: evaluate the library's fixed random subset of this many images.
        ids: one id per dataset image (default: file stems where known, else indices).
        name: model label in tables and plots (default: the folder name of ``out_dir``).
        device: default: this process's GPU if there is one, else the CPU.
        rank, world_size: run one shard by hand (no collectives); default from torch.distributed.
        max_batches: stop after this many batches of this call (an interruption, for tests).
        exact: turn the speed layer off (:mod:`featdenoise.accel`): bit-level agreement with
            the attack as written, at ~1.3-1.6x the time on a CPU. Not part of the identity.
        restart: discard an evaluation of other settings found in ``out_dir`` and start over.
        autoattack: also run AutoAttack on the same images after the sweep (or alone when
            ``attack`` is None): ``{"version": "standard"|"rand", "attacks": [...] or None,
            "steps", "n_target_classes", "n_queries"}`` (any subset; see
            :mod:`featdenoise.evaluation.autoattack`). L-inf at the same ``eps``; untargeted
            and targeted stages as in the original, whatever ``targeted`` says.
        extra: more JSON-able facts stored in settings and summary (model source, dataset name).

    Returns:
        The summary dict (also written to ``summary.json``) when every image is done and this
        process merged the results; None otherwise (other ranks, or stopped by ``max_batches``).
    """
    if attack is None and not autoattack:
        raise ValueError("give an attack to run (a PGD-style sweep, AutoAttack, or both)")
    if attack is not None and attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    steps = [] if attack is None else [1] if attack == "fgsm" else sorted({int(s) for s in steps})
    if attack is not None and (not steps or any(s < 1 for s in steps)):
        raise ValueError(f"--steps must be positive iteration counts, got {steps}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps={eps:g} is outside (0, 1] (the [0, 1] pixel scale; 16/255 is the "
                         "paper's 16)")
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"--restarts must be an integer >= 1, got {restarts}")
    names = attack_names(attack, steps) if attack else []
    kw = dict(attack=attack, eps=eps, step_size=step_size, restarts=restarts,
              targeted=targeted, step_rule=step_rule, exact=exact)
    columns = [attack_column(n, steps=k, **kw) for n, k in zip(names, steps, strict=True)]
    if attack is not None:  # a bad option (step_size=inf...) is refused now, not at batch 1
        make_attack(attack, model, steps=steps[0], **{k: v for k, v in kw.items()
                                                      if k != "attack"})
    if autoattack:
        from featdenoise.evaluation.autoattack import autoattack_columns

        aa = {k: v for k, v in autoattack.items() if v is not None}
        columns += autoattack_columns(model, eps=eps, exact=exact, **aa)
        autoattack = {**aa, "attacks": [c.name for c in columns[len(names):]]}
    p = engine.plan(model, dataset, columns, batch_size=batch_size, limit=limit, seed=seed,
                    targeted=targeted, ids=ids)
    settings = {
        "name": name or outdir.display_name(out_dir),
        "kind": "whitebox", "attack": attack, "steps": steps, "eps": float(eps),
        "step_size": float(step_size), "eps_255": round(float(eps) * 255, 6),
        "step_size_255": round(float(step_size) * 255, 6), "restarts": int(restarts),
        "targeted": bool(targeted), "step_rule": step_rule, "seed": int(seed),
        "batch_size": int(batch_size), "num_images": len(p.order), "limit": limit,
        "num_classes": p.num_classes, "ids_digest": p.ids_digest, "exact": bool(exact),
        "model": engine.model_identity(model), **(extra or {}),
    }
    if autoattack:
        settings["autoattack"] = autoattack
    with engine.prepare(out_dir, settings, restart=restart, rank=rank, world_size=world_size):
        records = engine.run(model, p, out_dir, desc=settings["name"], device=device, rank=rank,
                             world_size=world_size, max_batches=max_batches,
                             num_workers=num_workers, progress=progress)
        if records is None:
            return None
        return finalize(out_dir, records, settings)


def summarize(records: Sequence[dict], settings: dict) -> dict:
    """The summary of a finished sweep: settings, :func:`metrics.summarize`, steps per attack."""
    names = attack_names(settings["attack"], settings["steps"]) if settings["attack"] else []
    summary = {**settings, **metrics.summarize(records, names, settings["targeted"])}
    for entry, n in zip(summary["attacks"], settings["steps"], strict=True):
        entry["steps"] = n
    if settings.get("autoattack"):
        from featdenoise.evaluation.autoattack import summarize_autoattack

        summary["autoattack"] = {**settings["autoattack"], **summarize_autoattack(
            records, settings["autoattack"]["attacks"])}
    return summary


def finalize(out_dir: str, records: Sequence[dict], settings: dict) -> dict:
    """Write ``outcomes.jsonl``, ``summary.json``, ``table.md``, the Fig. 6 plot; return summary."""
    from featdenoise.evaluation import report

    summary = summarize(records, settings)
    engine.write_outcomes(out_dir, records)
    engine.write_json(os.path.join(out_dir, engine.SUMMARY_FILE), summary)
    report.write_report([summary], out_dir)
    return summary
