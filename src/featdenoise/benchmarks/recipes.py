"""``featdenoise bench recipes``: PGD-AT, Free-AT and Fast-AT on Fashion-MNIST, measured.

Trains the small 28-px baseline (``fashion_mnist_adv*.yaml``) and non-local-denoise
(``fashion_mnist_denoise*.yaml``) networks with each ``attack.mode`` on the same training subset,
measures the CPU seconds of each training run (``time.process_time``: training, its small final
clean evaluation and, for ``fast``, the overfitting checks), then evaluates every network through
the evaluation engine on the same held-out images: clean, untargeted PGD-100 and a reduced
AutoAttack (APGD-CE + APGD-T with fewer iterations and target classes: a cheaper, weaker check
than the standard chain). Budgets, in passes of forward+backward per image (the shipped
configs): ``pgd`` 4 epochs of PGD-5 (24 passes), ``free`` 2 epochs x 4 replays and ``fast`` 4
epochs x 2 (8 passes each: a third), ``fast x3`` 12 epochs (PGD-AT's 24 passes). The CPU seconds
are measured, not derived from passes (an attack step costs less than an update).

Prints one table (mode, network, CPU seconds, clean, PGD-100, AutoAttack) and writes
``recipes.png`` (robust accuracy against CPU seconds) and ``recipes.json`` into ``--out``.
Target: ``fast`` reaches PGD-AT's PGD-100 accuracy within 2 points in a third of the CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import Dataset

from featdenoise.data.datasets import build_dataset
from featdenoise.evaluation import whitebox
from featdenoise.runtime import optional
from featdenoise.training import load_model, train
from featdenoise.training.config import load_config

NETWORKS = {"baseline": "fashion_mnist_adv", "denoise": "fashion_mnist_denoise"}


def _plan(quick: bool) -> dict:
    if quick:  # the baseline network only, a few steps: a smoke test
        return dict(train=128, images=16, batch=32, aa_steps=2, aa_targets=1, check=16,
                    networks=["baseline"], scale=0.5)
    return dict(train=1536, images=100, batch=32, aa_steps=20, aa_targets=2, check=128,
                networks=list(NETWORKS), scale=1.0)


def _runs(p: dict) -> list[tuple[str, str, list[str]]]:
    """(row label, config suffix, overrides) per mode: the shipped configs' epochs (PGD-AT 4
    epochs of PGD-5 = 24 passes per image; Free-AT 2 epochs x 4 replays = 8; Fast-AT 4 epochs x
    2 = 8: a third), and ``fast x3``: Fast-AT at PGD-AT's 24 passes (12 epochs)."""
    e = max(int(4 * p["scale"]), 1)
    return [
        ("pgd", "", [f"optim.epochs={e}", f"optim.milestones=[{0.75 * e}]"]),
        ("free", "_free", [f"optim.epochs={max(e // 2, 1)}", f"optim.milestones=[{0.375 * e}]"]),
        ("fast", "_fast", [f"optim.epochs={e}"]),
        ("fast x3", "_fast", [f"optim.epochs={3 * e}"]),
    ]


def _train(config: str, overrides: list[str], out: str, p: dict) -> tuple[str, float]:
    """Train ``config`` with ``overrides`` into ``out``; (run folder, process CPU seconds)."""
    cfg = load_config(config, [
        *overrides, f"data.train_subset={p['train']}", f"data.batch_size={p['batch']}",
        f"data.val_subset={p['check']}", f"attack.check_images={p['check']}",
        "run.eval_every=0", "run.final_eval_steps=0", "run.checkpoint_every=0",
        "run.progress=false", "run.tensorboard=false", "run.device=cpu", "run.resume=never",
        f"run.out_dir={out}"])
    t0 = time.process_time()
    run_dir = train(cfg)
    return run_dir, time.process_time() - t0


def _evaluate(run_dir: str, val_set: Dataset, out: str, p: dict) -> dict:
    """Clean, untargeted PGD-100 and reduced AutoAttack accuracy of the trained network."""
    model = load_model(run_dir).eval()
    s = whitebox.evaluate_whitebox(
        model, val_set, out, steps=[100], attack="pgd", eps=16 / 255, step_size=1 / 255,
        targeted=False, seed=1, batch_size=100, limit=p["images"], progress=False,
        device="cpu", restart=True,
        autoattack={"version": "standard", "attacks": ["apgd-ce", "apgd-t"],
                    "steps": p["aa_steps"], "n_target_classes": p["aa_targets"]})
    if s is None:  # only another rank of a process group gets None; the bench runs alone
        raise RuntimeError(f"{out}: the evaluation returned no summary")
    return {"clean": s["clean"]["top1"], "pgd100": s["attacks"][0]["accuracy"],
            "autoattack": s["autoattack"]["final"], "n": s["num_images"]}


