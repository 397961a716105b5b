"""``featdenoise eval``: white-box robustness sweep (paper Sec. 6.1, Fig. 6) or a merge of sweeps.

eps and step size are given on the 0..255 pixel scale, as in the paper and the official flags
(``--eps 16`` is 16/255 on the [0, 1] pixels the library uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from featdenoise.cli.common import (
    Budget255,
    Step255,
    int_list,
    nonnegative_int,
    positive_int,
    str_list,
)
from featdenoise.cli.inputs import (
    add_data_args,
    add_exact_arg,
    add_model_args,
    add_restart_arg,
    check_run_args,
    dataset_from_args,
    models_from_args,
    print_table,
    resolve_device,
    split_attacks,
)
from featdenoise.data.datasets import subset_indices
from featdenoise.evaluation import report, sanity
from featdenoise.evaluation.options import RunOptions
from featdenoise.evaluation.whitebox import evaluate_whitebox
from featdenoise.hub.loading import check_compatible
from featdenoise.models import model_in_channels
from featdenoise.runtime import distributed, outdir


# --------------------------------------------------------------------------- eval
def _run(args: argparse.Namespace) -> int:
    outdir.output_dir(args.out, "--out", create=False)
    if args.plot:
        paths = report.merge_runs(args.plot, args.out, title=args.title)
        print_table(paths["table"])
        if paths['plot']:
            print(f"plot: {paths['plot']}")
        return 0
    if args.data is None:
        raise ValueError("--data is required (or --plot RUN ... to merge finished evaluations)")
    check_run_args(args)
    device = resolve_device(args.device)
    try:
        return _evaluate(args, device)
    finally:
        distributed.shutdown()


def _evaluate(args: argparse.Namespace, device: torch.device) -> int:
    sweep, aa = split_attacks(args)
    models = models_from_args(args)
    several = len(models) > 1
    run = RunOptions(batch_size=args.batch_size, limit=args.limit, seed=args.seed, device=device,
                     num_workers=args.workers, progress=not args.no_progress, exact=args.exact,
                     restart=args.restart)
    summaries = []
    code = 0
    for name, model, source in models:
        dataset = dataset_from_args(args, model_in_channels(model))
        check_compatible(model, dataset, f"--data {args.data}")
        if args.sanity:
            ok = _sanity(model, dataset, args, device)
            if not ok:
                print(f"featdenoise eval: sanity checks failed for {name}; its robustness "
                      "numbers would not be trustworthy, so it is not evaluated", file=sys.stderr)
                code = 1
                continue
        out = outdir.child(args.out, name, "evaluation folder") if several else args.out
        outdir.output_dir(out, "--out", create=False)
        options = dataclasses.replace(
            run, name=args.name if (args.name and not several) else name,
            extra={"source": source, "data": args.data, "split": args.split})
        summary = evaluate_whitebox(
            model, dataset, out, options=options, steps=args.steps, attack=sweep, autoattack=aa,
            eps=args.eps, step_size=args.step_size, restarts=args.restarts,
            targeted=not args.untargeted, step_rule=args.step_rule)
        if summary is not None:
            summaries.append(summary)
            if not several:
                print_table(os.path.join(out, report.TABLE_FILE))
                print(f"results: {out}")
    if several and summaries and distributed.is_main():
        paths = report.write_report(summaries, args.out, title=args.title)
        print_table(paths["table"])
        if paths['plot']:
            print(f"plot: {paths['plot']}")
    return code


def _sanity(model: nn.Module, dataset, args: argparse.Namespace, device: torch.device) -> bool:
    """Run :func:`featdenoise.evaluation.sanity.run_sanity` on a few images; print its report."""
    idx = subset_indices(len(dataset), args.limit, args.seed)[: args.sanity_images]
    loader = DataLoader(Subset(dataset, idx), batch_size=args.batch_size)
    model.to(device)
    results = sanity.run_sanity(
        model, loader, args.eps, min(args.steps), device, targeted=not args.untargeted,
        max_images=args.sanity_images, seed=args.seed, restarts=args.sanity_restarts,
        exact=args.exact)
    print(sanity.format_report(results))
    return all(r.passed for r in results)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="white-box PGD evaluation: accuracy and attack success vs iterations (Fig. 6)",
        description="Clean top-1/top-5, then accuracy and targeted attack success rate for each "
                    "attack iteration count (paper Sec. 6.1, Fig. 6). Per-image outcomes, "
                    "summary.json, table.md and accuracy_vs_iterations.png go to --out. "
                    "Resumable (rerun the same command) and distributed with torchrun.")
    add_model_args(p, multiple=True)
    add_data_args(p, required=False)
    g = p.add_argument_group("attack (eps and step on the 0..255 scale)")
    g.add_argument("--attack", type=str_list, default=["pgd"], metavar="A[,A...]",
                   help="pgd (default, the paper's), fgsm, ifgsm or mifgsm (an iteration "
                        "sweep over --steps), and/or autoattack (or some of apgd-ce, apgd-dlr, "
                        "apgd-t, fab-t, square), all on the same images, e.g. pgd,autoattack")
    g.add_argument("--version", default="standard", choices=["standard", "rand"],
                   help="AutoAttack version (rand: APGD-CE + APGD-DLR with EOT 20)")
    g.add_argument("--aa-steps", type=positive_int, default=None, metavar="N",
                   help="APGD/FAB iterations (default 100; fewer is weaker than AutoAttack)")
    g.add_argument("--aa-targets", type=positive_int, default=None, metavar="N",
                   help="APGD-T/FAB-T target classes (default 9, at most classes - 1)")
    g.add_argument("--aa-queries", type=positive_int, default=None, metavar="N",
                   help="Square queries (default 5000; fewer is weaker than AutoAttack)")
    g.add_argument("--steps", type=int_list, default=[10, 100, 1000], metavar="N,N,...",
                   help="attack iterations (default 10,100,1000)")
    g.add_argument("--restarts", type=positive_int, default=1,
                   help="random restarts per attack (PGD)")
    g.add_argument("--eps", action=Budget255, default=16 / 255,
                   help="L-inf radius on the 0..255 scale (default 16, the paper's)")
    g.add_argument("--step-size", action=Step255, default=1 / 255,
                   help="step on the 0..255 scale (default 1; see --step-rule)")
    g.add_argument("--step-rule", default="paper", choices=["paper", "fixed"],
                   help="paper: step = max(step, eps/steps), i.e. 1.6 for 10 steps (Sec. 6.1)")
    add_exact_arg(g)
    g.add_argument("--untargeted", action="store_true",
                   help="untargeted attack (default: the paper's targeted attack, random target)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (reused to resume)")
    add_restart_arg(r)
    r.add_argument("--name", help="model label in the table and plot (default: from the path)")
    r.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per batch (per process)")
    r.add_argument("--seed", type=int, default=0, help="seeds targets, random starts, --limit")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--workers", type=nonnegative_int, default=0, help="data loader workers")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--plot", nargs="+", metavar="RUN",
                   help="instead of evaluating: merge finished evaluation folders into one table "
                        "and plot in --out")
    r.add_argument("--title", help="plot title")
    r.add_argument("--sanity", action="store_true",
                   help="first run the gradient-masking sanity checks on a few images; a model "
                        "that fails them is not evaluated (exit status 1)")
    r.add_argument("--sanity-images", type=positive_int, default=64, help="images for --sanity")
    r.add_argument("--sanity-restarts", type=positive_int, default=5,
                   help="random restarts compared with one start in --sanity (default 5)")
    p.set_defaults(func=_run)
