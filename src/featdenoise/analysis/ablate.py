"""Ablations of the denoising block (paper Sec. 6.1: Fig. 7 and Table 1).

:func:`run_ablation` trains (:func:`featdenoise.training.train`) and evaluates (white-box PGD,
:func:`featdenoise.evaluation.whitebox.evaluate_whitebox`) a list of network variants that differ
only in their denoising blocks, with the same config, data, budget and seed(s), then writes one
markdown table and one plot (accuracy per variant and attack strength, the spread over seeds as
error bars when several seeds are run).

Variants (:data:`VARIANTS`), each a set of model kwargs applied to the config's backbone:

* Fig. 7: ``baseline`` (no extra blocks), ``bottleneck`` (+4 standard residual blocks, the
  ResNet-164 control), and one denoising block after each stage with the op ``null`` (1x1 conv
  only), ``mean``, ``median``, ``bilateral_dot``, ``bilateral_gaussian``, ``nonlocal_dot``,
  ``nonlocal_gaussian`` (:data:`DEFAULT_VARIANTS`);
* Table 1, on request: ``no_1x1`` (non-local Gaussian without the 1x1 conv) and ``no_residual``
  (without the identity path; the paper could not train it: a run whose loss becomes NaN is
  reported as ``diverged`` with NaN accuracies, as Table 1 does).

Layout of ``out_dir``: ``runs/<variant>-seed<S>/`` (training run directories, resumable),
``eval/<variant>-seed<S>/`` (evaluations, resumable), ``ablation.md``, ``ablation.png``,
``ablation.json``. Re-running the same command continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from featdenoise.data.datasets import build_dataset
from featdenoise.evaluation import whitebox
from featdenoise.evaluation.report import save_figure
from featdenoise.runtime import distributed as dist
from featdenoise.runtime import optional
from featdenoise.runtime.atomic import atomic_write, own_json, own_text
from featdenoise.training import NonFiniteLossError, load_model, train
from featdenoise.training.config import Config, load_config

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict] = {
    "baseline": dict(placement="none"),
    "bottleneck": dict(placement="bottleneck"),
    "null": dict(placement="stages", denoise="null"),
    "mean": dict(placement="stages", denoise="mean"),
    "median": dict(placement="stages", denoise="median"),
    "bilateral_dot": dict(placement="stages", denoise="bilateral_dot"),
    "bilateral_gaussian": dict(placement="stages", denoise="bilateral_gaussian"),
    "nonlocal_dot": dict(placement="stages", denoise="nonlocal_dot"),
    "nonlocal_gaussian": dict(placement="stages", denoise="nonlocal_gaussian"),
    "no_1x1": dict(placement="stages", denoise="nonlocal_gaussian", use_conv=False),
    "no_residual": dict(placement="stages", denoise="nonlocal_gaussian", residual=False),
}
DEFAULT_VARIANTS = ("baseline", "bottleneck", "null", "mean", "median", "bilateral_dot",
                    "bilateral_gaussian", "nonlocal_dot", "nonlocal_gaussian")
LABELS = {
    "baseline": "baseline",
    "bottleneck": "+bottleneck blocks",
    "null": "+denoise: null (1x1 only)",
    "mean": "+denoise: 3x3 mean",
    "median": "+denoise: 3x3 median",
    "bilateral_dot": "+denoise: bilateral, dot prod",
    "bilateral_gaussian": "+denoise: bilateral, gaussian",
    "nonlocal_dot": "+denoise: non-local, dot prod",
    "nonlocal_gaussian": "+denoise: non-local, gaussian",
    "no_1x1": "non-local, gaussian, removing 1x1",
    "no_residual": "non-local, gaussian, removing residual",
}
# Block options a variant sets itself; a base config's values for them are dropped.
_BLOCK_KEYS = ("placement", "denoise", "use_conv", "residual", "subsample")
_SUFFIXES = ("_denoise_all_gaussian", "_denoise_all", "_denoise", "_bottleneck")


def backbone(name: str) -> str:
    """The registry name without its variant suffix (``resnet152_denoise`` -> ``resnet152``)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def variant_model(model_name: str, model_kwargs: dict, variant: str) -> tuple[str, dict]:
    """``(registry name, kwargs)`` of ``variant`` built on the backbone of ``model_name``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r}; choose from "
                         f"{', '.join(VARIANTS)}")
    kwargs = {k: v for k, v in dict(model_kwargs).items() if k not in _BLOCK_KEYS}
    return backbone(model_name), {**kwargs, **VARIANTS[variant]}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN if any value is NaN."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(results: Sequence[dict], steps: Sequence[int]) -> dict[str, dict]:
    """Mean and std over seeds per variant. ``results``: ``{"variant", "seed", "clean",
    "accuracy": {steps: acc}}`` with rates in [0, 1] (NaN for a diverged run).
    Returns ``{variant: {"clean": (mean, std), "accuracy": {steps: (mean, std)}, "seeds": n,
    "diverged": n}}`` in the order variants first appear."""
    out: dict[str, dict] = {}
    for v in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == v]
        out[v] = {
            "clean": _mean_std([r["clean"] for r in rows]),
            "accuracy": {int(s): _mean_std([r["accuracy"][int(s)] for r in rows])
                         for s in steps},
            "seeds": len(rows),
            "diverged": sum(1 for r in rows if r.get("status") == "diverged"),
        }
    return out


def _cell(mean: float, std: float, seeds: int) -> str:
    if math.isnan(mean):
        return "NaN"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")


def ablation_table(agg: dict[str, dict], steps: Sequence[int], note: str = "") -> str:
    """Markdown table: variant, clean accuracy, accuracy under PGD-k for each k (%, mean ± std
    over seeds when there are several; NaN for runs that diverged, as the paper's Table 1)."""
    head = ["variant", "seeds", "clean"] + [f"PGD-{s}" for s in steps]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for v, a in agg.items():
        n = a["seeds"]
        cells = [a["clean"]] + [a["accuracy"][int(s)] for s in steps]  # (mean, std) each
        row = [LABELS.get(v, v), str(n)] + [_cell(mean, std, n) for mean, std in cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def plot_ablation(agg: dict[str, dict], steps: Sequence[int], path: str,
                  title: str | None = None) -> str:
    """Grouped bar plot like Fig. 7: accuracy (%) of every variant under each PGD strength, error
    bars = std over seeds. Diverged variants get no bar. Returns ``path`` (PNG, Agg backend)."""
    plt = optional.pyplot("the ablation plot")
    names = list(agg)
    k = len(steps)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2), dpi=110)
    for j, s in enumerate(steps):
        means = [100 * agg[v]["accuracy"][int(s)][0] for v in names]
        stds = [100 * agg[v]["accuracy"][int(s)][1] if agg[v]["seeds"] > 1 else 0.0
                for v in names]
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(names))]
        spread = any(agg[v]["seeds"] > 1 for v in names)
        bars = ax.bar(xs, [0.0 if math.isnan(m) else m for m in means], width,
                      yerr=[0.0 if math.isnan(e) else e for e in stds] if spread else None,
                      capsize=2, label=f"PGD-{s}")
        for b, m in zip(bars, means, strict=True):
            ax.annotate("NaN" if math.isnan(m) else f"{m:.1f}",
                        (b.get_x() + b.get_width() / 2, 0 if math.isnan(m) else m),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([LABELS.get(v, v).replace("+denoise: ", "") for v in names],
                       rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_title(title or "Ablation: denoising variants (white-box PGD)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


@dataclass(frozen=True)
class EvalSettings:
    """How every variant is evaluated: white-box PGD (:func:`~featdenoise.evaluation.whitebox.
    evaluate_whitebox`) on a fixed random subset of the validation images.

    ``eps``: budget on the [0, 1] scale (None: the config's training eps, ``attack.eps / 255``);
    ``step_size``: step on the [0, 1] scale, paper rule ``max(step, eps / steps)``; ``targeted``:
    the paper's targeted PGD (else untargeted); ``limit``: images per evaluation (None: all);
    ``batch_size``: evaluation batch size.
    """

    eps: float | None = None
    step_size: float = 1 / 255
    targeted: bool = True
    limit: int | None = 1000
    batch_size: int = 100


@dataclass(frozen=True)
class _Plan:
    """One ablation, checked: the base config, the runs, and the evaluation with its eps resolved
    (``eps``, [0, 1] scale)."""

    base: Config
    out_dir: str
    variants: list[str]
    seeds: list[int]
    steps: list[int]
    evaluation: EvalSettings
    eps: float
    progress: bool


def run_ablation(config: str | None, out_dir: str, *, variants: Sequence[str] = DEFAULT_VARIANTS,
                 seeds: Sequence[int] = (0,), steps: Sequence[int] = (10, 100),
                 overrides: Sequence[str] = (), evaluation: EvalSettings | None = None,
                 progress: bool = True) -> dict:
    """Train and evaluate every variant with every seed; write table, plot and JSON.

    Args:
        config: training config: a YAML file or a shipped config's name
            (:func:`featdenoise.configs.list_configs`); its model name gives the backbone.
        out_dir: output folder (see the module docstring); re-running resumes.
        variants: names of :data:`VARIANTS` (default: the nine of Fig. 7).
        seeds: one training + evaluation per seed (``run.seed``); the spread is their std.
        steps: PGD iteration counts of the evaluation (Fig. 7: up to 100).
        overrides: ``key=value`` config overrides applied to every variant (same budget).
        evaluation: eps, step, targeted or not, images and batch size of the evaluation
            (default :class:`EvalSettings`: the training eps, step 1/255, targeted, 1000 images).
        progress: progress bars.
    Returns:
        ``{"table": path, "plot": path, "json": path, "results": [...], "aggregate": {...}}``
        (rank 0's, on every process).

    Under ``torchrun`` the process group is joined once here: every variant trains with all
    processes (``train`` leaves a group it did not create) and is evaluated by all of them
    through the rank-aware evaluation (each process a share of the batches, rank 0 merges);
    only rank 0 logs and writes the table, plot and JSON.
    """
    plan = _make_plan(config, out_dir, variants, seeds, steps, overrides,
                      evaluation or EvalSettings(), progress)
    os.makedirs(out_dir, exist_ok=True)
    d = plan.base.data
    val_set = build_dataset(d.name, d.root, "val", augment=False, image_size=d.image_size,
                            strict=d.strict)

    created = not dist.is_dist()
    device = dist.init(plan.base.run.device, what="run.device")
    try:
        results = _train_and_evaluate(plan, val_set, device)
        out = _write_outputs(plan, results) if dist.is_main() else None
        return dist.broadcast_object(out)
    finally:
        if created:
            dist.shutdown()


def _make_plan(config: str | None, out_dir: str, variants: Sequence[str], seeds: Sequence[int],
               steps: Sequence[int], overrides: Sequence[str], evaluation: EvalSettings,
               progress: bool) -> _Plan:
    """Check the arguments of :func:`run_ablation` (one line naming the first bad one) and load
    the base config."""
    variants = list(variants)
    if not variants:
        raise ValueError("give at least one ablation variant")
    for v in variants:
        variant_model("x", {}, v)  # fails early on an unknown name
    if not seeds:
        raise ValueError("give at least one seed")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"--steps must be positive iteration counts, got {steps}")
    base = load_config(config, list(overrides))
    eps = base.attack.eps / 255 if evaluation.eps is None else evaluation.eps
    return _Plan(base, out_dir, variants, list(seeds), steps, evaluation, eps, progress)


def _say(msg: str, *args: object) -> None:
    """Log ``msg % args`` (INFO) on rank 0 only."""
    if dist.is_main():
        log.info(msg, *args)


def _train_and_evaluate(plan: _Plan, val_set: Dataset, device: torch.device) -> list[dict]:
    """Train and evaluate every (seed, variant) with all processes; rank 0's records (the other
    processes' evaluation shares are merged by rank 0, so they return fewer records)."""
    results = []
    for seed in plan.seeds:
        for v in plan.variants:
            record = _train_and_evaluate_one(plan, v, int(seed), val_set, device)
            if record is not None:
                results.append(record)
    return results


def _train_and_evaluate_one(plan: _Plan, v: str, seed: int, val_set: Dataset,
                            device: torch.device) -> dict | None:
    """Variant ``v`` with ``seed``: its record (``status`` ``ok`` or ``diverged``), or None on a
    process whose evaluation share rank 0 merged."""
    base, ev = plan.base, plan.evaluation
    tag = f"{v}-seed{seed}"
    name, kwargs = variant_model(base.model.name, base.model.kwargs, v)
    tree = base.to_dict()
    tree["model"] = {"name": name, "kwargs": kwargs}
    tree["run"].update(out_dir=os.path.join(plan.out_dir, "runs", tag), seed=seed)
    _say("[ablate] %s: %s %s", tag, name, kwargs)
    record = {"variant": v, "seed": seed, "model": name, "kwargs": kwargs}
    try:
        run_dir = train(load_config(base=tree))
    except NonFiniteLossError as err:
        _say("[ablate] %s: training diverged (%s)", tag, err)
        return {**record, "status": "diverged", "clean": float("nan"),
                "accuracy": {s: float("nan") for s in plan.steps}}
    dist.barrier()  # rank 0 has written the weights
    model = load_model(run_dir).eval()
    summary = whitebox.evaluate_whitebox(
        model, val_set, os.path.join(plan.out_dir, "eval", tag), steps=plan.steps, attack="pgd",
        eps=plan.eps, step_size=ev.step_size, targeted=ev.targeted, seed=seed,
        batch_size=ev.batch_size, limit=ev.limit, name=tag, progress=plan.progress,
        device=device, extra={"variant": v, "dataset": base.data.name})
    if summary is None:  # another rank merged this evaluation
        return None
    return {**record, "status": "ok", "run_dir": run_dir, "clean": summary["clean"]["top1"],
            "accuracy": {a["steps"]: a["accuracy"] for a in summary["attacks"]},
            "num_images": summary["num_images"]}


def _write_outputs(plan: _Plan, results: list[dict]) -> dict:
    """Table, plot and JSON of the ablation (rank 0 only)."""
    base, out_dir, seeds, steps = plan.base, plan.out_dir, plan.seeds, plan.steps
    eval_eps, targeted = plan.eps, plan.evaluation.targeted
    agg = aggregate(results, steps)
    n_img = next((r["num_images"] for r in results if "num_images" in r), 0)
    note = (f"{base.data.name}, backbone {backbone(base.model.name)}; "
            f"{'targeted' if targeted else 'untargeted'} PGD, eps {eval_eps * 255:g}/255, "
            f"{n_img} images; accuracy in %"
            + (f", mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
               else f", seed {seeds[0]}") + ".")
    table = ablation_table(agg, steps, note)
    paths = {"table": os.path.join(out_dir, "ablation.md"),
             "plot": os.path.join(out_dir, "ablation.png"),
             "json": os.path.join(out_dir, "ablation.json")}
    with atomic_write(paths["table"], ours=own_text(table.splitlines()[0])) as f:
        f.write(table)
    plot_ablation(agg, steps, paths["plot"],
                  title=f"Ablation on {base.data.name} ({backbone(base.model.name)})")
    with atomic_write(paths["json"], ours=own_json("results", "aggregate")) as f:
        json.dump({"results": results, "steps": steps, "seeds": list(seeds),
                   "eps": eval_eps, "targeted": targeted,
                   "aggregate": {v: {"clean": a["clean"], "seeds": a["seeds"],
                                     "diverged": a["diverged"],
                                     "accuracy": {str(s): m for s, m in a["accuracy"].items()}}
                                 for v, a in agg.items()}},
                  f, indent=2, allow_nan=True)
    return {**paths, "results": results, "aggregate": agg, "markdown": table}
