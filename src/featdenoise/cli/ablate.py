"""``featdenoise ablate``: train and evaluate denoising variants (paper Fig. 7, Table 1)."""

from __future__ import annotations

import argparse

from featdenoise.analysis import ablate
from featdenoise.cli.common import (
    Budget255,
    Step255,
    int_list,
    output_folder,
    positive_int,
    str_list,
)
from featdenoise.runtime.distributed import launched_as_main


def _run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    output_folder(args.out, "--out")
    evaluation = ablate.EvalSettings(eps=args.eps, step_size=args.step_size,
                                     targeted=not args.untargeted, limit=args.limit,
                                     batch_size=args.batch_size)
    out = ablate.run_ablation(
        args.config, args.out, variants=args.variants, seeds=args.seeds, steps=args.steps,
        overrides=args.overrides, evaluation=evaluation, progress=not args.no_progress)
    if launched_as_main():  # under torchrun every rank returns the same tables
        print(out["markdown"], end="")
        print(f"table: {out['table']}\nplot: {out['plot']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate", help="train + evaluate denoising variants with one budget (Fig. 7, Table 1)",
        description="Trains every variant with the same config, data, budget and seed(s), "
                    "evaluates each with white-box PGD, and writes ablation.md and ablation.png "
                    "(mean ± std over seeds when several are given). Re-running resumes. "
                    f"Variants: {', '.join(ablate.VARIANTS)}.")
    p.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    p.add_argument("--variants", type=str_list, default=list(ablate.DEFAULT_VARIANTS),
                   metavar="A,B,...",
                   help="variants to run (default: the nine of Fig. 7; Table 1 adds no_1x1, "
                        "no_residual)")
    p.add_argument("--seeds", type=int_list, default=[0], metavar="S,T",
                   help="training/evaluation seeds (default 0)")
    p.add_argument("--steps", type=int_list, default=[10, 100], metavar="N,M",
                   help="PGD iterations of the evaluation (default 10,100)")
    p.add_argument("--eps", action=Budget255, default=None,
                   help="evaluation eps, 0..255 scale (default: the config's training eps)")
    p.add_argument("--step-size", action=Step255, default=1 / 255,
                   help="evaluation PGD step, 0..255 scale (rule max(step, eps/steps); default 1)")
    p.add_argument("--untargeted", action="store_true", help="untargeted evaluation attack")
    p.add_argument("--limit", type=positive_int, default=1000,
                   help="validation images per evaluation (fixed random subset; default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="evaluation batch size")
    p.add_argument("--out", default="reports/ablation", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every variant, e.g. optim.epochs=2")
    p.set_defaults(func=_run)