def _plot(rows: list[dict], path: str) -> None:
    plt = optional.pyplot("featdenoise bench recipes")
    fig, ax = plt.subplots(figsize=(6, 4))
    for net, marker in (("baseline", "o"), ("denoise", "s")):
        for r in (r for r in rows if r["network"] == net):
            ax.scatter(r["cpu_s"], 100 * r["pgd100"], marker=marker,
                       color={"pgd": "C0", "free": "C1", "fast": "C2", "fast x3": "C3"}[r["mode"]],
                       label=f"{r['mode']} {net}")
    ax.set_xlabel("training CPU seconds")
    ax.set_ylabel("PGD-100 accuracy (%), eps 16/255")
    ax.set_title("Fashion-MNIST: robust accuracy against training cost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _header(p: dict, quick: bool) -> str:
    return (f"featdenoise bench recipes: Fashion-MNIST, {p['train']} training images, batch "
            f"{p['batch']}, {torch.get_num_threads()} thread(s); "
            f"evaluation on {p['images']} test images: untargeted PGD-100 (eps 16/255, step "
            f"1/255) and AutoAttack APGD-CE + APGD-T ({p['aa_steps']} iterations, "
            f"{p['aa_targets']} target classes; reduced){', quick' if quick else ''}")


def _row_line(r: dict) -> str:
    return (f"  {r['mode']:7s} {r['network']:8s} {r['cpu_s']:8.1f} CPU s  clean {r['clean']:.3f}"
            f"  PGD-100 {r['pgd100']:.3f}  AutoAttack {r['autoattack']:.3f}")


def _summary(rows: list[dict], networks: list[str]) -> list[str]:
    """The Markdown table of every row, then per network each cheap recipe against PGD-AT."""
    lines = ["", "| mode | network | CPU s | clean | PGD-100 | AutoAttack |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['network']} | {r['cpu_s']:.0f} | {100 * r['clean']:.1f} | "
              f"{100 * r['pgd100']:.1f} | {100 * r['autoattack']:.1f} |" for r in rows]
    for net in networks:
        pgd = next(r for r in rows if r["network"] == net and r["mode"] == "pgd")
        for mode in ("fast", "fast x3", "free"):
            r = next(r for r in rows if r["network"] == net and r["mode"] == mode)
            met = r["pgd100"] >= pgd["pgd100"] - 0.02 and r["cpu_s"] <= pgd["cpu_s"] / 3
            lines.append(f"  {net}: {mode} PGD-100 {100 * (r['pgd100'] - pgd['pgd100']):+.1f} "
                         f"points vs pgd at {r['cpu_s'] / pgd['cpu_s']:.2f}x its CPU time"
                         + (f" (target: within 2 points at <= 1/3: {'MET' if met else 'NOT MET'})"
                            if mode == "fast" else ""))
    return lines


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench recipes`` (args: quick, threads, out); the one place
    that prints."""
    torch.set_num_threads(args.threads or 1)
    p = _plan(bool(args.quick))
    out = getattr(args, "out", None) or os.path.join("runs", "bench_recipes")
    # Held out: the overfitting check reads a random subset of the test split (run seed 0);
    # evaluation another one (seed 1): they may share a few images.
    val_set = build_dataset("fashion_mnist", None, "val", augment=False, image_size=28)
    print(_header(p, bool(args.quick)))
    rows = []
    for net in p["networks"]:
        for mode, suffix, overrides in _runs(p):
            tag = f"{mode.replace(' ', '')}-{net}"
            run_dir, cpu = _train(NETWORKS[net] + suffix, overrides,
                                  os.path.join(out, "runs", tag), p)
            r = _evaluate(run_dir, val_set, os.path.join(out, "eval", tag), p)
            rows.append({"mode": mode, "network": net, "cpu_s": cpu, **r})
            print(_row_line(rows[-1]), flush=True)
    print("\n".join(_summary(rows, p["networks"])))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "recipes.json"), "w") as f:
        json.dump({"plan": p, "rows": rows}, f, indent=1)
    _plot(rows, os.path.join(out, "recipes.png"))
    print(f"wrote {os.path.join(out, 'recipes.png')} and recipes.json")
    return 0
