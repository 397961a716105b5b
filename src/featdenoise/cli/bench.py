"""``featdenoise bench {ops,attacks,train,recipes,agreement,gpu}``: speed and memory goals as
side-by-side ratios, the training recipes compared on Fashion-MNIST, the default attacks' strength
against ``exact=True`` (:mod:`featdenoise.benchmarks.agreement`), and one PGD iteration on
ResNet-152-denoise on a GPU (:mod:`featdenoise.benchmarks.gpu`)."""

from __future__ import annotations

import argparse

from featdenoise.cli.common import positive_int


def _run(args: argparse.Namespace) -> int:
    # Imported lazily: each benchmark pulls in its own dependencies.
    if args.target == "gpu":
        from featdenoise.benchmarks import gpu

        return gpu.run(args)
    args.device = args.device or "cpu"
    if args.target == "ops":
        from featdenoise.benchmarks import ops as bench
    elif args.target == "attacks":
        from featdenoise.benchmarks import attacks as bench
    elif args.target == "recipes":
        from featdenoise.benchmarks import recipes as bench
    elif args.target == "agreement":
        from featdenoise.benchmarks import agreement as bench
    else:
        from featdenoise.benchmarks import train as bench
    return bench.run(args)


def register(sub: argparse._SubParsersAction) -> None:
    from featdenoise.benchmarks import agreement

    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    p.add_argument("target", choices=["ops", "attacks", "train", "recipes", "agreement", "gpu"],
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
                   help="skip the AutoAttack rows (ours vs torchattacks.AutoAttack)")
    a.add_argument("--full", action="store_true",
                   help="AutoAttack rows with the standard budget (100 iterations, 5000 "
                        "queries; about half an hour on one CPU thread)")
    agreement.add_arguments(p.add_argument_group("agreement"))
    p.set_defaults(func=_run)
