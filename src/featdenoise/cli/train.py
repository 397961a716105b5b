"""``featdenoise train --config CONFIG [key=value ...]``: adversarial (or clean) training."""

from __future__ import annotations

import argparse

import yaml

from featdenoise.configs import describe_config, list_configs
from featdenoise.hub.build import check_model
from featdenoise.runtime import distributed
from featdenoise.training import train
from featdenoise.training.config import load_config


def _run(args: argparse.Namespace) -> int:
    if args.list_configs:
        names = list_configs()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {describe_config(name)}")
        return 0
    if args.config is None:
        raise ValueError("train needs --config NAME or --config FILE.yaml (names: featdenoise "
                         "train --list-configs)")
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=auto")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        check_model(cfg)  # the same model check as train's, on the meta device
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_dir = train(cfg)
    if distributed.launched_as_main():
        print(f"run directory: {run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="adversarial training with the paper's recipe (Sec. 5)",
        description="Train a model from a YAML config (a file, or the name of a shipped config: "
                    "see --list-configs) with key=value overrides (dotted keys, YAML values), "
                    "e.g. optim.epochs=2 attack.steps=0 for clean training. Launch with "
                    "torchrun for several processes/GPUs/nodes.")
    p.add_argument("--config", default=None,
                   help="YAML config file, or a shipped config's name (e.g. fashion_mnist_quick)")
    p.add_argument("--list-configs", action="store_true",
                   help="list the shipped configs with one line each and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.batch_size=64 run.bf16=true")
    p.add_argument("--resume", action="store_true",
                   help="continue from run_dir/checkpoint.pt if present (same as run.resume=auto)")
    p.add_argument("--out", default=None, help="run directory (same as run.out_dir=...)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved, validated config and exit")
    p.set_defaults(func=_run)
