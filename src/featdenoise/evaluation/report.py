"""Evaluation summaries as markdown tables and the accuracy-vs-iterations plot (paper Fig. 6).

A *summary* is the dict that :func:`featdenoise.evaluation.whitebox.evaluate_whitebox` writes to
``summary.json``: ``name``, ``num_images``, ``targeted``, ``eps_255``, ``clean`` (``top1``,
``top5``), and ``attacks``, a list of ``{"name", "steps", "accuracy", "success_rate", "n"}``
(rates in [0, 1]).
Everything here takes a list of such summaries, so several models (or the same model attacked
targeted and untargeted) go into one table and one plot.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from featdenoise.runtime import optional
from featdenoise.runtime.atomic import PNG_STAMP, atomic_write, own_json, own_png, own_text

log = logging.getLogger(__name__)

TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_iterations.png"


def load_summary(path: str) -> dict:
    """Read a summary from ``summary.json`` or from an evaluation folder holding one."""
    file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no evaluation summary at {file!r}; pass a finished `featdenoise eval` output folder")
    with open(file) as f:
        summary = json.load(f)
    if "attacks" not in summary or not isinstance(summary.get("clean"), dict):
        raise ValueError(f"{file!r} is not a white-box evaluation summary (a black-box one?); "
                         "pass folders written by `featdenoise eval`")
    return summary


def label(summary: dict) -> str:
    """Legend/row label of a summary: its name, marked when the attack was untargeted."""
    name = str(summary.get("name", "model"))
    return name if summary.get("targeted", True) else f"{name} (untargeted)"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}"


def _attack_title(a: dict) -> str:
    kind = str(a.get("attack", a["name"].rstrip("0123456789"))).upper()
    return f"{kind}-{a['steps']}" if a.get("steps") is not None else a["name"]


def markdown_table(summaries: Sequence[dict]) -> str:
    """One row per summary: images, clean top-1/top-5, then ``accuracy / success`` per attack (%).

    Columns are the union of the summaries' attacks, ordered by iteration count; a model without
    that attack shows ``-``. Success is the targeted attack success rate (``pred == target``), or
    the misclassification rate for untargeted rows. Like the official model zoo, both numbers are
    shown: accuracy is the defender's metric, success the attacker's.
    """
    if not summaries:
        raise ValueError("no summaries to tabulate")
    cols: dict[str, dict] = {}
    for s in summaries:
        for a in s.get("attacks", []):
            cols.setdefault(a["name"], {**a, "attack": s.get("attack", a.get("attack"))})
    order = sorted(cols, key=lambda k: (cols[k].get("steps") or 0, k))
    with_aa = any(s.get("autoattack") for s in summaries)
    head = ["model", "images", "clean top-1", "clean top-5"]
    head += [f"{_attack_title(cols[k])} acc / succ" for k in order]
    head += ["AutoAttack acc"] if with_aa else []
    rule = "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for s in summaries:
        by = {a["name"]: a for a in s.get("attacks", [])}
        row = [label(s), str(s.get("num_images", "")), _pct(s["clean"]["top1"]),
               _pct(s["clean"].get("top5"))]
        for k in order:
            a = by.get(k)
            row.append("-" if a is None else f"{_pct(a['accuracy'])} / {_pct(a['success_rate'])}")
        if with_aa:
            row.append(_pct(s["autoattack"]["final"]) if s.get("autoattack") else "-")
        lines.append("| " + " | ".join(row) + " |")
    eps = {s.get("eps_255") for s in summaries}
    note = ""
    if len(eps) == 1 and None not in eps:
        (e,) = eps
        note = f"\n\nL-inf eps = {e:g} (0..255 scale); numbers in %.\n"
    for s in summaries:
        if s.get("autoattack"):
            note += "\n" + autoattack_line(s) + "\n"
    return "\n".join(lines) + (note or "\n")


def autoattack_line(summary: dict) -> str:
    """``name: AutoAttack (standard): robust accuracy after apgd-ce 45.0, apgd-t 43.0, ...``."""
    aa = summary["autoattack"]
    after = ", ".join(f"{n} {_pct(a)}" for n, a in zip(aa["names"], aa["robust_accuracy"],
                                                        strict=True))
    budget = ", ".join(f"{k} {aa[k]}" for k in ("steps", "n_target_classes", "n_queries")
                       if k in aa)
    return (f"{label(summary)}: AutoAttack ({aa.get('version', 'standard')}"
            f"{'; ' + budget if budget else ''}) robust accuracy after {after} (% of "
            f"{aa['n']} images)")


def save_figure(fig, path: str, **savefig_kwargs) -> str:
    """Write ``fig`` to ``path`` as a PNG (atomically; parent folders created), free it, return
    ``path``. A file already there that featdenoise did not draw is refused, not replaced."""
    try:
        with atomic_write(path, "wb", ours=own_png) as f:
            fig.savefig(f, format="png", metadata={"Software": f"{PNG_STAMP} (matplotlib)"},
                        **savefig_kwargs)
    finally:
        optional.pyplot().close(fig)
    return path


def plot_accuracy_vs_iterations(summaries: Sequence[dict], path: str,
                                title: str | None = None) -> str:
    """Plot accuracy (%) against attack iterations, log x axis, one line per summary (paper Fig. 6).

    Untargeted runs are drawn dashed.
    Returns ``path`` (a PNG). Uses matplotlib's Agg backend (no display needed).
    """
    plt = optional.pyplot("the accuracy plot")
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    all_steps: set[int] = set()
    for s in summaries:
        pts = sorted((a["steps"], a["accuracy"]) for a in s.get("attacks", [])
                     if a.get("steps") is not None)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        all_steps.update(xs)
        style = "-" if s.get("targeted", True) else "--"
        ax.plot(xs, [100 * y for y in ys], marker="o", linestyle=style, label=label(s))
        for x, y in pts[-1:]:
            ax.annotate(f"{100 * y:.1f}", (x, 100 * y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    if all_steps:
        ticks = sorted(all_steps)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("attack iterations")
    ax.set_ylabel("accuracy (%)")
    if title is None:
        eps = {s.get("eps_255") for s in summaries}
        kind = {str(s.get("attack", "pgd")).upper() for s in summaries}
        title = f"{'/'.join(sorted(kind))} white-box attack"
        if len(eps) == 1 and None not in eps:
            title += f", eps = {next(iter(eps)):g}"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(summaries: Sequence[dict], out_dir: str, title: str | None = None) -> dict:
    """Write ``table.md`` and ``accuracy_vs_iterations.png`` for ``summaries`` into ``out_dir``.

    Returns ``{"table": path, "plot": path}`` (``plot`` None when no summary has an iteration
    sweep, e.g. AutoAttack alone, or when matplotlib, the ``plots`` extra, is not installed).
    """
    os.makedirs(out_dir, exist_ok=True)
    table = os.path.join(out_dir, TABLE_FILE)
    with atomic_write(table, ours=own_text("| model |")) as f:
        f.write(markdown_table(summaries))
    plot = None
    if not any(a.get("steps") is not None for s in summaries for a in s.get("attacks", [])):
        return {"table": table, "plot": plot}
    if not optional.installed("matplotlib"):
        log.warning("%s: no plot, matplotlib is not installed (pip install "
                    "'featdenoise[plots]'); the numbers are in %s", out_dir, table)
        return {"table": table, "plot": plot}
    plot = plot_accuracy_vs_iterations(summaries, os.path.join(out_dir, PLOT_FILE), title)
    return {"table": table, "plot": plot}


def merge_runs(runs: Sequence[str], out_dir: str, title: str | None = None) -> dict:
    """Merge finished evaluations (folders or ``summary.json`` files) into one table and one plot.

    Also writes ``summaries.json`` (the list). Returns ``{"table", "plot", "summaries"}``.
    """
    if not runs:
        raise ValueError("give at least one evaluation folder to merge")
    summaries = [load_summary(r) for r in runs]
    for key, what in (("eps_255", "eps"), ("step_rule", "step rule")):
        values = {str(s.get(key)) for s in summaries}
        if len(values) > 1:
            shown = ", ".join(f"{r}: {s.get(key)}" for r, s in zip(runs, summaries, strict=True))
            raise ValueError(f"the runs differ in {what} ({shown}); one table and plot compare "
                             "one threat model, so merge runs of the same settings")
    paths = write_report(summaries, out_dir, title)
    merged = os.path.join(out_dir, "summaries.json")
    with atomic_write(merged, ours=own_json()) as f:
        json.dump(summaries, f, indent=2, sort_keys=True)
    return {**paths, "summaries": merged}


def blackbox_table(summary: dict) -> str:
    """Markdown table of a black-box summary: accuracy per attacker, all-or-nothing (Table 2)."""
    lines = ["| attacker | images | accuracy (%) |", "|---|---:|---:|"]
    n = summary.get("num_images", "")
    if summary.get("clean") is not None:
        lines.append(f"| clean | {n} | {_pct(summary['clean'])} |")
    for name, acc in summary["per_attacker"].items():
        lines.append(f"| {name} | {n} | {_pct(acc)} |")
    lines.append(f"| **all-or-nothing** ({len(summary['per_attacker'])} attackers) | {n} | "
                 f"**{_pct(summary['all_or_nothing'])}** |")
    return "\n".join(lines) + "\n"
