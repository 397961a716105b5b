"""The demo's report (:mod:`featdenoise.analysis.demo`): the accuracy table
(:func:`results_table`), ``report.md`` with the table, the plots and the feature-noise pictures,
and ``results.json`` with every summary and timing (:func:`write_report`)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from featdenoise.analysis.demo_budget import EPS, Budget
from featdenoise.runtime.atomic import atomic_write, own_json, own_text


def _fmt_pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def results_table(summaries: dict[str, dict[str, dict]], steps: tuple) -> str:
    """Markdown table: one row per network; clean accuracy, then accuracy under each attack.

    ``summaries[name]["targeted" | "untargeted"]`` are white-box summaries
    (:func:`featdenoise.evaluation.whitebox.evaluate_whitebox`); rates are shown in %.
    Targeted columns also give the targeted attack success rate after a slash.
    """
    head = ["network", "images", "clean"]
    head += [f"PGD-{s} targeted acc / succ" for s in steps]
    head += [f"PGD-{s} untargeted acc" for s in steps]
    with_aa = any("autoattack" in pair for pair in summaries.values())
    if with_aa:
        n_aa = next(p["autoattack"]["autoattack"]["n"] for p in summaries.values()
                    if "autoattack" in p)
        head.append(f"AutoAttack acc ({n_aa} images)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for name, pair in summaries.items():
        t, u = pair["targeted"], pair["untargeted"]
        at = {a["steps"]: a for a in t["attacks"]}
        au = {a["steps"]: a for a in u["attacks"]}
        row = [name, str(t["num_images"]), _fmt_pct(t["clean"]["top1"])]
        row += [f"{_fmt_pct(at[s]['accuracy'])} / {_fmt_pct(at[s]['success_rate'])}"
                for s in steps]
        row += [_fmt_pct(au[s]["accuracy"]) for s in steps]
        if with_aa:
            aa = pair.get("autoattack")
            row.append(_fmt_pct(aa["autoattack"]["final"]) if aa else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _aa_words(budget: Budget) -> str:
    if not budget.aa_budget:
        return "the standard version (APGD-CE, APGD-T, FAB-T, Square with 5000 queries)"
    steps, targets, queries = budget.aa_budget
    return (f"a reduced budget ({steps} iterations, {targets} targets, {queries} queries; "
            "weaker than AutoAttack)")


def write_report(out_dir: str, budget: Budget, summaries: dict, plot: str, noise: dict,
                 timings: dict, quick: bool, seed: int) -> str:
    """Write ``out_dir/report.md`` and ``out_dir/results.json``; returns the report's path.

    Args:
        out_dir: the demo's folder (links in the report are relative to it).
        budget: what was trained and evaluated (described in the report's text).
        summaries: per network, its ``targeted`` / ``untargeted`` (and ``autoattack``)
            white-box summaries (:func:`results_table`).
        plot: the accuracy-vs-iterations PNG (Fig. 6).
        noise: per network, :func:`featdenoise.analysis.viz.visualize`'s result (Sec. 3).
        timings: step name -> (wall, CPU) seconds.
        quick: the quick budget (the title says its numbers mean nothing).
        seed: the demo's seed.
    """
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    table = results_table(summaries, budget.eval_steps)
    lines = [
        "# featdenoise demo: Fashion-MNIST" + (" (quick, numbers meaningless)" if quick else ""),
        "",
        f"Three networks of the same size (`small_resnet`, width {budget.width}, one basic "
        f"block per stage): trained on clean images, adversarially trained, and adversarially "
        f"trained with a non-local denoising block (`{budget.denoise}`) after each stage.",
        f"Adversarial training: {budget.train_images} training images, {budget.epochs} epochs, "
        f"{'targeted' if budget.train_targeted else 'untargeted'} PGD-{budget.train_steps} "
        f"(step {budget.train_step_size:g}, 20% of batches from the clean image), "
        f"eps {EPS} on the [0, 1] scale.",
        f"Evaluation: {budget.eval_images} fixed random test images, white-box PGD at eps "
        f"{EPS} ({EPS * 255:g}/255), random start, step max({budget.eval_step_size:g}, "
        f"eps/steps); targeted = a random wrong target per image (paper Sec. 6.1), "
        f"accuracy = prediction equals the label; succ = targeted attack success rate.",
        f"AutoAttack: {_aa_words(budget)} at the same eps on {budget.aa_images} fixed random "
        f"test images (the library's subset for that size and seed).",
        "",
        "## Accuracy (%)",
        "",
        table,
        f"![accuracy vs iterations]({rel(plot)})",
        "",
        "## Feature noise (paper Sec. 3, Figs. 1-3)",
        "",
        "Relative L2 distance ||f(x_adv) - f(x)|| / ||f(x)|| between the features of an image "
        "and of its PGD counterpart (mean over the pictured images), at each stage and right "
        "before / after each denoising operation:",
        "",
    ]
    for name, res in noise.items():
        lines += [f"### {name}", "", res["table"], ""]
        lines += [f"![{name} {os.path.basename(p)}]({rel(p)})" for p in res["pictures"]]
        lines.append("")
    lines += ["## Time", "", "Wall-clock seconds, and CPU seconds used by this process (all "
              "threads; on a machine shared with other jobs the wall time grows, the CPU time "
              "much less).", "", "| step | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {k} | {w:.0f} | {c:.0f} |" for k, (w, c) in timings.items()]
    lines += ["", f"torch threads: {torch.get_num_threads()}, seed {seed}.", ""]
    path = os.path.join(out_dir, "report.md")
    with atomic_write(path, ours=own_text("# featdenoise demo")) as f:
        f.write("\n".join(lines))
    with atomic_write(os.path.join(out_dir, "results.json"),
                      ours=own_json("budget", "summaries")) as f:
        json.dump({"budget": dataclasses.asdict(budget), "summaries": summaries,
                   "feature_noise": {k: v["distances"] for k, v in noise.items()},
                   "timings_s": {k: {"wall": w, "cpu": c} for k, (w, c) in timings.items()}},
                  f, indent=2, sort_keys=True)
    return path
