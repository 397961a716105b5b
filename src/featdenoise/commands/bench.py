"""``featdenoise bench {ops,attacks,train}``: speed and memory goals as side-by-side ratios."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    # Imported lazily: each benchmark pulls in its own dependencies.
    if args.target == "ops":
        from featdenoise.benchmarks import ops as bench
    elif args.target == "attacks":
        from featdenoise.benchmarks import attacks as bench
    else:
        from featdenoise.benchmarks import train as bench
    return bench.run(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that print ratios measured side by side")
    p.add_argument("target", choices=["ops", "attacks", "train"], help="what to benchmark")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_run)
