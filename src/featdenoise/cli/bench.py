"""``featdenoise bench {ops,attacks,train,recipes,agreement,gpu}``: speed and memory goals as
side-by-side ratios, the training recipes compared on Fashion-MNIST, the default attacks' strength
against ``exact=True`` (:mod:`featdenoise.benchmarks.agreement`), and one PGD iteration on
ResNet-152-denoise on a GPU (:mod:`featdenoise.benchmarks.gpu`)."""

from __future__ import annotations

import argparse
from types import ModuleType

from featdenoise.benchmarks import agreement, attacks, gpu, ops, recipes
from featdenoise.benchmarks import train as train_bench
from featdenoise.cli.common import positive_int

BENCHES: dict[str, ModuleType] = {"ops": ops, "attacks": attacks, "train": train_bench,
                                  "recipes": recipes, "agreement": agreement, "gpu": gpu}
"""Each ``featdenoise bench TARGET`` and its module, whose ``run(args) -> int`` runs it."""


def _run(args: argparse.Namespace) -> int:
    if args.target != "gpu":  # bench gpu defaults to cuda itself
        args.device = args.device or "cpu"
    return BENCHES[args.target].run(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    p.add_argument("target", choices=list(BENCHES),
                   help="what to benchmark (agreement: default vs exact=True attacks, paired, "
                        "over models, seeds and CPU kernel sets; gpu: one PGD iteration on "
                        "ResNet-152-denoise, time and peak memory)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repetitions per case")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: all)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cpu; gpu: cuda)")
    a = p.add_argument_group("attacks")
    a.add_argument("--no-autoattack", dest="autoattack", action="store_false",
                   help="skip the AutoAttack rows (ours vs the authors' AutoAttack)")
    a.add_argument("--full", action="store_true",
                   help="AutoAttack rows with the standard budget (100 iterations, 5000 "
                        "queries; about half an hour on one CPU thread)")
    agreement.add_arguments(p.add_argument_group("agreement"))
    p.set_defaults(func=_run)
