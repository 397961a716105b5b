"""``featdenoise demo``: train, attack, picture and report on Fashion-MNIST.

The work is done by :mod:`featdenoise.analysis.demo`."""

from __future__ import annotations

import argparse

from featdenoise.analysis import demo
from featdenoise.cli.common import output_folder, positive_int


def _run(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out")
    path = demo.run_demo(out_dir=args.out, quick=args.quick, data_root=args.data_root,
                         threads=args.threads, seed=args.seed, progress=not args.no_progress)
    print(f"report: {path}", flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="Fashion-MNIST: clean vs adversarial vs denoising nets, PGD report (minutes)",
        description="Trains a clean, an adversarially trained and an adversarially trained "
                    "denoising small ResNet on Fashion-MNIST, evaluates them clean and under "
                    "PGD-10/100 (eps 0.1, targeted and untargeted), draws the feature-noise "
                    "pictures and writes OUT/report.md (its path is printed last).")
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget (seconds; for tests, numbers meaningless)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 2, or 1 when the machine is busy)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, subsets and attacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
